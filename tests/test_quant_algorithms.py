"""Pure-tensor quantization algorithms: quantizer grid (spec §8 T1), RTN and GPTQ (T2–T5)."""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
from torch import Tensor, nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb, repeat_kv

from callbacks.calibration.hessian import HessianAccumulator, damped_inverse_cholesky
from callbacks.quantization.allocation import (
    allocate_bits, build_units, gptq_trace, module_sensitivities, quadratic_sensitivities,
)
from callbacks.quantization.aptq import (
    AttentionHeads, attention_core, probe_gradients, probe_statistics, project, qkv_statistics,
    token_weighted_gram, v_exact_hessian_sum, v_exact_token_weights,
)
from callbacks.quantization.gptq import gptq_quantize, gptq_quantize_heads
from callbacks.quantization.quantizer import QuantConfig, fake_quantize, quantize_weight
from callbacks.quantization.rtn import rtn_quantize, rtn_squared_errors

from tests.quant_helpers import (  # noqa: F401  (single_thread is an autouse fixture)
    F64, cached_inputs as _cached_inputs, correlated_inputs as _correlated_inputs, gram as _gram,
    same_quantized as _same_quantized, single_thread, weight_of as _weight,
)


# --- T1 quantizer grid -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [-1, 32, 64])
def test_codes_are_integers_in_range_and_dequantize_exactly(bits: int, sym: bool, group_size: int) -> None:
    weight = _weight(6, 128)
    weight[0] = 0.0  # an all-zero row must not produce NaN
    config = QuantConfig(bits=bits, group_size=group_size, sym=sym)
    q = quantize_weight(weight, config)
    n_groups = 1 if group_size == -1 else 128 // group_size
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 2**bits - 1
    assert q.scales.shape == q.zeros.shape == (6, n_groups) and q.g_idx.shape == (128,)
    expected = q.scales[:, q.g_idx] * (q.codes.to(F64) - q.zeros[:, q.g_idx].to(F64))
    assert torch.equal(q.dequantize(), expected) and torch.equal(fake_quantize(weight, config), expected)
    assert torch.isfinite(expected).all() and torch.all(expected[0] == 0)
    if sym:
        assert torch.all(q.zeros == 2 ** (bits - 1))
    step = q.scales[:, q.g_idx]  # within half a step; symmetric grids clip the top value by up to one step
    assert torch.all((expected - weight).abs() <= step * (1.0 if sym else 0.5) * (1 + 1e-12))


def test_zero_is_representable_and_symmetric_grid_is_centred() -> None:
    weight = _weight(6, 8)
    weight[:, 3] = 0.0
    for sym in (False, True):
        w_hat = fake_quantize(weight, QuantConfig(bits=3, sym=sym))
        assert torch.all(w_hat[:, 3] == 0)
    q = quantize_weight(weight, QuantConfig(bits=4, sym=True))
    m = weight.abs().max(dim=1).values
    assert torch.allclose(q.scales[:, 0], 2 * m / 15)
    positive = torch.relu(_weight(6, 8)) + 0.01  # skewed rows: the asymmetric grid uses all 2^b levels
    err = {s: (fake_quantize(positive, QuantConfig(bits=3, sym=s)) - positive).square().sum() for s in (False, True)}
    assert err[False] < err[True]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_clipping_never_increases_the_error(bits: int) -> None:
    weight = _weight(16, 64) + 0.5 * torch.randn(16, 64, dtype=F64).pow(3)  # heavy tails make clipping pay
    plain, mse = QuantConfig(bits=bits, group_size=32), QuantConfig(bits=bits, group_size=32, mse=True)
    err = [(fake_quantize(weight, c) - weight).abs().pow(2.4).reshape(16, 2, 32).sum(-1) for c in (plain, mse)]
    assert torch.all(err[1] <= err[0]) and torch.any(err[1] < err[0])


def test_scales_are_rounded_to_the_storage_dtype() -> None:
    q = quantize_weight(_weight(6, 8).float(), QuantConfig(bits=4, scale_dtype=torch.float16))
    assert torch.equal(q.scales.half().float(), q.scales)


@pytest.mark.parametrize(
    "kwargs, option", [({"bits": 5}, "bits"), ({"group_size": 0}, "group_size"), ({"maxshrink": 1.5}, "maxshrink")]
)
def test_bad_quantizer_options_raise_naming_the_option(kwargs: dict, option: str) -> None:
    with pytest.raises(ValueError, match=option):
        QuantConfig(**kwargs)


def test_group_size_must_divide_in_features() -> None:
    with pytest.raises(ValueError, match="group_size=3"):
        quantize_weight(_weight(6, 8), QuantConfig(group_size=3))


# --- RTN -----------------------------------------------------------------------------------------------------------


def test_rtn_paper_preset_is_per_channel_asymmetric() -> None:
    weight = _weight(6, 64)
    paper = rtn_quantize(weight, QuantConfig(bits=3, group_size=32, sym=True, mse=True), paper=True)
    assert _same_quantized(paper, rtn_quantize(weight, QuantConfig(bits=3)))
    errors = rtn_squared_errors(weight, QuantConfig(group_size=32), [2, 3, 4, 8])
    assert errors[2] > errors[3] > errors[4] > errors[8] > 0


# --- GPTQ: T2 (H = I), T3 (better than RTN), T4 (loss identity), act-order, T5 (damping) ---------------------------


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [-1, 4])
@pytest.mark.parametrize("act_order, static_groups", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("percdamp, mse", [(0.0, False), (0.5, True)])
def test_gptq_with_identity_hessian_equals_rtn_bitwise(sym, group_size, act_order, static_groups, percdamp, mse):
    weight = _weight(6, 8)
    config = QuantConfig(bits=3, group_size=group_size, sym=sym, mse=mse)
    result = gptq_quantize(weight, torch.eye(8, dtype=F64), config, blocksize=3, percdamp=percdamp,
                           act_order=act_order, static_groups=static_groups)
    rtn = rtn_quantize(weight, config)
    assert _same_quantized(result.quantized, rtn) and torch.equal(result.weight, rtn.dequantize())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [-1, 64])
