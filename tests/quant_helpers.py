"""Shared fixtures and inputs of the quantization algorithm tests (tiny fp64 tensors)."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import Tensor, nn

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These tensors are tiny: intra-op threads only add overhead, which explodes on a loaded CI machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def weight_of(d_out: int = 6, d_in: int = 8, seed: int = 0) -> Tensor:
    """The fp64 weight of a freshly initialised ``nn.Linear(d_in, d_out)``."""
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out).weight.detach().to(F64)


def correlated_inputs(t: int, c: int, seed: int = 0) -> Tensor:
    """``X = Z·L`` with a decaying spectrum: strongly correlated input channels (spec T3); a fresh copy."""
    return cached_inputs(t, c, seed).clone()


@functools.lru_cache(maxsize=8)
def cached_inputs(t: int, c: int, seed: int) -> Tensor:
    """The shared, never-mutated original behind :func:`correlated_inputs`."""
    g = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=F64))
    q2, _ = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=F64))
    spectrum = 0.97 ** torch.arange(c, dtype=F64)
    return torch.randn(t, c, generator=g, dtype=F64) @ (q1 * spectrum) @ q2


@functools.lru_cache(maxsize=1)
def gram(t: int, c: int) -> Tensor:
    """GPTQ Hessian ``2·XᵀX`` of the cached correlated inputs (not mutated by the solver)."""
    x = cached_inputs(t, c, 0)
    return 2 * x.T @ x


def same_quantized(a, b) -> bool:
    """Bitwise equality of two ``QuantizedWeight`` records."""
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("codes", "scales", "zeros", "g_idx"))
