"""``Pruning``: one-shot magnitude / Wanda / SparseGPT pruning, optionally rebuilt by LLM-Barber, before evaluation."""

from __future__ import annotations

import re
from typing import Any, Literal

import torch
from lightning import LightningDataModule
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from callbacks.calibration.callback import CacheDevice, CompressionCallback
from callbacks.calibration.distributed import broadcast_from_rank0
from callbacks.calibration.engine import SequentialEngine
from callbacks.calibration.layers import compressible_linears, find_decoder_layers, weight_matrix
from callbacks.pruning.barber_swap import GRANULARITIES
from callbacks.pruning.layer import METHODS, PruneSpec, prune_linears
from callbacks.pruning.patterns import resolve_sparsity, validate_per
from callbacks.pruning.rebuild import BarberOptions, run_barber


class Pruning(CompressionCallback):
    """Prune every linear of the decoder layers once, right before validation/test.

    Args:
        method: initial mask: ``magnitude`` (no data), ``wanda`` (|W|·‖X‖) or ``sparsegpt`` (OBS with updates).
        sparsity: fraction of weights to prune (default 0.5); for N:M leave it unset (it is N/M).
        sparsity_type: ``unstructured``, ``2:4``, ``4:8`` or any ``N:M`` (N pruned in every M inputs).
        per: magnitude's unstructured selection: ``matrix`` (reference) or ``row``.
        ignore: regular expressions; modules whose qualified name matches one are left dense.
        barber: rebuild the initial mask with LLM-Barber (block-wise weight × gradient metric).
        barber_threshold: τ, the fraction of beneficial swaps performed.
        barber_granularity: comparison group ``output1`` (row), ``input1`` (column), ``layer`` or ``block``.
        barber_metric: ``WD`` = |W|·RMS(grad), ``W`` or ``D``.
        retain_reconstruction: keep SparseGPT's weight updates where the rebuilt mask keeps a weight.
        log_block_mse: measure each block's error after the rebuild (one extra pass per block).
        blocksize, percdamp, mask_selection: SparseGPT's column block, damping and selection granularity.
        The remaining options are those of ``CompressionCallback``.
    """

    report_name = "sparsity_report.json"
    tensorboard_tag = "pruning"
    layer_keys = ("ratio", "block_mse_before", "block_mse_after", "seconds")

    def __init__(
        self,
        method: Literal["magnitude", "wanda", "sparsegpt"] = "wanda",
        sparsity: float | None = None,
        sparsity_type: str = "unstructured",
        per: Literal["matrix", "row"] = "matrix",
        ignore: list[str] | None = None,
        barber: bool = False,
        barber_threshold: float = 0.01,
        barber_granularity: Literal["output1", "input1", "layer", "block"] = "output1",
        barber_metric: Literal["WD", "W", "D"] = "WD",
        retain_reconstruction: bool = False,
        log_block_mse: bool = True,
        blocksize: int = 128,
        percdamp: float = 0.01,
        mask_selection: Literal["tile", "row"] = "tile",
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
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not a pruning method; allowed: {list(METHODS)}")
        if sparsity is None and not _is_nm(sparsity_type):
            sparsity = 0.5
        pattern, ratio = resolve_sparsity(sparsity, sparsity_type)
        self.ignore = [re.compile(p) for p in (ignore or [])]
        self.spec = PruneSpec(method, pattern, ratio, validate_per(per), blocksize, percdamp, mask_selection)
        self.barber = _barber_options(barber, barber_threshold, barber_granularity, barber_metric,
                                      retain_reconstruction, log_block_mse, pattern)
        self.needs_calibration = method != "magnitude" or barber

    def config(self) -> dict[str, Any]:
        spec = self.spec
        return {"method": spec.method, "sparsity": spec.ratio, "sparsity_type": str(spec.pattern), "per": spec.per,
                "ignore": [p.pattern for p in self.ignore], "barber": self.barber.__dict__ if self.barber else None,
                "blocksize": spec.blocksize, "percdamp": spec.percdamp, "mask_selection": spec.mask_selection}

    # -- compression -------------------------------------------------------------------------------
    def compress(self, model: PreTrainedModel, engine: SequentialEngine | None) -> list[dict[str, Any]]:
        layers_name, layers = find_decoder_layers(model)
        if engine is None:
            return self._prune_without_data(layers_name, layers)
        if self.barber is None:
            records: list[dict[str, Any]] = []

            def process_layer(index, name, layer, forward):
                records.extend(self._prune_layer(index, name, layer, forward)[1])
                broadcast_from_rank0(self._layer_weights(layer))

            engine.run(process_layer)
            return records

        def prune_init(index, layer, forward):
            return self._prune_layer(index, f"{layers_name}.{index}", layer, forward)

        return run_barber(engine, prune_init, self.spec.method != "magnitude", self.spec.pattern, self.barber,
                          after_layer=lambda layer: broadcast_from_rank0(self._layer_weights(layer)))

    def _prune_layer(self, index: int, name: str, layer: torch.nn.Module, forward):
        return prune_linears(self._targets(layer, name), self.spec, forward, name, index)

    def _prune_without_data(self, layers_name: str, layers: torch.nn.ModuleList) -> list[dict[str, Any]]:
        records = []
        for index in tqdm(range(len(layers)), desc="magnitude pruning", unit="layer", disable=not self.progress):
            name = f"{layers_name}.{index}"
            records.extend(prune_linears(self._targets(layers[index], name), self.spec, lambda: None, name, index)[1])
        return records

    def _targets(self, layer: torch.nn.Module, prefix: str) -> dict[str, torch.nn.Module]:
        return {n: m for n, m in compressible_linears(layer).items()
                if not any(p.search(f"{prefix}.{n}") for p in self.ignore)}

    @staticmethod
    def _layer_weights(layer: torch.nn.Module) -> list[torch.Tensor]:
        return [weight_matrix(m) for m in compressible_linears(layer).values()]

    def summarize(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        total = sum(r["shape"][0] * r["shape"][1] for r in records)
        masked = sum(r["masked"] for r in records)
        summary = {"modules": len(records), "sparsity": masked / max(total, 1),
                   "nm_violations": sum(r["nm_violations"] for r in records)}
        before = [r["block_mse_before"] for r in records if "block_mse_before" in r]
        after = [r["block_mse_after"] for r in records if "block_mse_after" in r]
        if before:
            summary["mean_block_mse_before"] = sum(before) / len(before)
        if after:
            summary["mean_block_mse_after"] = sum(after) / len(after)
        return summary


def _is_nm(sparsity_type: str) -> bool:
    return isinstance(sparsity_type, str) and ":" in sparsity_type


def _barber_options(enabled: bool, threshold: float, granularity: str, metric: str, retain: bool, log_mse: bool,
                    pattern) -> BarberOptions | None:
    if not enabled:
        return None
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"barber_threshold={threshold!r} is outside [0, 1]; allowed: a fraction such as 0.01")
    if granularity not in GRANULARITIES:
        raise ValueError(f"barber_granularity={granularity!r} is not allowed; allowed: {list(GRANULARITIES)}")
    if metric not in ("WD", "W", "D"):
        raise ValueError(f"barber_metric={metric!r} is not allowed; allowed: ['WD', 'W', 'D']")
    if pattern.is_nm and pattern.n * 2 != pattern.m:
        raise ValueError(f"sparsity_type='{pattern}' with barber=True: LLM-Barber's N:M rebuild needs N/M = 0.5; "
                         "allowed: 2:4, 4:8 (or barber=False)")
    return BarberOptions(threshold, granularity, metric, retain, log_mse)
