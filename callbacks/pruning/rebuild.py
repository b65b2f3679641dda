"""LLM-Barber on the calibration engine: init-prune a layer, then rebuild its attention and MLP masks.

Two activation streams replace the reference's second full model (pruning spec §3.6.1): ``init`` feeds the
initial pruner the activations of init-pruned earlier layers (as the reference's first pass sees them),
``rebuilt`` feeds the rebuild the activations of rebuilt earlier layers (as its second pass sees them). Only
one dense *layer* snapshot and one fp32 dense *block* copy exist at any time.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from callbacks.calibration.engine import SequentialEngine
from callbacks.calibration.layers import compressible_linears, set_weight_matrix, weight_matrix
from callbacks.pruning.barber import GradSquareAccumulator, apply_mask, barber_scores, reset_weights
from callbacks.pruning.barber_swap import SwapStats, rebuild_block_masks, rebuild_mask, rebuild_mask_nm
from callbacks.pruning.blocks import Block, BlockRecorder, call_block, layer_blocks
from callbacks.pruning.layer import nm_violations
from callbacks.pruning.patterns import SparsityPattern

# prune_init(layer_index, layer, forward) -> masks by layer-relative name, report records
InitPruner = Callable[[int, nn.Module, Callable[[], None]], tuple[dict[str, torch.Tensor], list[dict[str, Any]]]]


@dataclass(frozen=True)
class BarberOptions:
    threshold: float = 0.01
    granularity: str = "output1"
    metric: str = "WD"
    retain_reconstruction: bool = False
    log_block_mse: bool = True


def _fp32_dense_copy(block: Block, dense: dict[str, torch.Tensor]) -> nn.Module:
    """A float32 copy of ``block`` carrying the dense weights of its linears."""
    clone = copy.deepcopy(block.module).float()
    with torch.no_grad():
        for layer_name, inner in block.linears.items():
            module = clone.get_submodule(inner)
            matrix = dense[layer_name].float()
            module.weight.copy_(matrix.t() if isinstance(module, Conv1D) else matrix)
    return clone


def _cast(obj: Any) -> Any:
    """Floating tensors (also inside tuples, e.g. rotary cos/sin) to fp32 for the fp32 block copy."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _cast(v) for k, v in obj.items()}
    return obj


def _mse_recorder(block: Block, dense_copy: nn.Module, losses: list[float]) -> BlockRecorder:
    """Hooks that append MSE(sparse block output, dense block output) of every sample of a pass to ``losses``.

    Attached to a pass the layer makes anyway (the next block's statistics pass, or the propagation), so
    measuring the error after a rebuild costs no extra pass over the calibration data.
    """

    def on_sample(hidden, kwargs, as_kwarg, out):
        with torch.no_grad():
            for row in range(hidden.shape[0]):
                sample_kwargs = {k: v[row : row + 1] if _per_sample(v, hidden.shape[0]) else v
                                 for k, v in kwargs.items()}
                expected = call_block(dense_copy, hidden[row : row + 1].float(), _cast(sample_kwargs), as_kwarg)
                losses.append(float(F.mse_loss(out[row : row + 1].float(), expected.float())))

    return BlockRecorder(block, on_sample)


def _per_sample(value: Any, batch: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == batch and batch > 1


def _accumulate(engine: SequentialEngine, index: int, stream: torch.Tensor, block: Block,
                dense_copy: nn.Module, also: list[BlockRecorder]) -> GradSquareAccumulator:
    """Mean of squared per-sample gradients of the dense block's weights against the sparse block outputs."""
    state: dict[str, GradSquareAccumulator] = {}

    def on_sample(hidden, kwargs, as_kwarg, out):
        if "acc" not in state:
            forward = functools.partial(_call_positional, as_kwarg=as_kwarg)
            state["acc"] = GradSquareAccumulator(dense_copy, weight_names=list(block.linears.values()), forward=forward)
        state["acc"].update(hidden, out, kwargs)

    with contextlib.ExitStack() as stack:
        for recorder in [BlockRecorder(block, on_sample), *also]:
            stack.enter_context(recorder)
        engine.run_layer(index, stream, write=False)
    return state["acc"]


def _call_positional(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], as_kwarg: bool) -> torch.Tensor:
    return call_block(block, hidden, kwargs, as_kwarg)


def _new_masks(scores: dict[str, torch.Tensor], init: dict[str, torch.Tensor], pattern: SparsityPattern,
               options: BarberOptions) -> tuple[dict[str, torch.Tensor], SwapStats]:
    if pattern.is_nm:
        results = {n: rebuild_mask_nm(scores[n], init[n], options.threshold, pattern.n, pattern.m) for n in scores}
    elif options.granularity == "block":
        return rebuild_block_masks(scores, init, options.threshold)
    else:
        results = {n: rebuild_mask(scores[n], init[n], options.threshold, options.granularity) for n in scores}
    total = sum((stats for _, stats in results.values()), SwapStats())
    return {n: mask for n, (mask, _) in results.items()}, total


