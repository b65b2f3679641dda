"""APTQ attention-aware Hessians (spec §8 T7–T9) and sensitivity-driven bit allocation (T6)."""

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



# --- APTQ attention-aware Hessians: T7 (traces), T8 (exact v), T9 (probes) ------------------------------------------

HEADS = AttentionHeads(num_heads=4, num_key_value_heads=2, head_dim=4)  # GQA: |J(k)| = 2
C, T, N = 8, 6, 2


def _rope_tables(t: int, d: int) -> tuple[Tensor, Tensor]:
    """LLaMA RoPE ``cos``/``sin`` ``[t, d]`` (base 10000)."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=F64) / d)
    angles = torch.arange(t, dtype=F64)[:, None] * inv_freq
    return torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()


def _attention_toy(seed: int = 0) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor]:
    """``x`` ``[N, T, C]``, q/k/v weights, RoPE tables: the spec's attention toy with causal mask, RoPE and GQA."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, T, C, generator=g, dtype=F64)
    rows = {"q": 16, "k": 8, "v": 8}
    weights = {p: torch.randn(r, C, generator=g, dtype=F64) / math.sqrt(C) for p, r in rows.items()}
    return (x, weights, *_rope_tables(T, HEADS.head_dim))


def _output(x: Tensor, weights: dict[str, Tensor], cos: Tensor, sin: Tensor) -> Tensor:
    """Attention output ``O`` of one sequence."""
    return attention_core(*(x @ weights[p].T for p in "qkv"), HEADS, cos, sin)


def _probs_hf(x: Tensor, weights: dict[str, Tensor], cos: Tensor, sin: Tensor) -> Tensor:
    """Attention probabilities ``[H, T, T]`` built with HF's own RoPE and repeat_kv (an independent oracle)."""
    q = (x @ weights["q"].T).view(1, T, 4, 4).transpose(1, 2)
    k = (x @ weights["k"].T).view(1, T, 2, 4).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos[None], sin[None])
    scores = q @ repeat_kv(k, 2).transpose(2, 3) / 2.0
    return torch.softmax(scores.masked_fill(torch.ones(T, T).triu(1).bool(), -math.inf), -1)[0]


def test_attention_core_matches_hf_llama_attention() -> None:
    config = LlamaConfig(hidden_size=C, num_attention_heads=4, num_key_value_heads=2, head_dim=4)
    config._attn_implementation = "sdpa"
    attn = LlamaAttention(config, layer_idx=0).to(F64)
    x, _, cos, sin = _attention_toy()
    captured = []
    attn.o_proj.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    attn(x[:1], position_embeddings=(cos[None], sin[None]), attention_mask=None)
    weights = {p: getattr(attn, f"{p}_proj").weight for p in "qkv"}
    assert torch.allclose(_output(x[0], weights, cos, sin), captured[0][0], atol=1e-12)


def test_switch_off_gives_the_plain_gptq_hessian_and_trace_bitwise() -> None:
    x, weights, cos, sin = _attention_toy()
    x = x.float()
    stats = qkv_statistics(x, weights, HEADS, cos=cos, sin=sin, attention_aware=False)
    plain = HessianAccumulator(C)
    plain.add_batch(x)
    for p in "qkv":
        assert torch.equal(stats.hessian(p), plain.hessian())
        assert stats.trace(p) == pytest.approx(gptq_trace(x.double().square().sum(), weights[p].shape[0], N), rel=1e-6)


def test_identity_attention_gives_exactly_the_gptq_hessian() -> None:
    x = _attention_toy()[0][0].float()
    stats = probe_statistics(x, {"q": x @ torch.ones(C, 8)}, lambda q: q * 1.0, n_probes=4)
    assert torch.equal(stats.hessian_sum["q"], token_weighted_gram(x))


def test_probe_token_weights_match_the_jacobian() -> None:
    x, weights, cos, sin = _attention_toy()
    proj = [project(x[0], weights[p]) for p in "qkv"]
    jac = torch.func.jacrev(lambda *ps: attention_core(*ps, HEADS, cos, sin), argnums=(0, 1, 2))(*proj)
    sq_grads = [torch.zeros(T, dtype=F64) for _ in "qkv"]
    gen = torch.Generator().manual_seed(0)
    for _, grads in probe_gradients(lambda *ps: attention_core(*ps, HEADS, cos, sin), proj, 4096, generator=gen,
                                    batch=1024):
        for acc, g in zip(sq_grads, grads):
            acc += g.square().sum(dim=(0, 2)) / 4096
    for w_t, j in zip(sq_grads, jac):
        exact = j.square().sum(dim=(0, 1, 3))
        assert torch.all((w_t - exact).abs() <= 0.05 * exact + 1e-12)
    assert torch.allclose(v_exact_token_weights(proj[0], proj[1], HEADS, cos, sin), jac[2].square().sum(dim=(0, 1, 3)))


