"""Quantizing the linears of one decoder layer (pass 2) and measuring their sensitivities (pass 1)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from callbacks.calibration.layers import set_weight_matrix, weight_matrix
from callbacks.quantization.allocation import hawq_sensitivity
from callbacks.quantization.gptq import gptq_quantize
from callbacks.quantization.quantizer import QuantConfig, QuantizedWeight
from callbacks.quantization.rtn import rtn_quantize, rtn_squared_errors
from callbacks.quantization.stats import LayerStats


@dataclass(frozen=True)
class SolverOptions:
    """GPTQ options shared by every module (spec §2.3 defaults)."""

    blocksize: int = 128
    percdamp: float = 0.01
    act_order: bool = True
    static_groups: bool = True


def input_groups(call_order: Sequence[tuple[str, Any]]) -> list[list[str]]:
    """True-sequential sub-groups: maximal runs of consecutive calls that share one input tensor object.

    q/k/v (or a fused qkv), o_proj, gate/up and down_proj come out as [q,k,v], [o], [gate,up], [down] for
    LLaMA-style layers without naming any module, and as the right groups for OPT, GPT-2 and GPT-NeoX.
    """
    groups: list[list[str]] = []
    previous = None
    for name, tensor in call_order:
        if groups and tensor is previous:
            groups[-1].append(name)
        else:
            groups.append([name])
        previous = tensor
    return groups


class CallOrder:
    """Forward hooks that record, for the first batch only, which module ran with which input object."""

    def __init__(self, modules: Mapping[str, nn.Module]):
        self.modules, self.order, self._handles = modules, [], []

    def __enter__(self) -> CallOrder:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if all(seen != name for seen, _ in self.order):
                self.order.append((name, inputs[0]))
        return hook

    def groups(self) -> list[list[str]]:
        found = input_groups(self.order)
        self.order = []  # drop the references to activations
        return found


def quantize_module(module: nn.Module, config: QuantConfig, hessian: torch.Tensor | None, options: SolverOptions,
                    name: str) -> tuple[QuantizedWeight, dict[str, Any]]:
    """Replace ``module``'s weight by its fake-quantized value (GPTQ with a Hessian, else RTN); return the record."""
    weight = weight_matrix(module)
    started = time.perf_counter()
    if hessian is None:
        quantized = rtn_quantize(weight, config)
        new_weight, info = quantized.dequantize(weight.dtype), {"gptq_loss": None, "damp_used": None, "fallback": False}
    else:
        result = gptq_quantize(weight, hessian, config, blocksize=options.blocksize, percdamp=options.percdamp,
                               act_order=options.act_order, static_groups=options.static_groups, name=name)
        quantized, new_weight = result.quantized, result.weight
        info = {"gptq_loss": result.loss, "damp_used": result.damp_used, "fallback": result.fallback}
    pruned = weight == 0
    if pruned.any():
        quantized, new_weight = keep_zeros(quantized, pruned, weight.dtype)
    info["weight_sq_error"] = float((weight.float() - new_weight.float()).pow(2).sum())
    set_weight_matrix(module, new_weight)
    info["seconds"] = time.perf_counter() - started
    return quantized, info


def keep_zeros(quantized: QuantizedWeight, pruned: torch.Tensor, dtype: torch.dtype) -> tuple[QuantizedWeight, torch.Tensor]:
    """Set the codes of exactly-zero (e.g. pruned) weights to their group's zero-point, so they stay exactly 0.

    GPTQ's error compensation moves every not-yet-quantized weight, pruned ones included; without this a
    pruned-then-quantized model would lose its sparsity. Zero is always on the grid (spec §1), so the
    dequantized value ``s·(z − z)`` is exactly 0 and the codes stay consistent with the weights.
    """
    zero_codes = quantized.zeros[:, quantized.g_idx].to(quantized.codes.dtype)
    codes = torch.where(pruned.to(quantized.codes.device), zero_codes, quantized.codes)
    fixed = QuantizedWeight(codes, quantized.scales, quantized.zeros, quantized.g_idx, quantized.config)
    return fixed, fixed.dequantize(dtype)


def quantize_layer(modules: Mapping[str, nn.Module], bits: Mapping[str, int], base: QuantConfig,
                   options: SolverOptions, forward: Callable[[], None] | None, stats_factory: Callable[..., LayerStats],
                   true_sequential: bool, prefix: str) -> tuple[dict[str, QuantizedWeight], dict[str, dict]]:
    """Quantize a layer's modules group by group; ``forward=None`` means RTN (no statistics)."""
    quantized, records = {}, {}
    if forward is None:
        for name, module in modules.items():
            quantized[name], records[name] = quantize_module(module, replace(base, bits=bits[name]), None, options,
                                                             f"{prefix}.{name}")
        return quantized, records
    order = CallOrder(modules)
    with order, stats_factory(dict(modules), hessians=True) as stats:
        forward()
    groups = order.groups() if true_sequential else [list(modules)]
    for position, group in enumerate(groups):
        if position > 0:  # later groups see the already-quantized earlier ones
            with stats_factory({n: modules[n] for n in group}, hessians=True) as stats:
                forward()
        for name in group:
            quantized[name], records[name] = quantize_module(modules[name], replace(base, bits=bits[name]),
                                                             stats.hessian(name), options, f"{prefix}.{name}")
            records[name]["hessian_trace"] = stats.trace(name)  # the solver's; pass 1 reports the plan's "trace"
            records[name]["attention_aware"] = stats.aware and name in stats.qkv_names()
    return quantized, records


def layer_sensitivities(modules: Mapping[str, nn.Module], traces: Mapping[str, float], base: QuantConfig,
                        palette: Sequence[int], attention_aware: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Pass 1: per module the trace, RTN error at every width, and ``Ω(b) = tr/n · ‖W − Q_b(W)‖²``.

    ``traces`` maps each module to ``tr(H)`` (layer-output traces from :class:`LayerStats`, or loss traces from
    ``fisher.fisher_traces``); ``attention_aware`` names the modules whose trace came from APTQ's probes.
    """
    out = {}
    for name, module in modules.items():
        weight = weight_matrix(module)
        trace = traces[name]
        errors = rtn_squared_errors(weight, base, palette)
        out[name] = {"params": weight.numel(), "trace": trace, "trace_per_param": trace / weight.numel(),
                     "rtn_err": errors,
                     "omega": {b: hawq_sensitivity(trace, weight.numel(), e) for b, e in errors.items()},
                     "attention_aware": name in attention_aware}
    return out
