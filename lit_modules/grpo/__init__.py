"""GRPO with a phased token-entropy term (spec ``specs/grpo_phased_entropy.md``).

Import from the submodules: ``loss`` (pure tensor functions), ``entropy`` (λ schedules), ``rewards``.
"""

__all__: list[str] = []
