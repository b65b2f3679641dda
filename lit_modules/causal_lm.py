"""CausalLM: any Hugging Face causal LM as a LightningModule, evaluated by perplexity and zero-shot accuracy."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
from lightning import LightningModule
from lightning.pytorch.utilities import rank_zero_only
from torchmetrics import MeanMetric

from datamodules.assets import check_model_source, resolve_model
from lit_modules.scoring import TokenPerplexity, choice_loglikelihoods, choice_predictions, window_nll

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CausalLM(LightningModule):
    """Wraps a Hugging Face causal LM for evaluation (and plain LM fine-tuning).

    Validation/test batches of ``{"input_ids": [B, T]}`` windows update a token-weighted perplexity
    (``val/ppl``); batches of multiple-choice examples (lists of dicts from ``ZeroShotDataModule``) update
    ``val/<task>/acc`` and ``val/<task>/acc_norm`` (log-likelihood divided by the choice's characters).

    Args:
        model_name_or_path: ``"smollm2-135m-instruct"`` (embedded) or a local HF folder.
        dtype: weight dtype after loading.
        learning_rate: AdamW learning rate when used with ``fit``.
        export_dir: if set, ``save_pretrained`` writes here at the end of validate/test.
    """

    def __init__(
        self,
        model_name_or_path: str = "smollm2-135m-instruct",
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        learning_rate: float = 1e-5,
        export_dir: str | None = None,
    ):
        super().__init__()
        check_model_source(model_name_or_path, option="model_name_or_path")
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; allowed: {sorted(DTYPES)}")
        if learning_rate <= 0:
            raise ValueError(f"learning_rate={learning_rate} must be positive; allowed: a float > 0")
        self.save_hyperparameters()
        self.model_name_or_path, self.dtype_name = model_name_or_path, dtype
        self.learning_rate, self.export_dir = learning_rate, export_dir
        self.model: torch.nn.Module | None = None
        self._tokenizer = None
        self.ppl = TokenPerplexity()
        self.zeroshot_metrics = torch.nn.ModuleDict()

    # -- loading ---------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Load the weights lazily, so bad options fail before any heavy work and FSDP can wrap the result."""
        if self.model is not None:
            return
        from transformers import AutoModelForCausalLM

        folder = resolve_model(self.model_name_or_path, option="model_name_or_path")
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[self.dtype_name])
        self.model.eval()

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(resolve_model(self.model_name_or_path))
        return self._tokenizer

    def forward(self, input_ids: torch.Tensor, **kwargs):
        return self.model(input_ids=input_ids, **kwargs)

    # -- evaluation ------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._create_zeroshot_metrics()

    def on_test_epoch_start(self) -> None:
        self._create_zeroshot_metrics()

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch, prefix: str) -> None:
        if isinstance(batch, dict):
            ids = batch["input_ids"]
            logits = self.model(input_ids=ids).logits  # padding rows too: every rank runs the same forwards (FSDP)
            counted = batch.get("counted", torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device))
            if counted.any():
                self.ppl.update(*window_nll(logits[counted], ids[counted]))
            self.log(f"{prefix}/ppl", self.ppl, add_dataloader_idx=False, batch_size=batch["input_ids"].shape[0])
            self.log(f"{prefix}/seqlen", float(batch["input_ids"].shape[1]), add_dataloader_idx=False,
                     sync_dist=True)
            return
        for example in batch:
            self._score_example(example, prefix)

    def _score_example(self, example: dict, prefix: str) -> None:
        context = getattr(self.model.config, "max_position_embeddings", None)
        scores = choice_loglikelihoods(self.model, example["context_ids"], example["choice_ids"], context)
        if not example.get("counted", True):
            return  # padding that evens out the ranks' forward passes (datamodules.text.pad_shard)
        plain, normalised = choice_predictions(scores, example["choice_chars"])
        task = example["task"]
        for kind, predicted in (("acc", plain), ("acc_norm", normalised)):
            metric = self._zeroshot_metric(task, kind)
            metric.update(float(predicted == example["label"]))
            self.log(f"{prefix}/{task}/{kind}", metric, add_dataloader_idx=False, batch_size=1)

    def _create_zeroshot_metrics(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        zeroshot = getattr(datamodule, "zeroshot", None) or datamodule
        for task in getattr(zeroshot, "task_names", []) or []:
            for kind in ("acc", "acc_norm"):
                self._zeroshot_metric(task, kind)

    def _zeroshot_metric(self, task: str, kind: str) -> MeanMetric:
        # ModuleDict keys may not contain dots; task names are file stems or shipped names.
        key = f"{task}__{kind}".replace(".", "_")
        if key not in self.zeroshot_metrics:
            self.zeroshot_metrics[key] = MeanMetric().to(self.device)
        return self.zeroshot_metrics[key]

    def on_validation_end(self) -> None:
        self._maybe_export()

    def on_test_end(self) -> None:
        self._maybe_export()

    def _maybe_export(self) -> None:
        if self.export_dir:
            self.save_pretrained(self.export_dir)
            if self.trainer is not None:
                self.trainer.strategy.barrier()

    # -- training (plain causal-LM loss, e.g. to fine-tune after pruning) --------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        nll, count = window_nll(self.model(input_ids=batch["input_ids"]).logits, batch["input_ids"])
        loss = nll / count
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_fit_start(self) -> None:
        # transformers 5 returns models in eval mode; Lightning sets train() on the LightningModule,
        # which reaches the HF model too, but only once the loop starts.
        self.model.train()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.learning_rate)

    # -- export ----------------------------------------------------------------------------------
    @rank_zero_only
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the current weights and the tokenizer as a plain HF folder that ``from_pretrained`` loads."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        log.info("saved %s to %s", type(self.model).__name__, directory)
        return directory