def rebuild_block(engine: SequentialEngine, index: int, stream: torch.Tensor, layer: nn.Module, block: Block,
                  dense: dict[str, torch.Tensor], init_masks: dict[str, torch.Tensor], pattern: SparsityPattern,
                  options: BarberOptions, also: list[BlockRecorder] = ()) -> tuple[dict, dict, nn.Module]:
    """Rebuild one block's masks on ``stream`` and write the new sparse weights into ``layer``.

    ``also``: extra recorders riding on this block's statistics pass. Returns the masks, the report info
    and the dense fp32 block copy (to measure the error after the rebuild on a later pass).
    """
    dense_copy = _fp32_dense_copy(block, dense)
    accumulator = _accumulate(engine, index, stream, block, dense_copy, list(also))
    # Modules the user excluded with `ignore` have no initial mask and stay dense.
    modules = {name: layer.get_submodule(name) for name in block.linears if name in init_masks}
    scores, reset = {}, {}
    for name, module in modules.items():
        grad_sq = accumulator.grad_sq_mean[block.linears[name]]
        grad_sq = grad_sq.t() if isinstance(module, Conv1D) else grad_sq
        reset[name] = reset_weights(dense[name], weight_matrix(module), init_masks[name], options.retain_reconstruction)
        scores[name] = barber_scores(reset[name], grad_sq.to(reset[name].device), options.metric)
    masks, stats = _new_masks(scores, {n: init_masks[n] for n in modules}, pattern, options)
    for name, module in modules.items():
        set_weight_matrix(module, apply_mask(reset[name], masks[name]))
    dense_copy.requires_grad_(False)
    return masks, {"block": block.kind, "block_mse_before": accumulator.mean_loss, **stats.as_dict()}, dense_copy


def run_barber(engine: SequentialEngine, prune_init: InitPruner, needs_init_stream: bool, pattern: SparsityPattern,
               options: BarberOptions, after_layer: Callable[[nn.Module], None] | None = None) -> list[dict[str, Any]]:
    """Init-prune and rebuild every decoder layer in order; return one report record per module."""
    records: list[dict[str, Any]] = []
    with engine.session():
        rebuilt = engine.capture()
        init_stream = engine.new_stream() if needs_init_stream else None
        bar = tqdm(range(len(engine.layers)), desc="LLM-Barber layers", unit="layer", disable=not engine.progress)
        for index in bar:
            with engine.onloaded(index) as layer:
                records.extend(_barber_layer(engine, index, layer, rebuilt, init_stream, prune_init, pattern, options,
                                             after_layer))
    return records


def _barber_layer(engine, index, layer, rebuilt, init_stream, prune_init, pattern, options,
                  after_layer) -> list[dict[str, Any]]:
    """Init-prune layer ``index``, rebuild attention then MLP, propagate both streams."""
    started = time.perf_counter()
    dense = {name: weight_matrix(m).detach().clone() for name, m in compressible_linears(layer).items()}
    forward = (functools.partial(engine.run_layer, index, init_stream, False) if init_stream is not None
               else lambda: None)
    init_masks, records = prune_init(index, layer, forward)
    if init_stream is not None:
        engine.run_layer(index, init_stream, write=True)  # the init pruner's next layer sees init-pruned outputs
    by_name = {r["name"][len(f"{engine.layers_name}.{index}."):]: r for r in records}
    pending: list[BlockRecorder] = []  # measures the previous block's error after its rebuild
    after_losses: list[list[float]] = []
    for block in layer_blocks(layer):
        masks, info, dense_copy = rebuild_block(engine, index, rebuilt, layer, block, dense, init_masks, pattern,
                                                options, pending)
        losses: list[float] = []
        after_losses.append(losses)
        pending = [_mse_recorder(block, dense_copy, losses)] if options.log_block_mse else []
        for name, mask in masks.items():
            by_name[name].update(barber=info, block_losses=losses, masked=int(mask.sum()),
                                 ratio=float(mask.float().mean()), nm_violations=nm_violations(mask, pattern),
                                 block_mse_before=info["block_mse_before"])
    if after_layer is not None:
        after_layer(layer)
    with contextlib.ExitStack() as stack:
        for recorder in pending:
            stack.enter_context(recorder)
        engine.run_layer(index, rebuilt, write=True)
    seconds = time.perf_counter() - started
    for record in records:
        losses = record.pop("block_losses")
        if losses:
            record["block_mse_after"] = sum(losses) / len(losses)
        record["barber"] = {k: v for k, v in record["barber"].items() if k != "block_mse_before"}
        record["zeros"] = int((weight_matrix(layer.get_submodule(record["name"].rsplit(f".{index}.", 1)[1])) == 0).sum())
        record["seconds"] = seconds / max(len(records), 1)
    return records