def _hutchinson(loss_fn, w: Tensor, n: int, seed: int) -> tuple[float, float]:
    """Mean and standard error of ``vᵀHv`` over ``n`` Rademacher ``v``, HVPs by double backprop."""
    w = w.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(w), w, create_graph=True)
    v = torch.randint(0, 2, (n, *w.shape), generator=torch.Generator().manual_seed(seed)).to(F64) * 2 - 1
    (hv,) = torch.autograd.grad(grad, w, grad_outputs=v, is_grads_batched=True)
    values = (v * hv).flatten(1).sum(1)
    return values.mean().item(), values.std().item() / math.sqrt(n)


def test_gptq_trace_matches_hutchinson() -> None:
    x, weight = _correlated_inputs(N * T, C).reshape(N, T, C), _weight(6, C)
    mean, se = _hutchinson(lambda w: ((x @ (w - weight).T) ** 2).sum() / N, weight, 2000, seed=1)
    assert abs(gptq_trace(x.square().sum(), 6, N) - mean) < 3 * se


@pytest.mark.parametrize("p", ["q", "k", "v"])
def test_probe_gram_trace_matches_hutchinson_on_the_true_hessian(p: str) -> None:
    x, weights, cos, sin = _attention_toy()
    reference = [_output(x[n], weights, cos, sin).detach() for n in range(N)]

    def loss(w: Tensor) -> Tensor:
        return sum(((_output(x[n], {**weights, p: w}, cos, sin) - reference[n]) ** 2).sum() for n in range(N)) / N

    h_mean, h_se = _hutchinson(loss, weights[p], 2000, seed=2)
    per_probe = torch.zeros(2000, dtype=F64)
    gen = torch.Generator().manual_seed(3)
    for n in range(N):
        proj = [project(x[n], weights[q]) for q in "qkv"]
        ((_, grads),) = probe_gradients(lambda *ps: attention_core(*ps, HEADS, cos, sin), proj, 2000, generator=gen,
                                        batch=2000)
        per_probe += 2.0 / N * (grads["qkv".index(p)].transpose(1, 2) @ x[n]).square().sum(dim=(1, 2))
    gram = qkv_statistics(x, weights, HEADS, cos=cos, sin=sin, n_probes=2000, reduce="gram",
                          generator=torch.Generator().manual_seed(3), with_hessian=False, probe_batch=300)
    assert gram.trace(p) == pytest.approx(per_probe.mean().item(), rel=1e-10)
    combined_se = math.hypot(h_se, per_probe.std().item() / math.sqrt(2000))
    assert abs(per_probe.mean().item() - h_mean) < 3 * combined_se


@pytest.mark.parametrize("p", ["q", "k", "v"])
def test_token_diag_trace_equals_gram_trace_for_orthonormal_tokens(p: str) -> None:
    _, weights, cos, sin = _attention_toy()
    x = torch.linalg.qr(torch.randn(C, T, generator=torch.Generator().manual_seed(4), dtype=F64))[0].T  # XXᵀ = I
    traces = [qkv_statistics(x, weights, HEADS, cos=cos, sin=sin, reduce=r, generator=torch.Generator().manual_seed(5))
              .trace(p) for r in ("token_diag", "gram")]
    assert traces[0] == pytest.approx(traces[1], rel=1e-10)


