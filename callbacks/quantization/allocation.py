"""Sensitivity and mixed-precision bit allocation (quantization spec §4).

Sensitivity (HAWQ): ``Ω_l(b) = tr(H_l)/n_l · ‖W_l − Q_b(W_l)‖²_F``. Allocation is a multiple-choice knapsack over
units u (coupled modules share one width): minimise ``Σ_u Ω_u(b_u)`` subject to ``Σ_u n_u·b_u ≤ B̄·Σ_u n_u``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from functools import reduce
from typing import Literal

import torch
from torch import Tensor

from callbacks.quantization.quantizer import ALLOWED_BITS, QuantConfig
from callbacks.quantization.rtn import rtn_quantize, rtn_squared_errors

Solver = Literal["dp", "lagrange"]
# Fused name -> member leaf names: vLLM fuses these and needs one precision across the shards.
DEFAULT_COUPLING: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
MAX_DP_STATES = 10**7


def gptq_trace(sq_norm_sum: float, d_out: int, nsamples: int) -> float:
    """GPTQ trace ``tr(I_r ⊗ H) = r·(2/N)·Σ_t‖x_t‖²`` from the accumulated ``Σ‖x_t‖²``."""
    if isinstance(nsamples, bool) or not isinstance(nsamples, int) or nsamples < 1:
        raise ValueError(f"nsamples={nsamples!r} is not allowed; allowed: a positive int.")
    return d_out * 2.0 * float(sq_norm_sum) / nsamples


def hawq_sensitivity(trace: float, n_params: int, sq_error: float) -> float:
    """``Ω = tr(H)/n · ‖W − Q_b(W)‖²`` (HAWQ divides the trace by the parameter count)."""
    return float(trace) / n_params * float(sq_error)


def module_sensitivities(weight: Tensor, trace: float, config: QuantConfig, palette: Sequence[int]) -> dict[int, float]:
    """``{b: Ω_l(b)}`` for one module, with RTN at every width of ``palette`` on the run's grid ``config``."""
    errors = rtn_squared_errors(weight, config, palette)
    return {b: hawq_sensitivity(trace, weight.numel(), err) for b, err in errors.items()}


def quadratic_sensitivities(
    weight: Tensor, hessian: Tensor, config: QuantConfig, palette: Sequence[int]
) -> dict[int, float]:
    """Ablation ``omega="quadratic"``: ``{b: Σ_rows Δwᵀ H Δw}`` with RTN's ``ΔW`` at each width (needs H in pass 1)."""
    w = weight.detach().to(torch.float64)
    h = hessian.detach().to(w.device, torch.float64)
    deltas = {b: w - rtn_quantize(w, replace(config, bits=b)).dequantize() for b in palette}
    return {b: float(((d @ h) * d).sum()) for b, d in deltas.items()}


@dataclass(frozen=True)
class Unit:
    """Modules that share one width; ``omega[i]`` is ``Ω_u(palette[i])``, made non-increasing in b."""

    name: str
    modules: tuple[str, ...]
    params: int
    omega: tuple[float, ...]


@dataclass
class Allocation:
    """A bit plan: ``bits`` per module, ``unit_bits`` per unit, the achieved average and the objective ``Σ Ω_u``."""

    bits: dict[str, int]
    unit_bits: dict[str, int]
    units: dict[str, tuple[str, ...]]
    avg_bits: float
    target_avg_bits: float
    objective: float
    solver: str


