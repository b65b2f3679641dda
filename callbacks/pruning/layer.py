"""Pruning the linears of one decoder layer: gather input statistics with hooks, then mask (and update) weights."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from callbacks.calibration.hessian import HessianAccumulator
from callbacks.calibration.layers import set_weight_matrix, weight_matrix
from callbacks.pruning.magnitude import magnitude_mask
from callbacks.pruning.patterns import SparsityPattern
from callbacks.pruning.sparsegpt import sparsegpt_prune
from callbacks.pruning.wanda import WandaStats, wanda_mask

Method = Literal["magnitude", "wanda", "sparsegpt"]
METHODS: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt")


@dataclass(frozen=True)
class PruneSpec:
    """Everything that decides one module's mask."""

    method: str
    pattern: SparsityPattern
    ratio: float
    per: str = "matrix"
    blocksize: int = 128
    percdamp: float = 0.01
    mask_selection: str = "tile"


def collect_input_stats(linears: dict[str, nn.Module], method: str, forward: Callable[[], None]) -> dict[str, Any]:
    """Run ``forward()`` once with hooks that accumulate each linear's input statistics (none for magnitude)."""
    if method == "magnitude":
        return {}
    make = WandaStats if method == "wanda" else HessianAccumulator
    stats = {name: make(weight_matrix(m).shape[1], device=weight_matrix(m).device) for name, m in linears.items()}

    def hook(name: str):
        return lambda module, inputs, output: stats[name].add_batch(inputs[0].detach())

    handles = [m.register_forward_hook(hook(name)) for name, m in linears.items()]
    try:
        forward()
    finally:
        for handle in handles:
            handle.remove()
    return stats


def prune_module(module: nn.Module, spec: PruneSpec, stats: Any, name: str) -> torch.Tensor:
    """Mask (and for SparseGPT update) one module's weight in place; return the mask (True = pruned)."""
    weight = weight_matrix(module)
    if spec.method == "magnitude":
        mask = magnitude_mask(weight, spec.ratio, spec.pattern, per=spec.per)
        new_weight = weight.masked_fill(mask, 0)
    elif spec.method == "wanda":
        mask = wanda_mask(weight, stats.col_sq_norm(), spec.ratio, spec.pattern)
        new_weight = weight.masked_fill(mask, 0)
    else:
        new_weight, mask = sparsegpt_prune(weight, stats.hessian(), spec.ratio, spec.pattern, blocksize=spec.blocksize,
                                           percdamp=spec.percdamp, mask_selection=spec.mask_selection, name=name)
    set_weight_matrix(module, new_weight)
    return mask


def prune_linears(linears: dict[str, nn.Module], spec: PruneSpec, forward: Callable[[], None],
                  prefix: str, layer_index: int) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Prune every module of ``linears`` (sorted names); return masks by name and one report record each."""
    started = time.perf_counter()
    stats = collect_input_stats(linears, spec.method, forward)
    stats_seconds = (time.perf_counter() - started) / max(len(linears), 1)
    masks, records = {}, []
    for name, module in linears.items():
        began = time.perf_counter()
        masks[name] = prune_module(module, spec, stats.get(name), f"{prefix}.{name}")
        record = mask_record(layer_index, f"{prefix}.{name}", weight_matrix(module), masks[name], spec)
        record["seconds"] = stats_seconds + time.perf_counter() - began
        records.append(record)
    return masks, records


def nm_violations(mask: torch.Tensor, pattern: SparsityPattern) -> int:
    """Number of (row, M-group) cells whose pruned count is not exactly N (0 for unstructured)."""
    if not pattern.is_nm:
        return 0
    groups = mask.reshape(mask.shape[0], -1, pattern.m).sum(dim=-1)
    return int((groups != pattern.n).sum())


def mask_record(layer_index: int, name: str, weight: torch.Tensor, mask: torch.Tensor,
                spec: PruneSpec) -> dict[str, Any]:
    """The report entry of one module: what was asked, what the mask holds, how many weights are zero."""
    masked = int(mask.sum())
    return {"layer": layer_index, "name": name, "shape": list(weight.shape), "method": spec.method,
            "sparsity_type": str(spec.pattern), "target": spec.ratio, "masked": masked,
            "zeros": int((weight == 0).sum()), "ratio": masked / mask.numel(),
            "nm_violations": nm_violations(mask, spec.pattern)}