def test_gptq_reconstructs_correlated_inputs_better_than_rtn(bits: int, group_size: int) -> None:
    x, weight = _correlated_inputs(4096, 256), _weight(16, 256)
    config = QuantConfig(bits=bits, group_size=group_size)
    gptq = gptq_quantize(weight, _gram(4096, 256), config).weight
    err_gptq, err_rtn = (((w - weight) @ x.T).square().sum() for w in (gptq, fake_quantize(weight, config)))
    assert err_gptq <= (0.9 if bits == 3 else 1.0) * err_rtn


@pytest.mark.parametrize("group_size", [-1, 8])
@pytest.mark.parametrize("act_order, static_groups", [(False, False), (True, False), (True, True)])
def test_gptq_loss_equals_half_trace_of_damped_quadratic(group_size: int, act_order: bool, static_groups: bool) -> None:
    x, weight = _correlated_inputs(256, 32, seed=1), _weight(8, 32)
    hessian = 2 * x.T @ x / 4
    result = gptq_quantize(weight, hessian, QuantConfig(bits=3, group_size=group_size), blocksize=8,
                           act_order=act_order, static_groups=static_groups)
    damped = hessian + result.damp_used * hessian.diagonal().mean() * torch.eye(32, dtype=F64)
    delta = weight - result.weight
    assert result.loss == pytest.approx(0.5 * torch.trace(delta @ damped @ delta.T).item(), rel=1e-8)


@pytest.mark.parametrize("static_groups", [False, True])
def test_act_order_keeps_codes_grids_and_g_idx_consistent(static_groups: bool) -> None:
    x, weight = _correlated_inputs(256, 32, seed=2) * torch.linspace(0.1, 3, 32, dtype=F64), _weight(8, 32)
    hessian = 2 * x.T @ x
    result = gptq_quantize(weight, hessian, QuantConfig(bits=3, group_size=8), blocksize=8,
                           act_order=True, static_groups=static_groups)
    perm = torch.argsort(-hessian.diagonal(), stable=True)
    assert torch.equal(result.perm, perm) and not torch.equal(perm, torch.arange(32))
    expected_g_idx = torch.arange(32) // 8 if static_groups else torch.empty(32, dtype=torch.long)
    if not static_groups:
        expected_g_idx[perm] = torch.arange(32) // 8  # dynamic groups follow the solve order
    assert torch.equal(result.quantized.g_idx, expected_g_idx)
    assert torch.equal(result.weight, result.quantized.dequantize())


def test_group_refit_current_equals_block_start_when_groups_align_with_blocks() -> None:
    x, weight = _correlated_inputs(256, 32, seed=3), _weight(8, 32)
    runs = [gptq_quantize(weight, 2 * x.T @ x, QuantConfig(bits=3, group_size=8), blocksize=4, static_groups=False,
                          group_refit=r).weight for r in ("block_start", "current")]
    assert torch.equal(runs[0], runs[1])


def test_gptq_does_not_modify_inputs_and_zeroes_dead_columns() -> None:
    x = _correlated_inputs(64, 8)
    x[:, 5] = 0.0
    weight, hessian = _weight(6, 8), 2 * x.T @ x
    copies = weight.clone(), hessian.clone()
    result = gptq_quantize(weight, hessian, QuantConfig(bits=4))
    assert torch.equal(weight, copies[0]) and torch.equal(hessian, copies[1])
    assert torch.all(result.weight[:, 5] == 0) and not result.fallback


def test_indefinite_hessian_is_rescued_by_raising_damping() -> None:
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0), dtype=F64))
    eigenvalues = torch.tensor([-1e-3, 0.0, 1, 1, 2, 3, 4, 5], dtype=F64)  # indefinite and rank-deficient
    hessian = q @ torch.diag(eigenvalues) @ q.T
    assert damped_inverse_cholesky(hessian, 0.0) is None
    result = gptq_quantize(_weight(6, 8), hessian, QuantConfig(bits=4), percdamp=0.0)
    assert not result.fallback and result.damp_used == pytest.approx(0.01) and torch.isfinite(result.weight).all()


def test_unusable_hessian_falls_back_to_rtn_or_raises() -> None:
    weight, config = _weight(6, 8), QuantConfig(bits=4)
    for bad in (torch.full((8, 8), float("nan"), dtype=F64), -torch.eye(8, dtype=F64)):
        result = gptq_quantize(weight, bad, config, damp_increment=0.3)  # few retries keep the test fast
        assert result.fallback and result.damp_used is None
        assert torch.equal(result.weight, fake_quantize(weight, config))
        with pytest.raises(torch.linalg.LinAlgError, match="GPTQ on layer0.q_proj"):
            gptq_quantize(weight, bad, config, damp_increment=0.3, on_failure="raise", name="layer0.q_proj")


@pytest.mark.parametrize(
    "kwargs, option",
    [({"blocksize": 0}, "blocksize"), ({"percdamp": -0.1}, "percdamp"), ({"group_refit": "x"}, "group_refit"),
     ({"on_failure": "skip"}, "on_failure"), ({"damp_increment": 0}, "damp_increment")],
)
def test_bad_gptq_options_raise_naming_the_option(kwargs: dict, option: str) -> None:
    with pytest.raises(ValueError, match=option):
        gptq_quantize(_weight(6, 8), torch.eye(8, dtype=F64), QuantConfig(), **kwargs)
