"""GRPO with a phased token-entropy term (spec ``specs/grpo_phased_entropy.md``).

Submodules: ``loss`` (pure tensor functions), ``entropy`` (λ schedules), ``rewards``, ``rollout`` (generation and
log-prob plumbing) and ``module`` (:class:`GRPOModule`, the LightningModule).
"""

from __future__ import annotations

from typing import Any

__all__ = ["GRPOModule"]


def __getattr__(name: str) -> Any:
    # Lazy: importing the pure submodules (loss, entropy) must not pull in Lightning and transformers.
    if name == "GRPOModule":
        from lit_modules.grpo.module import GRPOModule

        return GRPOModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