def test_exact_v_hessian_matches_formula_and_autograd() -> None:
    x, weights, cos, sin = _attention_toy()
    proj = [[project(x[n], weights[q]) for q in "qk"] for n in range(N)]
    h_v = sum(v_exact_hessian_sum(x[n], *proj[n], HEADS, cos, sin) for n in range(N)) * 2.0 / N
    probs = [_probs_hf(x[n], weights, cos, sin) for n in range(N)]
    for k in range(2):
        ax = [probs[n][j] @ x[n] for n in range(N) for j in (2 * k, 2 * k + 1)]
        assert torch.allclose(h_v[k], 2.0 / N * sum(a.T @ a for a in ax), atol=1e-12)
    reference = [_output(x[n], weights, cos, sin) for n in range(N)]

    def loss(w_v: Tensor) -> Tensor:
        return sum(((_output(x[n], {**weights, "v": w_v}, cos, sin) - reference[n]) ** 2).sum() for n in range(N)) / N

    full = torch.autograd.functional.hessian(loss, weights["v"])  # [8, C, 8, C]
    for r, r2 in itertools.product(range(8), repeat=2):
        expected = h_v[r // 4] if r == r2 else torch.zeros(C, C, dtype=F64)  # rows 0-3: KV head 0
        assert torch.allclose(full[r, :, r2, :], expected, atol=1e-10)
    # H̃_v with the exact token weights is the head-averaged token-diagonal part of the exact Hessians.
    h_tilde = sum(token_weighted_gram(x[n], v_exact_token_weights(*proj[n], HEADS, cos, sin) / 8) for n in range(N))
    diag_part = sum(x[n].T @ torch.diag(sum((probs[n][j].T @ probs[n][j]).diagonal() for j in range(4)) / 2) @ x[n]
                    for n in range(N))
    assert torch.allclose(h_tilde * 2.0 / N, diag_part * 2.0 / N, atol=1e-12)


def test_per_head_gptq_shares_one_g_idx() -> None:
    x, weights, cos, sin = _attention_toy()
    hessians = sum(v_exact_hessian_sum(x[n], *(project(x[n], weights[q]) for q in "qk"), HEADS, cos, sin)
                   for n in range(N))
    config = QuantConfig(bits=3, group_size=4)
    result = gptq_quantize_heads(weights["v"], hessians, config, act_order=True, static_groups=False)
    assert torch.equal(result.weight, result.quantized.dequantize()) and result.perm is not None
    head0 = gptq_quantize(weights["v"][:4], hessians[0], config, static_groups=False, perm=result.perm)
    assert torch.equal(result.weight[:4], head0.weight)


@pytest.mark.parametrize(
    "kwargs, option", [({"n_probes": 0}, "n_probes"), ({"probe": "sobol"}, "probe"), ({"reduce": "full"}, "reduce")]
)
def test_bad_aptq_options_raise_naming_the_option(kwargs: dict, option: str) -> None:
    x, weights, cos, sin = _attention_toy()
    with pytest.raises(ValueError, match=option):
        qkv_statistics(x, weights, HEADS, cos=cos, sin=sin, **kwargs)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        AttentionHeads(num_heads=4, num_key_value_heads=3, head_dim=4)


# --- T6 sensitivity and allocation ----------------------------------------------------------------------------------

SHAPES = {"self_attn.q_proj": 4096, "self_attn.k_proj": 2048, "self_attn.v_proj": 2048, "self_attn.o_proj": 4096,
          "mlp.gate_proj": 8192, "mlp.up_proj": 8192, "mlp.down_proj": 8192}  # hidden 64, 4/2 heads, MLP 128


def _modules(palette: list[int], layers: int = 2, seed: int = 0) -> tuple[dict[str, int], dict[str, dict[int, float]]]:
    """Parameter counts and random Ω(b) (roughly 4^-b, module-specific scale) for a tiny LLaMA's decoder linears."""
    g = torch.Generator().manual_seed(seed)
    params, omega = {}, {}
    for layer, (suffix, n) in itertools.product(range(layers), SHAPES.items()):
        name = f"model.layers.{layer}.{suffix}"
        scale = float(torch.rand(1, generator=g)) * 10
        params[name] = n
        omega[name] = {b: scale * 4.0**-b * (1 + 0.3 * float(torch.rand(1, generator=g))) for b in palette}
    return params, omega


def _brute_force(params, omega, palette: list[int], target: float) -> float:
    """The least objective over every feasible per-unit assignment."""
    units = build_units(params, omega, palette)
    total, best = sum(u.params for u in units), math.inf
    for choice in itertools.product(range(len(palette)), repeat=len(units)):
        if sum(u.params * palette[i] for u, i in zip(units, choice)) <= target * total + 1e-9:
            best = min(best, sum(u.omega[i] for u, i in zip(units, choice)))
    return best


@pytest.mark.parametrize("palette", [[2, 4], [2, 3, 4]])
def test_allocation_hits_the_budget_respects_coupling_and_is_optimal(palette: list[int]) -> None:
    params, omega = _modules(palette)
    units = build_units(params, omega, palette)
    slack = max(u.params for u in units) * max(b - a for a, b in zip(palette, palette[1:])) / sum(params.values())
    objectives = []
    for target in (3.0, 3.5, 3.8, 4.0):
        for solver in ("dp", "lagrange"):
            plan = allocate_bits(params, omega, palette, target, solver=solver)
            assert plan.avg_bits <= target + 1e-12 and target - plan.avg_bits < slack
            for layer in range(2):
                qkv = {plan.bits[f"model.layers.{layer}.self_attn.{p}_proj"] for p in "qkv"}
                gate_up = {plan.bits[f"model.layers.{layer}.mlp.{p}_proj"] for p in ("gate", "up")}
                assert len(qkv) == len(gate_up) == 1
        plan = allocate_bits(params, omega, palette, target, solver="dp")
        assert plan.objective == pytest.approx(_brute_force(params, omega, palette, target), rel=1e-12)
        objectives.append(plan.objective)
    assert all(a >= b for a, b in zip(objectives, objectives[1:]))
    if palette == [2, 4]:
        assert set(allocate_bits(params, omega, palette, 4.0).bits.values()) == {4}


def test_more_sensitive_module_gets_more_bits() -> None:
    params = {"a.o_proj": 100, "b.o_proj": 100}
    omega = {"a.o_proj": {2: 1.0, 4: 0.1}, "b.o_proj": {2: 50.0, 4: 1.0}}
    plan = allocate_bits(params, omega, [2, 4], 3.0)
    assert plan.bits == {"a.o_proj": 2, "b.o_proj": 4} and plan.avg_bits == 3.0
    uncoupled = build_units(*_modules([2, 4]), [2, 4], couple=False)
    assert all(len(u.modules) == 1 for u in uncoupled)


def test_dp_switches_to_lagrange_when_the_state_space_is_huge() -> None:
    params = {"a.o_proj": 10_000_019, "b.o_proj": 10_000_079}  # coprime: the gcd budget unit is 1 weight
    omega = {name: {2: 5.0 + i, 4: 1.0} for i, name in enumerate(params)}
    plan = allocate_bits(params, omega, [2, 4], 3.0)
    # Only the smaller module fits at 4 bits within an average of 3.0.
    assert plan.solver == "lagrange" and plan.avg_bits <= 3.0 and plan.bits == {"a.o_proj": 4, "b.o_proj": 2}


def test_sensitivity_is_trace_per_parameter_times_rtn_error() -> None:
    weight, config = _weight(6, 8), QuantConfig(group_size=4)
    omega = module_sensitivities(weight, 12.0, config, [2, 3, 4])
    errors = rtn_squared_errors(weight, config, [2, 3, 4])
    assert all(omega[b] == pytest.approx(12.0 / 48 * errors[b]) for b in (2, 3, 4)) and omega[2] > omega[4]
    quadratic = quadratic_sensitivities(weight, torch.eye(8, dtype=F64) * 3.0, config, [2, 3, 4])
    assert all(quadratic[b] == pytest.approx(3.0 * errors[b]) for b in (2, 3, 4))  # H = 3I: 3·‖ΔW‖²


@pytest.mark.parametrize(
    "palette, target, solver, match",
    [([], 3.0, "dp", "palette"), ([2, 5], 3.0, "dp", "palette"), ([2, 4], 4.5, "dp", "target_avg_bits"),
     ([2, 4], 1.0, "dp", "target_avg_bits"), ([2, 4], 3.0, "ilp", "solver")],
)
def test_bad_allocation_inputs_raise_naming_the_option(palette, target, solver, match) -> None:
    params, omega = _modules([2, 4])
    with pytest.raises(ValueError, match=match):
        allocate_bits(params, omega, palette, target, solver=solver)


@pytest.mark.parametrize("p", ["q", "k", "v"])
def test_o_proj_probe_space_measures_the_error_after_o_proj(p: str) -> None:
    """``out_weight`` moves the probes behind o_proj: with W_o = I nothing changes; with an orthogonal W_o the
    Gauss–Newton estimate is unchanged in expectation (the exact gram trace over many probes agrees); with
    W_o = 3·I every trace is 9 times larger (the error is measured in o_proj's output units)."""
    x, weights, cos, sin = _attention_toy()
    width = HEADS.num_heads * HEADS.head_dim

    def trace(out_weight, n_probes=4, reduce="token_diag"):
        return qkv_statistics(x, weights, HEADS, cos=cos, sin=sin, n_probes=n_probes, reduce=reduce,
                              generator=torch.Generator().manual_seed(6), out_weight=out_weight).trace(p)

    plain = trace(None)
    assert trace(torch.eye(width, dtype=F64)) == pytest.approx(plain, rel=1e-12)
    assert trace(3 * torch.eye(width, dtype=F64)) == pytest.approx(9 * plain, rel=1e-12)
    rotation = torch.linalg.qr(torch.randn(width, width, generator=torch.Generator().manual_seed(7), dtype=F64))[0]
    many = [trace(w, n_probes=3000, reduce="gram") for w in (None, rotation)]
    assert many[1] == pytest.approx(many[0], rel=0.05)
