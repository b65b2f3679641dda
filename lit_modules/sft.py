"""Supervised warm start of a small image-text model on the project's generated-image tasks.

GRPO needs a base policy that already succeeds sometimes (spec §6: a non-zero base success rate), and no pretrained
VLM installs offline. ``VLMSFTModule`` trains one by cross-entropy on the answer tokens of ``RLVRDataModule``
image batches (clean labels), validates by greedy decoding against clean labels (``val/clean_acc``, the same
scoring GRPO uses) and, at the end of ``fit``, publishes the model + processor as a Hugging Face folder that the
GRPO configs load by name. The forward is GRPO's own log-prob pass (prompt ⊕ completion, images expanded the same
way), so the warm start and the RL stage see identical inputs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
from lightning import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from datamodules.assets import TINY_VLM, TINY_VLM_GROUNDING, built_model_dir, check_model_source, replace_folder
from datamodules.assets import resolve_model
from datamodules.image_tasks import answer_text
from lit_modules.causal_lm import DTYPES
from lit_modules.grpo.multimodal import image_prompts
from lit_modules.grpo.policy import load_policy, placeholder_token_ids
from lit_modules.grpo.rollout import completion_logits, decode, eos_token_ids, first_eos_mask, generate, label_scores


class VLMSFTModule(LightningModule):
    """Answer-token cross-entropy on image prompts; publishes the trained model at the end of ``fit``.

    Args:
        model_name_or_path: ``"tiny-qwen2-vl"`` (a random ~0.9M-parameter Qwen2-VL built from code) or a local
            image-text model folder.
        export_to: ``"tiny-qwen2-vl-grounding"`` (the cache folder the GRPO configs load by that name), a
            directory, or ``None`` (no export).
        learning_rate, weight_decay, warmup_steps: AdamW with linear warm-up, then constant.
        max_new_tokens: greedy answer length at validation.
        dtype: weight dtype.
    """

    def __init__(self, model_name_or_path: str = TINY_VLM, export_to: str | None = TINY_VLM_GROUNDING,
                 learning_rate: float = 3e-4, weight_decay: float = 0.0, warmup_steps: int = 50,
                 max_new_tokens: int = 10, dtype: Literal["float32", "bfloat16", "float16"] = "float32"):  # fmt: skip
        super().__init__()
        if model_name_or_path != TINY_VLM_GROUNDING:  # continuing from the artifact is checked when it loads
            check_model_source(model_name_or_path, option="model_name_or_path")
        for name, value, ok in [("learning_rate", learning_rate, learning_rate > 0),
                                ("weight_decay", weight_decay, weight_decay >= 0),
                                ("warmup_steps", warmup_steps, warmup_steps >= 0),
                                ("max_new_tokens", max_new_tokens, max_new_tokens >= 1),
                                ("dtype", dtype, dtype in DTYPES)]:  # fmt: skip
            if not ok:
                raise ValueError(f"{name}={value!r} is not allowed")
        self.save_hyperparameters()
        self.model_name_or_path, self.export_to, self.dtype_name = model_name_or_path, export_to, dtype
        self.learning_rate, self.weight_decay, self.warmup_steps = learning_rate, weight_decay, warmup_steps
        self.max_new_tokens = max_new_tokens
        self.model: torch.nn.Module | None = None
        self._processor = None
        self.val_clean_acc = MeanMetric()
        self.clean_acc_history: list[tuple[int, float]] = []

    def configure_model(self) -> None:
        if self.model is None:
            self.model = load_policy(resolve_model(self.model_name_or_path, option="model_name_or_path"),
                                     DTYPES[self.dtype_name])  # fmt: skip

    @property
    def processor(self):
        if self._processor is None:
            from lit_modules.vlm.processor import load_processor

            self._processor = load_processor(resolve_model(self.model_name_or_path))
        return self._processor

    def on_fit_start(self) -> None:
        self.model.train()  # transformers 5 loads in eval mode

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)
        warmup = max(self.warmup_steps, 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _encode(self, batch: dict[str, Any]):
        """GRPO's own prompt path (processed once, image tokens checked against the grids), one copy per prompt."""
        return image_prompts(self.processor, batch["prompt"], batch["image"], 1, self.model)

    def answer_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Mean cross-entropy of the answer tokens (+ EOS) after each image prompt; prompt tokens are not scored."""
        ids, mask, image_inputs = self._encode(batch)
        tokenizer = self.processor.tokenizer
        answers = [answer_text(label) + tokenizer.eos_token for label in batch["label"]]
        tokenizer.padding_side = "right"
        target = tokenizer(answers, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        tokenizer.padding_side = "left"
        target_mask = target["attention_mask"].bool()
        logits = completion_logits(self.model, ids, mask, target["input_ids"], target_mask, image_inputs)
        return torch.nn.functional.cross_entropy(logits[target_mask].float(), target["input_ids"][target_mask])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.answer_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["label"]))
        return loss

    @torch.no_grad()
    def greedy_answers(self, batch: dict[str, Any]) -> list[str]:
        """Greedy completions of the batch's image prompts (the answers validation scores)."""
        ids, mask, image_inputs = self._encode(batch)
        tokenizer = self.processor.tokenizer
        eos = eos_token_ids(self.model, tokenizer)
        completion = generate(self.model, ids, mask, eos=eos, pad=tokenizer.pad_token_id, do_sample=False,
                              max_new_tokens=self.max_new_tokens, image_inputs=image_inputs,
                              suppress=placeholder_token_ids(self.model))  # fmt: skip
        return decode(tokenizer, completion, first_eos_mask(completion, eos)[0])

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        labels = batch.get("clean_label", batch["label"])
        scores = [s for s in label_scores(self.greedy_answers(batch), labels) if s is not None]
        if scores:
            self.val_clean_acc.update(torch.tensor(scores, device=self.device))
        self.log("val/clean_acc", self.val_clean_acc, on_epoch=True, prog_bar=True, batch_size=max(len(scores), 1))

    def on_validation_epoch_end(self) -> None:
        if self.val_clean_acc.update_count:
            acc = float(self.val_clean_acc.compute())
            self.clean_acc_history.append((self.global_step, acc))
            rank_zero_info(f"val/clean_acc at step {self.global_step}: {acc:.3f}")

    def on_fit_end(self) -> None:
        """Print before -> after, then publish the model + processor (rank 0; swapped in only once fully written)
        with a summary JSON."""
        if len(self.clean_acc_history) >= 2:
            (first_step, first), (last_step, last) = self.clean_acc_history[0], self.clean_acc_history[-1]
            rank_zero_info(f"clean accuracy: {first:.3f} at step {first_step} -> {last:.3f} at step {last_step}")
        if self.export_to is None or self.trainer.global_rank != 0:
            return
        final = built_model_dir(self.export_to) if self.export_to == TINY_VLM_GROUNDING else Path(self.export_to)
        summary = {"source_model": self.model_name_or_path, "steps": self.global_step,
                   "val_clean_acc": [{"step": s, "acc": a} for s, a in self.clean_acc_history]}  # fmt: skip

        def write(folder: Path) -> None:
            self.model.save_pretrained(folder)
            self.processor.save_pretrained(folder)
            (folder / "litforge_sft.json").write_text(json.dumps(summary, indent=2) + "\n")

        replace_folder(final, write)
        rank_zero_info(f"saved the warm-started model to {final} ({self.global_step} steps)")
