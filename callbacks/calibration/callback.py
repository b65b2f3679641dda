"""The lifecycle shared by compression callbacks: calibrate once before evaluation, report, export.

Subclasses implement ``compress(model, windows, engine_factory) -> list[record]``; this base owns when it runs
(once, at validation/test start, optionally at fit start, never twice — also across checkpoint resumes),
the calibration data, strategy checks, replica consistency, the report and the export.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

import torch
from lightning import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from transformers import PreTrainedModel

from callbacks.calibration.distributed import assert_identical_across_ranks, full_weights, refuse_unsupported_strategy
from callbacks.calibration.engine import SequentialEngine
from callbacks.calibration.layers import compressible_linears, find_decoder_layers, weight_matrix
from callbacks.calibration.report import library_versions, log_to_tensorboard, write_json_atomic

CacheDevice = Literal["accelerator", "cpu"]


def find_hf_model(pl_module: LightningModule, model_attr: str = "model") -> PreTrainedModel:
    """The Hugging Face model inside a LightningModule: ``pl_module.<model_attr>`` or its first PreTrainedModel."""
    candidate = getattr(pl_module, model_attr, None)
    if isinstance(candidate, PreTrainedModel):
        return candidate
    for module in pl_module.modules():
        if isinstance(module, PreTrainedModel):
            return module
    raise ValueError(
        f"model_attr={model_attr!r}: {type(pl_module).__name__} holds no Hugging Face PreTrainedModel; allowed: the "
        "name of the attribute holding it (e.g. 'model')"
    )


def default_calibration() -> LightningDataModule:
    """64 random 512-token windows of the Wikipedia-lead calibration split (the CPU preset of the specs)."""
    from datamodules.text import TextDataModule

    return TextDataModule(source="wiki-leads", split="calibration", seqlen=512, nsamples=64, seed=0)


class CompressionCallback(Callback):
    """Base of the pruning and quantization callbacks.

    Args:
        calibration: a datamodule with ``calibration_windows()`` (``TextDataModule``); default: 64 × 512
            tokens of the ``wiki-leads`` calibration split.
        batch_size: calibration windows per forward pass (statistics do not depend on it).
        offload: keep decoder layers on the CPU and move one at a time to the accelerator.
        cache_device: where the activation stream lives.
        run_on_fit_start: also compress before ``fit`` (e.g. to fine-tune a pruned model).
        export_dir: ``save_pretrained`` the compressed model here after compression.
        model_attr: attribute of the LightningModule holding the HF model.
        progress: progress bar over decoder layers.
    """

    report_name = "compression_report.json"
    tensorboard_tag = "compression"
    layer_keys: tuple[str, ...] = ()

    def __init__(
        self,
        calibration: LightningDataModule | None = None,
        batch_size: int = 1,
        offload: bool = False,
        cache_device: CacheDevice = "accelerator",
        run_on_fit_start: bool = False,
        export_dir: str | None = None,
        model_attr: str = "model",
        progress: bool = True,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is not allowed; allowed: an integer >= 1")
        if cache_device not in ("accelerator", "cpu"):
            raise ValueError(f"cache_device={cache_device!r} is not allowed; allowed: 'accelerator' or 'cpu'")
        self.calibration = calibration
        self.batch_size, self.offload, self.cache_device = batch_size, offload, cache_device
        self.run_on_fit_start, self.export_dir = run_on_fit_start, export_dir
        self.model_attr, self.progress = model_attr, progress
        self.done = False
        self.report: dict[str, Any] | None = None
        self._windows: torch.Tensor | None = None

    # -- subclass interface ------------------------------------------------------------------------
    needs_calibration = True

    def config(self) -> dict[str, Any]:
        """The options that define the result (for the report and the checkpoint state key)."""
        return {}

    def compress(self, model: PreTrainedModel, engine: SequentialEngine | None) -> list[dict[str, Any]]:
        raise NotImplementedError

    # -- Lightning hooks ---------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(**{k: repr(v) for k, v in self.config().items()})

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        refuse_unsupported_strategy(trainer.strategy, type(self).__name__, self.offload)
        if self.needs_calibration and self._windows is None:
            # Here, before the model is loaded: bad calibration options fail before any heavy work.
            self._windows = self._calibration_windows(trainer)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.run_on_fit_start:
            self.apply(trainer, pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self.apply(trainer, pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.apply(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.done = bool(state_dict.get("done", False))

    # -- the run -----------------------------------------------------------------------------------
    def apply(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any] | None:
        """Compress ``pl_module``'s model once; later calls (and resumed runs) do nothing."""
        if self.done:
            return self.report
        trainer.strategy.barrier()  # ranks enter the collective-heavy calibration together (spec §7.4)
        if self.needs_calibration and self._windows is None:
            self._windows = self._calibration_windows(trainer)
        with full_weights(trainer.strategy, pl_module):  # FSDP: gathered here, written back to the shards after
            model = find_hf_model(pl_module, self.model_attr)
            engine = self._engine(model, pl_module.device) if self.needs_calibration else None
            started = time.perf_counter()
            with torch.inference_mode(False), torch.no_grad():
                records = self.compress(model, engine)
            seconds = time.perf_counter() - started
            weights = [weight_matrix(m) for m in self._compressed_modules(model)]
            digest = assert_identical_across_ranks(weights, f"{type(self).__name__} results")
            self.report = self._build_report(records, seconds, digest, trainer)
            self._publish(trainer)
            self._export(trainer, pl_module)
        self.done = True
        return self.report

    def _calibration_windows(self, trainer: Trainer) -> torch.Tensor:
        calibration = self.calibration if self.calibration is not None else default_calibration()
        if not hasattr(calibration, "calibration_windows"):
            raise ValueError(
                f"calibration={type(calibration).__name__} has no calibration_windows(); allowed: a "
                "datamodules.text.TextDataModule (or any datamodule with that method)"
            )
        calibration.trainer = trainer
        calibration.setup("calibrate")
        return calibration.calibration_windows()

    def _engine(self, model: PreTrainedModel, device: torch.device) -> SequentialEngine:
        return SequentialEngine(model, self._windows, batch_size=self.batch_size, offload=self.offload,
                                device=device, cache_device=self.cache_device, progress=self.progress)

    @staticmethod
    def _compressed_modules(model: PreTrainedModel) -> list[torch.nn.Module]:
        _, layers = find_decoder_layers(model)
        return [m for layer in layers for m in compressible_linears(layer).values()]

    def _build_report(self, records: list[dict[str, Any]], seconds: float, digest: str, trainer: Trainer) -> dict:
        from datamodules.text import tokens_digest

        calibration = None
        if self._windows is not None:
            calibration = {"nsamples": self._windows.shape[0], "seqlen": self._windows.shape[1],
                           "sha256": tokens_digest(self._windows)}
        return {"callback": type(self).__name__, "config": self.config(), "seconds": seconds,
                "weights_sha256": digest, "calibration": calibration, "world_size": trainer.world_size,
                "versions": library_versions(), "summary": self.summarize(records), "modules": records}

    def summarize(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return {}

    def _publish(self, trainer: Trainer) -> None:
        # Every rank: Trainer.log_dir broadcasts under DDP, so calling it on rank 0 alone would hang.
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero:
            return
        path = write_json_atomic(log_dir / self.report_name, self.report)
        rank_zero_info(f"{type(self).__name__}: {self.report['summary']} (report: {path})")
        for logger in trainer.loggers:
            log_to_tensorboard(logger, self.tensorboard_tag, self.report["modules"], self.layer_keys)

    def _export(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.export_dir:
            return
        if trainer.is_global_zero:
            saver = getattr(pl_module, "save_pretrained", None)
            if callable(saver):
                saver(self.export_dir)
            else:
                find_hf_model(pl_module, self.model_attr).save_pretrained(self.export_dir)
        trainer.strategy.barrier()


logging.getLogger(__name__).addHandler(logging.NullHandler())
