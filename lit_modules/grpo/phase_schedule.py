"""λ(s) as a pure function of (``trainer.global_step``, S), with S resolved once and kept across a resume.

A mixin for :class:`~lit_modules.grpo.module.GRPOModule`: it needs ``entropy_schedule``, ``total_steps``,
``num_iterations``, ``_schedule_total`` and ``_ckpt_total`` on the module, and Lightning's ``trainer``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any


class PhaseSchedule:
    """The phase schedule's Lightning hooks: resolve S at train start, read λ per step, store S in checkpoints."""

    def on_train_start(self) -> None:
        """Resolve S once (after any checkpoint restore, so a resumed run can keep the checkpointed value)."""
        resolved = self._resolve_total_steps()
        if self._ckpt_total is not None and self._ckpt_total != resolved:
            if self.total_steps is None:
                warnings.warn(f"total_steps resolves to {resolved} but the checkpoint was scheduled for "
                              f"{self._ckpt_total}; keeping {self._ckpt_total} (pass total_steps to override).")
                resolved = self._ckpt_total
        self._schedule_total = resolved

    def _resolve_total_steps(self) -> int:
        if self.total_steps is not None:
            return self.total_steps
        if self.trainer.max_steps > 0:
            return self.trainer.max_steps
        batches = self.trainer.estimated_stepping_batches
        if not math.isfinite(batches):
            raise ValueError("total_steps=None cannot be resolved for an unsized dataloader without "
                             "trainer.max_steps; allowed: pass total_steps or set trainer.max_steps.")
        return int(batches) * self.num_iterations  # manual optimisation: μ optimizer steps per batch

    def entropy_coef(self) -> float:
        """λ(s) at the current ``trainer.global_step`` (optimizer steps taken so far)."""
        return self.entropy_schedule(self.trainer.global_step, self._schedule_total)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store S and s_sw: a resumed run keeps the schedule it started with (spec §2.3 resume contract)."""
        total = self._schedule_total
        switch = None if total is None else self.entropy_schedule.switch_step(total)
        checkpoint["grpo_schedule"] = {"total_steps": total, "switch_step": switch}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._ckpt_total = (checkpoint.get("grpo_schedule") or {}).get("total_steps")
