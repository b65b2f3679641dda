"""Gathering quantization statistics from one decoder layer with hooks (the orchestration around aptq.py).

``LayerStats`` attaches to a layer for one calibration pass and accumulates, per linear module, the GPTQ
Hessian sum (or only ``Σ‖x_t‖²`` for traces), and — when attention-aware — the APTQ probe statistics of
q/k/v from the layer's own projection input and rotary tables.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from callbacks.calibration.hessian import HessianAccumulator
from callbacks.calibration.layers import weight_matrix
from callbacks.pruning.blocks import ATTENTION_NAMES
from callbacks.quantization.aptq import AttentionHeads, QKVStatistics, qkv_statistics

log = logging.getLogger(__name__)

QKV = {"q_proj": "q", "k_proj": "k", "v_proj": "v"}
PROBE_SPACES = ("attn_out", "o_proj_out")


@dataclass(frozen=True)
class ProbeOptions:
    """APTQ probe settings (spec §3.3): number and kind of probes, the reduction of their outer products, and
    where the probes sit (``attn_out``: o_proj's input, the paper's O; ``o_proj_out``: o_proj's output)."""

    n_probes: int = 4
    probe: str = "rademacher"
    reduce: str = "token_diag"
    seed: int = 0
    space: str = "attn_out"

    def __post_init__(self) -> None:
        if self.space not in PROBE_SPACES:
            raise ValueError(f"probe_space={self.space!r} is not allowed; allowed: {list(PROBE_SPACES)}")


def attention_parts(layer: nn.Module) -> tuple[str, nn.Module] | None:
    """``(prefix, attention module)`` when the layer has separate q/k/v projections APTQ can probe."""
    for attr in ATTENTION_NAMES:
        module = getattr(layer, attr, None)
        if module is not None and all(hasattr(module, n) for n in QKV):
            return attr, module
    return None


def aptq_unsupported_reason(layer: nn.Module) -> str | None:
    """Why the attention-aware Hessian cannot be computed for ``layer`` (None when it can)."""
    parts = attention_parts(layer)
    if parts is None:
        return f"{type(layer).__name__} has no attention module with separate q_proj/k_proj/v_proj"
    _, attention = parts
    if hasattr(attention, "q_norm") or hasattr(attention, "k_norm"):
        return f"{type(attention).__name__} normalises queries/keys, which the probe's attention core does not model"
    if getattr(layer, "attention_type", "full_attention") != "full_attention":
        return f"layer attention type {layer.attention_type!r} (the probe's attention core is full causal)"
    return None


def attention_heads(config: Any, attention: nn.Module) -> AttentionHeads:
    config = config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return AttentionHeads(heads, kv_heads, head_dim, getattr(attention, "scaling", None))


class LayerStats:
    """Hooks for one pass over the calibration windows.

    Args:
        modules: layer-relative name -> linear to gather statistics for.
        hessians: accumulate full ``XᵀX`` (pass 2) or only ``Σ‖x_t‖²`` (pass 1, traces).
        aware: compute APTQ probe statistics for those of q/k/v in ``modules``; needs ``attention`` and ``heads``.
    """

    def __init__(self, modules: dict[str, nn.Module], hessians: bool, aware: bool = False,
                 attention: tuple[str, nn.Module] | None = None, heads: AttentionHeads | None = None,
                 probes: ProbeOptions = ProbeOptions(), layer_index: int = 0):
        self.modules, self.hessians, self.probes = modules, hessians, probes
        self.attention, self.heads = attention, heads
        self.aware = aware and attention is not None and any(n in modules for n in self.qkv_names())
        d_in = {n: weight_matrix(m).shape[1] for n, m in modules.items()}
        self.gptq = {n: HessianAccumulator(d, device=weight_matrix(modules[n]).device) for n, d in d_in.items()
                     if hessians and not (self.aware and n in self.qkv_names())}
        self.sq_norm = {n: 0.0 for n in modules}
        self.nsamples = 0
        self.qkv = QKVStatistics()
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self._generator = torch.Generator().manual_seed(probes.seed * 100_003 + layer_index)
        self._handles: list = []

    def qkv_names(self) -> dict[str, str]:
        if self.attention is None:
            return {}
        prefix = self.attention[0]
        return {f"{prefix}.{leaf}": short for leaf, short in QKV.items()}

    def __enter__(self) -> LayerStats:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._linear_hook(name)))
        if self.aware:
            attention = self.attention[1]
            self._handles.append(attention.register_forward_pre_hook(self._attention_hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _linear_hook(self, name: str):
        def hook(module, inputs, output):
            x = inputs[0].detach()
            self.sq_norm[name] += float(x.float().pow(2).sum())
            if name in self.gptq:
                self.gptq[name].add_batch(x)
            if self.aware and name == f"{self.attention[0]}.q_proj":
                self._add_qkv(x)
            if name == next(iter(self.modules)):
                self.nsamples += x.shape[0] if x.dim() == 3 else 1
        return hook

    def _attention_hook(self, module, args, kwargs):
        rope = kwargs.get("position_embeddings")
        self._rope = tuple(rope) if rope is not None else None

    def _add_qkv(self, x: torch.Tensor) -> None:
        attention = self.attention[1]
        weights = {QKV[leaf]: getattr(attention, leaf).weight.detach().float() for leaf in QKV}
        biases = {QKV[leaf]: getattr(getattr(attention, leaf), "bias", None) for leaf in QKV}
        biases = {k: (b.detach().float() if b is not None else None) for k, b in biases.items()}
        cos, sin = (t.float() for t in self._rope) if self._rope is not None else (None, None)
        out_weight = attention.o_proj.weight.detach().float() if self.probes.space == "o_proj_out" else None
        with torch.inference_mode(False), torch.enable_grad():
            stats = qkv_statistics(x.float().clone(), weights, self.heads, biases=biases, cos=cos, sin=sin,
                                   n_probes=self.probes.n_probes, probe=self.probes.probe, reduce=self.probes.reduce,
                                   generator=self._generator, with_hessian=self.hessians, out_weight=out_weight)
        self.qkv.add_(stats)

    # -- results -----------------------------------------------------------------------------------
    def trace(self, name: str) -> float:
        """``tr`` of the module's full Hessian: APTQ probe trace for q/k/v, else ``d_out·(2/N)·Σ‖x_t‖²``."""
        short = self.qkv_names().get(name) if self.aware else None
        if short is not None:
            return self.qkv.trace(short)
        d_out = weight_matrix(self.modules[name]).shape[0]
        return d_out * 2.0 * self.sq_norm[name] / max(self.nsamples, 1)

    def hessian(self, name: str) -> torch.Tensor:
        short = self.qkv_names().get(name) if self.aware else None
        if short is not None:
            return self.qkv.hessian(short)
        return self.gptq[name].hessian()
