"""``Quantization``: RTN, GPTQ or APTQ (attention-aware Hessians + Hessian-trace mixed precision) before evaluation."""

from __future__ import annotations

import functools
import logging
import re
import time
from typing import Any, Literal

import torch
from lightning import LightningDataModule, LightningModule, Trainer
from transformers import PreTrainedModel

from callbacks.calibration.callback import CacheDevice, CompressionCallback, find_hf_model
from callbacks.calibration.distributed import broadcast_from_rank0
from callbacks.calibration.engine import SequentialEngine
from callbacks.calibration.layers import compressible_linears, find_decoder_layers, weight_matrix
from callbacks.quantization.fisher import fisher_traces
from callbacks.quantization.layer import SolverOptions, layer_sensitivities, quantize_layer
from callbacks.quantization.plan import allocate, unit_of
from callbacks.quantization.quantizer import ALLOWED_BITS, QuantConfig, QuantizedWeight
from callbacks.quantization.stats import LayerStats, ProbeOptions, attention_heads, attention_parts, \
    aptq_unsupported_reason

log = logging.getLogger(__name__)
METHODS = ("rtn", "gptq", "aptq")


class Quantization(CompressionCallback):
    """Quantize every linear of the decoder layers once, right before validation/test.

    Args:
        method: ``rtn`` (round to nearest), ``gptq`` (second-order, plain Hessians) or ``aptq`` (GPTQ with the
            attention-aware Hessian for q/k/v; with ``target_avg_bits``, APTQ's trace-based mixed precision).
        bits: width of every module when ``target_avg_bits`` is not set.
        target_avg_bits: average width (over decoder weights) of a mixed-precision plan, chosen from
            ``candidate_bits`` by minimising the summed HAWQ sensitivity ``tr(H)/n·‖W − Q_b(W)‖²``.
        candidate_bits: widths the plan may use (default [2, 3, 4]; APTQ's paper setting is [2, 4]).
        allocation: ``sensitivity`` (per unit and layer) or ``by_type`` (one width per module type: the ablation).
        sensitivity: where the allocation's Hessian traces come from: ``loss`` (default; the trace of the loss
            Hessian as HAWQ defines it, estimated by the empirical Fisher, one backward pass of the whole model
            per calibration window) or ``layer`` (the traces of the per-layer Hessians the solver uses; APTQ's
            probe traces for q/k/v; cheaper, but blind to how later layers amplify an error, so it hands 2 bits
            to the early layers: on SmolLM2 at 3.5 bits of {2, 4} it gave ppl 469 where ``loss`` gave 100).
        group_size: inputs per scale/zero (-1 = per output channel); must divide every in_features.
        symmetric, mse: quantizer grid options. act_order, static_groups, percdamp, blocksize: GPTQ options.
        true_sequential: quantize q/k/v, o, gate/up, down in turn, each seeing the earlier ones quantized.
        attention_aware: APTQ's probe Hessian for q/k/v (False = plain GPTQ Hessians, the ablation).
        n_probes, probe, probe_reduce: APTQ probe settings; seed fixes the probes.
        probe_space: where the probes measure the q/k/v error: ``o_proj_out`` (default; the residual-stream units
            of o_proj's and down_proj's traces, so the allocation compares like with like) or ``attn_out`` (the
            paper's attention output O, whose traces are orders of magnitude smaller than the other modules').
        couple: q/k/v and gate/up of a layer share one width (as fused kernels need).
        ignore: regular expressions of module names left in full precision.
        export_format: ``compressed-tensors`` (pack-quantized, loadable by transformers) or ``hf`` (fake-quant
            weights, plain save_pretrained) when ``export_dir`` is set.
        The remaining options are those of ``CompressionCallback``.
    """

    report_name = "quant_report.json"
    tensorboard_tag = "quantization"
    layer_keys = ("bits", "trace_per_param", "weight_sq_error", "seconds")

    def __init__(
        self,
        method: Literal["rtn", "gptq", "aptq"] = "gptq",
        bits: int = 4,
        target_avg_bits: float | None = None,
        candidate_bits: list[int] | None = None,
        allocation: Literal["sensitivity", "by_type"] = "sensitivity",
        sensitivity: Literal["loss", "layer"] = "loss",
        group_size: int = -1,
        symmetric: bool = False,
        mse: bool = False,
        act_order: bool = True,
        static_groups: bool = True,
        percdamp: float = 0.01,
        blocksize: int = 128,
        true_sequential: bool = True,
        attention_aware: bool = True,
        n_probes: int = 4,
        probe: Literal["rademacher", "gaussian"] = "rademacher",
        probe_reduce: Literal["token_diag", "gram"] = "token_diag",
        probe_space: Literal["o_proj_out", "attn_out"] = "o_proj_out",
        seed: int = 0,
        couple: bool = True,
        ignore: list[str] | None = None,
        export_format: Literal["compressed-tensors", "hf"] = "compressed-tensors",
        calibration: LightningDataModule | None = None,
        batch_size: int = 1,
        offload: bool = False,
        cache_device: CacheDevice = "accelerator",
        run_on_fit_start: bool = False,
        export_dir: str | None = None,
        model_attr: str = "model",
        progress: bool = True,
    ):
        super().__init__(calibration, batch_size, offload, cache_device, run_on_fit_start, export_dir, model_attr,
                         progress)
        _check_choice("method", method, METHODS)
        _check_choice("allocation", allocation, ("sensitivity", "by_type"))
        _check_choice("sensitivity", sensitivity, ("loss", "layer"))
        _check_choice("export_format", export_format, ("compressed-tensors", "hf"))
        self.palette = _check_bits(bits, target_avg_bits, candidate_bits)
        # Validates bits / group size / grid options eagerly (QuantConfig raises naming the option).
        self.base = QuantConfig(bits=bits, group_size=group_size, sym=symmetric, mse=mse)
        self.method, self.bits, self.target_avg_bits, self.allocation = method, bits, target_avg_bits, allocation
        self.sensitivity = sensitivity
        self.solver = SolverOptions(blocksize, percdamp, act_order, static_groups)
        self.true_sequential, self.attention_aware, self.couple = true_sequential, attention_aware, couple
        self.probes = ProbeOptions(n_probes, probe, probe_reduce, seed, probe_space)
        self.ignore = [re.compile(p) for p in (ignore or [])]
        self.export_format = export_format
        if export_dir and export_format == "compressed-tensors" and not symmetric:
            # The files are correct (spec §5), but transformers 5.25 + compressed-tensors 0.20 cannot reload
            # asymmetric pack-quantized checkpoints: the meta-device model is built with an unpacked zero point.
            log.warning("export_format='compressed-tensors' with symmetric=False: the checkpoint is valid for "
                        "compressed-tensors/vLLM, but transformers 5.25 fails to reload asymmetric pack-quantized "
                        "weights; use symmetric=True for a checkpoint that from_pretrained loads")
        self.needs_calibration = method != "rtn" or target_avg_bits is not None
        self.quantized: dict[str, QuantizedWeight] = {}
        self.plan: dict[str, Any] | None = None

    def config(self) -> dict[str, Any]:
        return {"method": self.method, "bits": self.bits, "target_avg_bits": self.target_avg_bits,
                "candidate_bits": self.palette, "allocation": self.allocation,
                "sensitivity": self.sensitivity, "group_size": self.base.group_size,
                "symmetric": self.base.sym, "mse": self.base.mse, **self.solver.__dict__,
                "true_sequential": self.true_sequential, "attention_aware": self.attention_aware,
                "probes": self.probes.__dict__, "couple": self.couple, "ignore": [p.pattern for p in self.ignore]}

    # -- compression -------------------------------------------------------------------------------
    def compress(self, model: PreTrainedModel, engine: SequentialEngine | None) -> list[dict[str, Any]]:
        layers_name, layers = find_decoder_layers(model)
        targets = [self._targets(layer, f"{layers_name}.{i}") for i, layer in enumerate(layers)]
        self._check_model(model, layers, targets)
        base = QuantConfig(**{**self.base.__dict__, "scale_dtype": model.dtype})
        sensitivities: dict[str, dict[str, Any]] = {}
        bits = {f"{layers_name}.{i}.{n}": self.bits for i, t in enumerate(targets) for n in t}
        if self.target_avg_bits is not None:
            started = time.perf_counter()
            sensitivities = self._pass1(engine, model, layers_name, targets, base)
            pass1_seconds = time.perf_counter() - started
            plan = allocate({n: s["params"] for n, s in sensitivities.items()},
                            {n: s["omega"] for n, s in sensitivities.items()}, self.palette, self.target_avg_bits,
                            self.allocation, self.couple)
            bits = plan.bits
            self.plan = {"avg_bits": plan.avg_bits, "target_avg_bits": plan.target_avg_bits,
                         "objective": plan.objective, "solver": plan.solver, "unit_bits": plan.unit_bits,
                         "pass1_seconds": pass1_seconds}
        records = self._pass2(engine, model, layers_name, targets, base, bits)
        for record in records:
            record.update({k: v for k, v in sensitivities.get(record["name"], {}).items() if k not in record})
        return records

    def _pass1(self, engine, model, layers_name, targets, base) -> dict[str, dict[str, Any]]:
        """Statistics on the dense model (outputs propagate unquantized): traces and RTN errors per width."""
        found: dict[str, dict[str, Any]] = {}

        if self.sensitivity == "loss":
            modules = {f"{layers_name}.{i}.{n}": m for i, t in enumerate(targets) for n, m in t.items()}
            traces = fisher_traces(model, self._windows, modules, progress=self.progress)
            for index, layer_targets in enumerate(targets):
                name = f"{layers_name}.{index}"
                layer_traces = {n: traces[f"{name}.{n}"] for n in layer_targets}
                for module, info in layer_sensitivities(layer_targets, layer_traces, base, self.palette).items():
                    found[f"{name}.{module}"] = info
            return found

        def process_layer(index, name, layer, forward):
            with self._stats(model, layer, index, targets[index], hessians=False) as stats:
                forward()
            traces = {n: stats.trace(n) for n in targets[index]}
            aware = list(stats.qkv_names()) if stats.aware else []
            for module, info in layer_sensitivities(targets[index], traces, base, self.palette, aware).items():
                found[f"{name}.{module}"] = info

        engine.run(process_layer)
        return found

    def _pass2(self, engine, model, layers_name, targets, base, bits) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []

        def process_layer(index, name, layer, forward):
            layer_bits = {n: bits[f"{name}.{n}"] for n in targets[index]}
            factory = functools.partial(self._stats, model, layer, index)
            quantized, infos = quantize_layer(targets[index], layer_bits, base, self.solver,
                                              forward if self.method != "rtn" else None,
                                              lambda modules, hessians: factory(modules, hessians=hessians),
                                              self.true_sequential, name)
            broadcast_from_rank0([weight_matrix(m) for m in compressible_linears(layer).values()])
            for module, info in infos.items():
                full = f"{name}.{module}"
                self.quantized[full] = _to_cpu(quantized[module])
                records.append({"layer": index, "name": full, "unit": unit_of(full, self.couple),
                                "bits": layer_bits[module], "params": weight_matrix(targets[index][module]).numel(),
                                **info})

        if self.method == "rtn":
            _, layers = find_decoder_layers(model)
            for index, layer in enumerate(layers):
                process_layer(index, f"{layers_name}.{index}", layer, None)
        else:
            engine.run(process_layer)
        return records

    def _stats(self, model, layer, index, modules, hessians: bool) -> LayerStats:
        aware = self.method == "aptq" and self.attention_aware and aptq_unsupported_reason(layer) is None
        parts = attention_parts(layer) if aware else None
        heads = attention_heads(model.config, parts[1]) if parts else None
        return LayerStats(dict(modules), hessians, aware, parts, heads, self.probes, index)

    def _targets(self, layer: torch.nn.Module, prefix: str) -> dict[str, torch.nn.Module]:
        return {n: m for n, m in compressible_linears(layer).items()
                if not any(p.search(f"{prefix}.{n}") for p in self.ignore)}

    def _check_model(self, model, layers, targets) -> None:
        """Fail before any calibration work on what the options cannot do with this model."""
        group = self.base.group_size
        for index, modules in enumerate(targets):
            for name, module in modules.items():
                d_in = weight_matrix(module).shape[1]
                if group != -1 and d_in % group:
                    raise ValueError(f"group_size={group} does not divide in_features={d_in} of layer {index} {name}; "
                                     f"allowed: -1 or a divisor of every in_features (e.g. 64 for SmolLM2)")
        if self.method == "aptq" and self.attention_aware:
            reasons = [aptq_unsupported_reason(layer) for layer in layers]
            if all(reasons):
                raise ValueError(f"method='aptq' with attention_aware=True cannot probe {type(model).__name__}: "
                                 f"{reasons[0]}; allowed: LLaMA/Mistral/Qwen2-style attention, or attention_aware=False")
            for index, reason in enumerate(reasons):
                if reason:
                    log.warning("layer %d uses plain GPTQ Hessians for q/k/v: %s", index, reason)

    def summarize(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        params = sum(r["params"] for r in records)
        summary = {"modules": len(records), "avg_bits": sum(r["bits"] * r["params"] for r in records) / max(params, 1),
                   "fallbacks": sum(bool(r.get("fallback")) for r in records)}
        if self.plan is not None:
            # What the sensitivity pass (traces + RTN errors at every width) adds to the quantizing pass.
            summary.update(target_avg_bits=self.plan["target_avg_bits"], objective=self.plan["objective"],
                           pass1_seconds=self.plan["pass1_seconds"])
        return summary

    def _export(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.export_dir or self.export_format == "hf":
            return super()._export(trainer, pl_module)
        if trainer.is_global_zero:
            from callbacks.quantization.export import export_compressed_tensors

            model = find_hf_model(pl_module, self.model_attr)
            export_compressed_tensors(model, self.quantized, self.export_dir,
                                      tokenizer=getattr(pl_module, "tokenizer", None))
        trainer.strategy.barrier()


def _to_cpu(quantized: QuantizedWeight) -> QuantizedWeight:
    fields = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in quantized.__dict__.items()}
    return type(quantized)(**fields)


def _check_choice(option: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{option}={value!r} is not allowed; allowed: {list(allowed)}")


def _check_bits(bits: int, target: float | None, candidates: list[int] | None) -> list[int]:
    if bits not in ALLOWED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; allowed: {list(ALLOWED_BITS)}")
    if target is None:
        return [bits]
    palette = sorted(set(candidates if candidates is not None else [2, 3, 4]))
    if not palette:
        raise ValueError("candidate_bits=[] is empty; allowed: a non-empty subset of " f"{list(ALLOWED_BITS)}")
    bad = [b for b in palette if b not in ALLOWED_BITS]
    if bad:
        raise ValueError(f"candidate_bits={candidates!r} has unsupported widths {bad}; allowed: {list(ALLOWED_BITS)}")
    if not palette[0] <= target <= palette[-1]:
        raise ValueError(f"target_avg_bits={target} is outside the candidates' range; allowed: "
                         f"{palette[0]} <= target_avg_bits <= {palette[-1]} for candidate_bits={palette}")
    return palette
