"""The bit plan: uniform widths, or a global mixed-precision allocation from pass-1 sensitivities (spec §4)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Literal

from callbacks.quantization.allocation import DEFAULT_COUPLING, Allocation, allocate_bits

AllocationMode = Literal["sensitivity", "by_type"]


def leaf(name: str) -> str:
    return name.rpartition(".")[2]


def allocate(params: Mapping[str, int], omega: Mapping[str, Mapping[int, float]], palette: Sequence[int],
             target_avg_bits: float, mode: AllocationMode = "sensitivity", couple: bool = True,
             solver: str = "dp") -> Allocation:
    """Per-module widths whose parameter-weighted average is at most ``target_avg_bits``.

    ``sensitivity``: one width per unit (q/k/v and gate/up coupled per layer) minimising the summed HAWQ
    sensitivity — APTQ's allocation. ``by_type``: one width per module *type* for all layers (every q/k/v of
    the model shares one width, every down_proj another, ...), chosen by the same objective — the ablation
    "bits allocated uniformly by module type".
    """
    if mode == "sensitivity":
        return allocate_bits(params, omega, palette, target_avg_bits, solver=solver, couple=couple)
    if mode != "by_type":
        raise ValueError(f"allocation={mode!r} is not allowed; allowed: 'sensitivity', 'by_type'")
    type_params: dict[str, int] = defaultdict(int)
    type_omega: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for name, n in params.items():
        type_params[leaf(name)] += n
        for bits, value in omega[name].items():
            type_omega[leaf(name)][bits] += value
    by_type = allocate_bits(dict(type_params), {k: dict(v) for k, v in type_omega.items()}, palette,
                            target_avg_bits, solver=solver, couple=couple, coupling=DEFAULT_COUPLING)
    bits = {name: by_type.bits[leaf(name)] for name in params}
    return Allocation(bits=bits, unit_bits=by_type.unit_bits, units=by_type.units, avg_bits=by_type.avg_bits,
                      target_avg_bits=by_type.target_avg_bits, objective=by_type.objective, solver=by_type.solver)


def unit_of(name: str, couple: bool = True) -> str:
    """The unit a module's width is chosen for (``…self_attn.qkv_proj`` for q/k/v when coupled)."""
    parent, _, short = name.rpartition(".")
    if couple:
        for fused, members in DEFAULT_COUPLING.items():
            if short in members:
                return f"{parent}.{fused}"
    return name
