"""The ``train/`` metrics of one GRPO step (TRL's names), from its rollout, rewards and loss outputs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import warnings

import torch

from lit_modules.grpo.loss import GRPOLossOutput, reward_metrics
from lit_modules.grpo.rollout import Rollout, label_metrics


def step_metrics(batch: Mapping[str, Any], rollout: Rollout, rewards: torch.Tensor, scores: torch.Tensor,
                 reward_names: Sequence[str], outputs: Sequence[GRPOLossOutput], first_coef: float,
                 timing: Mapping[str, float], group_size: int) -> dict[str, float]:  # fmt: skip
    """Reward statistics (overall and per reward function), completion lengths, the loss metrics averaged over the
    μ updates (λ is the first update's), timings, and the label metrics the batch allows (clean accuracy and
    noisy-label agreement of the sampled completions)."""
    metrics: dict[str, float] = {k: float(v) for k, v in reward_metrics(rewards, group_size).items()}
    for name, row in zip(reward_names, scores):
        metrics[f"rewards/{name}/mean"] = float(row.nanmean())
        metrics[f"rewards/{name}/std"] = float(row[~row.isnan()].std()) if (~row.isnan()).sum() > 1 else 0.0
    lengths = rollout.completion_mask.sum(dim=1).float()
    metrics.update({"completion_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
                    "completions/max_length": float(lengths.max()),
                    "completions/clipped_ratio": float(rollout.truncated.float().mean())})  # fmt: skip
    for key in outputs[0].metrics:
        if key not in ("num_tokens", "entropy_coef"):
            metrics[key] = sum(float(o.metrics[key]) for o in outputs) / len(outputs)
    metrics["policy_loss"] = sum(float(o.policy_loss) for o in outputs) / len(outputs)
    metrics["entropy_loss"] = sum(float(o.entropy_loss) for o in outputs) / len(outputs)
    metrics["entropy_coef"] = first_coef
    metrics["completion_tokens"] = float(lengths.sum())
    metrics.update(timing)
    metrics.update(label_metrics(rollout.completions, batch, group_size))
    return metrics


class ZeroRewardWatch:
    """Spec §8.7: when no completion earns any reward for ``patience`` steps in a row, every group's advantages are
    0 and GRPO cannot learn; say so once instead of training silently on nothing (``patience=None``: never)."""

    def __init__(self, patience: int | None):
        self.patience, self.steps = patience, 0

    def update(self, rewards: torch.Tensor, global_step: int) -> None:
        if self.patience is None:
            return
        self.steps = self.steps + 1 if not torch.nan_to_num(rewards).any() else 0
        if self.steps == self.patience:
            warnings.warn(f"no completion earned any reward for {self.steps} steps in a row (up to step "
                          f"{global_step}): every advantage is 0, so GRPO has no signal. The base model cannot solve "
                          "these prompts yet: warm-start it (e.g. supervised fine-tuning), use an easier task, or "
                          "sample more completions (num_generations).", stacklevel=3)