def build_units(
    params: Mapping[str, int],
    omega: Mapping[str, Mapping[int, float]],
    palette: Sequence[int],
    couple: bool = True,
    coupling: Mapping[str, Sequence[str]] = DEFAULT_COUPLING,
) -> list[Unit]:
    """Group modules into units: ``<parent>.<fused>`` for coupled leaves (``…self_attn.qkv_proj``), else singletons.

    ``Ω_u = Σ_l Ω_l``; a running minimum over increasing b makes it non-increasing, so more bits never look worse.
    """
    leaf_to_fused = {leaf: fused for fused, leaves in coupling.items() for leaf in leaves} if couple else {}
    members: dict[str, list[str]] = {}
    for name in params:
        parent, _, leaf = name.rpartition(".")
        fused = leaf_to_fused.get(leaf)
        key = name if fused is None else (f"{parent}.{fused}" if parent else fused)
        members.setdefault(key, []).append(name)
    units = []
    for key, names in members.items():
        raw = [sum(float(omega[n][b]) for n in names) for b in palette]
        monotone = [min(raw[: i + 1]) for i in range(len(raw))]
        units.append(Unit(key, tuple(names), sum(int(params[n]) for n in names), tuple(monotone)))
    return units


def allocate_bits(
    params: Mapping[str, int],
    omega: Mapping[str, Mapping[int, float]],
    palette: Sequence[int],
    target_avg_bits: float,
    *,
    solver: Solver = "dp",
    couple: bool = True,
    coupling: Mapping[str, Sequence[str]] = DEFAULT_COUPLING,
) -> Allocation:
    """Choose one width per unit from ``palette`` so the parameter-weighted average is ≤ ``target_avg_bits``.

    ``params``: module name → parameter count n_l; ``omega``: module name → ``{b: Ω_l(b)}``. ``dp`` is exact
    (switches to ``lagrange`` above 10⁷ DP states); ``lagrange`` bisects a bit price then upgrades greedily.
    Both end with upgrades that fit, so ``B̄ − avg < max_u n_u·Δb_max / Σn``.
    """
    bits = _validate(params, omega, palette, target_avg_bits, solver)
    units = build_units(params, omega, bits, couple, coupling)
    step = reduce(math.gcd, (u.params for u in units))
    size = [u.params // step for u in units]  # budget arithmetic in units of gcd(n_u): exact integers
    # Fraction(repr(.)) reads 3.8 as 19/5, so B̄·Σn is not floored one step short by binary rounding.
    budget = math.floor(Fraction(repr(float(target_avg_bits))) * sum(size))
    extra = budget - bits[0] * sum(size)
    if solver == "dp" and len(units) * (extra + 1) > MAX_DP_STATES:
        solver = "lagrange"
    choice = _solve_dp(units, size, bits, extra) if solver == "dp" else _solve_lagrange(units, size, bits, budget)
    choice = _fill_budget(units, size, bits, choice, budget)
    unit_bits = {u.name: bits[i] for u, i in zip(units, choice)}
    total = sum(u.params for u in units)
    return Allocation(
        bits={m: unit_bits[u.name] for u in units for m in u.modules},
        unit_bits=unit_bits,
        units={u.name: u.modules for u in units},
        avg_bits=sum(u.params * bits[i] for u, i in zip(units, choice)) / total,
        target_avg_bits=float(target_avg_bits),
        objective=sum(u.omega[i] for u, i in zip(units, choice)),
        solver=solver,
    )


def _validate(
    params: Mapping[str, int], omega: Mapping[str, Mapping[int, float]], palette: Sequence[int], target: float,
    solver: str,
) -> list[int]:
    """Eager checks; returns the sorted, de-duplicated palette."""
    bits = sorted(set(palette))
    if not bits or any(isinstance(b, bool) or b not in ALLOWED_BITS for b in bits):
        raise ValueError(
            f"palette={list(palette)!r} is not allowed; allowed: a non-empty subset of {list(ALLOWED_BITS)}."
        )
    if not isinstance(target, (int, float)) or isinstance(target, bool) or not bits[0] <= target <= bits[-1]:
        raise ValueError(
            f"target_avg_bits={target!r} is outside the palette's range; "
            f"allowed: {bits[0]} <= target_avg_bits <= {bits[-1]}."
        )
    if solver not in ("dp", "lagrange"):
        raise ValueError(f"solver={solver!r} is not allowed; allowed: 'dp', 'lagrange'.")
    if not params:
        raise ValueError("params is empty; allowed: at least one module.")
    if set(params) != set(omega):
        raise ValueError(f"params and omega must name the same modules; differ in {sorted(set(params) ^ set(omega))}.")
    for name, n in params.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"params[{name!r}]={n!r} is not allowed; allowed: a positive int.")
        missing = [b for b in bits if b not in omega[name] or not math.isfinite(omega[name][b])]
        if missing:
            raise ValueError(f"omega[{name!r}] lacks a finite value for bits {missing}; allowed: every palette width.")
    return bits


