"""Magnitude pruning: score ``|W|``, no calibration data (spec §2)."""

from __future__ import annotations

from torch import Tensor

from callbacks.pruning.patterns import (
    PerGranularity,
    SparsityPattern,
    check_divisible,
    pattern_mask,
    resolve_sparsity,
    validate_per,
)


def magnitude_mask(
    weight: Tensor,
    sparsity: float | None,
    pattern: str | SparsityPattern = "unstructured",
    per: PerGranularity = "matrix",
) -> Tensor:
    """Mask (``True`` = pruned) of the smallest-magnitude weights of a ``[d_out, d_in]`` matrix.

    Unstructured prunes exactly ``⌊r·numel⌋`` (``per="matrix"``, the reference) or ``⌊r·d_in⌋`` per row
    (``per="row"``); N:M prunes the N smallest of every M consecutive input columns per row (``per`` unused).
    """
    parsed, ratio = resolve_sparsity(sparsity, pattern)
    validate_per(per)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [d_out, d_in], got shape {tuple(weight.shape)}.")
    check_divisible(weight.shape[1], parsed)
    # fp32 scores: bf16 |W| has so few mantissa bits that ties would dominate the ranking.
    return pattern_mask(weight.detach().float().abs(), ratio, parsed, per)
