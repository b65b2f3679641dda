"""Rollout plumbing for :class:`~lit_modules.grpo.module.GRPOModule`: prompts → completions → reward inputs → logits.

Thin tensor/text helpers with no Lightning state, so each piece is testable alone. Prompts are left-padded and
expanded G times *before* generation (spec §5: never rely on ``num_return_sequences``); completions come back
right-padded. Every later pass (old, reference, training) is a fresh forward over ``prompt ⊕ completion``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from datamodules.rlvr import EVAL_ONLY_COLUMNS, reward_columns  # noqa: F401  (one definition, re-exported)
from lit_modules.grpo.loss import completion_mask
from lit_modules.grpo.multimodal import extend_over_completion
from lit_modules.grpo.rewards import Accuracy



def repeat_column(values: Any, times: int) -> Any:
    """Repeat every per-prompt entry ``times`` times in place (``[a, b]`` → ``[a, a, b, b]``), lists or tensors."""
    if isinstance(values, Tensor):
        return values.repeat_interleave(times, dim=0)
    return [v for v in values for _ in range(times)]


@dataclass
class Rollout:
    """One step's sampled completions, ``N = P·G`` rows, groups as contiguous blocks of G."""

    prompt_ids: Tensor  # [N, Tp], left-padded
    prompt_mask: Tensor  # [N, Tp]
    completion_ids: Tensor  # [N, Tc], right-padded with pad tokens after EOS
    completion_mask: Tensor  # [N, Tc] bool: up to and including the first EOS
    completions: list[str]  # decoded completion text (special tokens dropped)
    truncated: Tensor  # [N] bool: no EOS within max_new_tokens
    # Image inputs exactly as generation saw them, already expanded per completion (pixel_values, image_grid_thw,
    # mm_token_type_ids over the prompt); every log-prob pass reuses them unchanged (spec §5).
    image_inputs: dict[str, Tensor] = field(default_factory=dict)


def tokenize_prompts(tokenizer, prompts: Sequence[str], device: torch.device) -> tuple[Tensor, Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` of already chat-templated prompts.

    ``add_special_tokens=False`` because the chat template already wrote any BOS; a second one shifts the model.
    """
    tokenizer.padding_side = "left"  # generation appends on the right, so padding must sit on the left
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token id that ends a completion: the model's generation config and the tokenizer's EOS."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("neither the model's generation_config nor the tokenizer defines an EOS token.")
    return ids


@torch.no_grad()
def generate(model, prompt_ids: Tensor, prompt_mask: Tensor, *, eos: list[int], pad: int, max_new_tokens: int,
             do_sample: bool, temperature: float = 1.0, top_p: float = 1.0,
             image_inputs: Mapping[str, Tensor] | None = None, suppress: Sequence[int] = (),
             lockstep: bool = False) -> Tensor:  # fmt: skip
    """Completion ids ``[N, Tc]`` from ``model.generate`` with the KV cache, in eval mode (no dropout while sampling).

    ``top_k=0`` explicitly: a checkpoint's generation_config may set top_k, which would make the sampled
    distribution differ from ``softmax(z/T)`` that the loss and entropy use (spec §2.1). ``suppress``: token ids the
    policy must never emit (image placeholders: one in a completion would break every later image-token count); the
    log-prob pass excludes the same ids (``token_stats(excluded=...)``), so sampling and training agree.
    ``lockstep``: every rank keeps decoding until all are done (layer-by-layer gathering under FSDP needs it).
    """
    was_training = model.training
    model.eval()
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if do_sample else dict(
        do_sample=False, temperature=None, top_p=None, top_k=None)  # fmt: skip
    try:
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens,
                             eos_token_id=eos, pad_token_id=pad, use_cache=True, **sampling,
                             suppress_tokens=list(suppress) or None, synced_gpus=lockstep,
                             **(image_inputs or {}))  # fmt: skip
    finally:
        model.train(was_training)
    return out[:, prompt_ids.shape[1]:]


def first_eos_mask(completion_ids: Tensor, eos: list[int]) -> tuple[Tensor, Tensor]:
    """(mask up to and including the first EOS, ``[N]`` bool "no EOS at all" = truncated)."""
    has_eos = torch.isin(completion_ids, torch.as_tensor(eos, device=completion_ids.device)).any(dim=1)
    return completion_mask(completion_ids, eos), ~has_eos


def decode(tokenizer, completion_ids: Tensor, mask: Tensor) -> list[str]:
    """Text of each completion's masked tokens; EOS and other special tokens are dropped."""
    return [tokenizer.decode(ids[m].tolist(), skip_special_tokens=True) for ids, m in zip(completion_ids, mask)]


def completion_logits(model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                      completion_mask: Tensor, image_inputs: Mapping[str, Tensor] | None = None) -> Tensor:  # fmt: skip
    """Logits ``[N, Tc, V]`` that predict each completion token, computed at completion positions only.

    ``logits_to_keep = Tc + 1`` makes the lm_head run on the last ``Tc + 1`` hidden states only (prompt positions are
    never projected to the vocabulary); the final one predicts past the sequence and is dropped. Position ids come
    from the attention mask, as in ``generate``, so left padding does not shift positions between the sampling pass
    and this pass (otherwise the training log-probs would be off-policy). With images, the model derives its own
    3-D (M-RoPE) positions from the ids, the image grid and the attention mask, as ``generate`` did.
    """
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask.to(prompt_mask.dtype)], dim=1)
    keep = completion_ids.shape[1] + 1
    if image_inputs:
        inputs = extend_over_completion(dict(image_inputs), completion_ids)
    else:
        inputs = {"position_ids": (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)}
    out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False,
                **inputs)  # fmt: skip
    return out.logits[:, -keep:-1]


def label_scores(completions: Sequence[str], labels: Sequence[Any]) -> list[float | None]:
    """Accuracy of each completion against a label column (None where the row has no label)."""
    scorer = Accuracy()
    return [scorer.score(c, y) for c, y in zip(completions, labels)]


def label_metrics(completions: Sequence[str], batch: Mapping[str, Any], group_size: int) -> dict[str, float]:
    """``clean_acc`` (rollouts vs ``clean_label``) and ``noisy_label_agreement`` (on corrupted rows, rollouts whose
    answer equals the noisy ``label``: the memorisation rate). Only what the batch allows is returned."""
    metrics: dict[str, float] = {}
    if "clean_label" in batch:
        clean = [s for s in label_scores(completions, repeat_column(batch["clean_label"], group_size)) if s is not None]
        if clean:
            metrics["clean_acc"] = sum(clean) / len(clean)
    if "is_corrupted" in batch and "label" in batch:
        corrupted = [bool(c) for c in repeat_column(batch["is_corrupted"], group_size)]
        noisy_labels = repeat_column(batch["label"], group_size)
        rows = [i for i, c in enumerate(corrupted) if c]
        if rows:
            noisy = label_scores([completions[i] for i in rows], [noisy_labels[i] for i in rows])
            metrics["noisy_label_agreement"] = sum(s or 0.0 for s in noisy) / len(rows)
    return metrics