def _solve_dp(units: list[Unit], size: list[int], bits: list[int], extra: int) -> list[int]:
    """Exact DP over the budget above all-minimum: ``best[s]`` = least ``Σ Ω`` using at most ``s`` extra units."""
    best = torch.zeros(extra + 1, dtype=torch.float64)
    picks = torch.zeros(len(units), extra + 1, dtype=torch.int8)
    for u, unit in enumerate(units):
        new = torch.full_like(best, math.inf)
        arg = torch.zeros(extra + 1, dtype=torch.int8)
        for i in reversed(range(len(bits))):  # widest first: a strict '<' then sends ties to more bits
            cost = size[u] * (bits[i] - bits[0])
            if cost > extra:
                continue
            cand = torch.full_like(best, math.inf)
            cand[cost:] = best[: extra + 1 - cost] + unit.omega[i]
            better = cand < new
            new = torch.where(better, cand, new)
            arg = torch.where(better, torch.tensor(i, dtype=torch.int8), arg)
        best, picks[u] = new, arg
    choice, s = [0] * len(units), extra
    for u in reversed(range(len(units))):
        choice[u] = int(picks[u, s])
        s -= size[u] * (bits[choice[u]] - bits[0])
    return choice


def _solve_lagrange(units: list[Unit], size: list[int], bits: list[int], budget: int) -> list[int]:
    """``b_u(μ) = argmin_b Ω_u(b) + μ·n_u·b`` with the smallest feasible price μ found by bisection."""
    omega = torch.tensor([u.omega for u in units], dtype=torch.float64)
    cost = torch.tensor(size, dtype=torch.float64).unsqueeze(1) * torch.tensor(bits, dtype=torch.float64)

    def pick(mu: float) -> list[int]:
        flipped = (omega + mu * cost).flip(1)  # argmin returns the first minimum: flipping sends ties to more bits
        return (len(bits) - 1 - flipped.argmin(dim=1)).tolist()

    def used(choice: list[int]) -> int:
        return sum(n * bits[i] for n, i in zip(size, choice))

    if used(pick(0.0)) <= budget:
        return pick(0.0)
    lo, hi = 0.0, 1.0
    while used(pick(hi)) > budget:  # terminates: a large enough price selects the narrowest width everywhere
        lo, hi = hi, hi * 2.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if used(pick(mid)) <= budget else (mid, hi)
    return pick(hi)


def _fill_budget(units: list[Unit], size: list[int], bits: list[int], choice: list[int], budget: int) -> list[int]:
    """Spend leftover budget: repeatedly apply the fitting one-step upgrade with the best ``ΔΩ`` per added bit."""
    choice = list(choice)
    left = budget - sum(n * bits[i] for n, i in zip(size, choice))
    while True:
        best_u, best_rate = None, math.inf
        for u, i in enumerate(choice):
            if i + 1 < len(bits) and size[u] * (bits[i + 1] - bits[i]) <= left:
                rate = (units[u].omega[i + 1] - units[u].omega[i]) / (size[u] * (bits[i + 1] - bits[i]))
                if rate < best_rate:
                    best_u, best_rate = u, rate
        if best_u is None:
            return choice
        left -= size[best_u] * (bits[choice[best_u] + 1] - bits[choice[best_u]])
        choice[best_u] += 1
