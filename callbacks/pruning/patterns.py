"""Sparsity patterns and exact-count mask helpers shared by every pruning method.

Conventions (spec §2, §4):
- A mask is a ``BoolTensor`` shaped like the weight, ``True`` = pruned.
- Scores are ranked by the total order ``(score, column index)``: among equal scores the lower index
  counts as smaller. The lowest ``k`` are pruned, the highest ``k`` are kept, so ``topk`` and
  ``lowest_k`` are exact complements and every mask is deterministic across devices and runs.
- N:M groups are ``M`` consecutive **input** columns of each output row (the layout 2:4 kernels need).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

PerGranularity = Literal["matrix", "row"]

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_ALLOWED_PATTERNS = "'unstructured', '2:4', '4:8' or a general 'N:M' with integers 1 <= N < M"


@dataclass(frozen=True)
class SparsityPattern:
    """A parsed sparsity pattern: unstructured (``n = m = 0``) or semi-structured N:M."""

    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        """True for N:M patterns."""
        return self.m > 0

    @property
    def ratio(self) -> float | None:
        """The sparsity an N:M pattern implies (``N/M``); ``None`` when unstructured."""
        return self.n / self.m if self.is_nm else None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"


def parse_pattern(pattern: str | SparsityPattern) -> SparsityPattern:
    """Parse ``"unstructured"`` or ``"N:M"`` into a :class:`SparsityPattern`; raise ``ValueError`` otherwise."""
    if isinstance(pattern, SparsityPattern):
        return pattern
    if not isinstance(pattern, str):
        raise ValueError(f"sparsity_type={pattern!r} must be a string; allowed: {_ALLOWED_PATTERNS}.")
    if pattern.strip().lower() == "unstructured":
        return SparsityPattern()
    match = _NM_RE.match(pattern)
    if match is None:
        raise ValueError(f"sparsity_type={pattern!r} is not a sparsity pattern; allowed: {_ALLOWED_PATTERNS}.")
    n, m = int(match.group(1)), int(match.group(2))
    if n < 1 or n >= m:
        raise ValueError(
            f"sparsity_type={pattern!r} has N={n}, M={m}; N:M needs integers 1 <= N < M (e.g. '2:4', '4:8')."
        )
    return SparsityPattern(n, m)


def validate_ratio(sparsity: float, option: str = "sparsity") -> float:
    """Return ``sparsity`` as a float if ``0 < sparsity < 1``; raise ``ValueError`` naming ``option`` otherwise."""
    # bool is an int subclass; `sparsity: True` in a YAML is a typo, not 1.0.
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise ValueError(f"{option}={sparsity!r} must be a float with 0 < {option} < 1.")
    if not (math.isfinite(sparsity) and 0.0 < sparsity < 1.0):
        raise ValueError(f"{option}={sparsity!r} must satisfy 0 < {option} < 1 (a fraction of weights to prune).")
    return float(sparsity)


def resolve_sparsity(
    sparsity: float | None, pattern: str | SparsityPattern = "unstructured"
) -> tuple[SparsityPattern, float]:
    """Validate a (sparsity, pattern) pair and return ``(parsed_pattern, ratio)``.

    N:M implies ``ratio = N/M``: ``sparsity`` may be ``None`` or equal to it; a different value is an error
    because silently ignoring either option would prune at a ratio the user did not ask for.
    """
    parsed = parse_pattern(pattern)
    if parsed.is_nm:
        implied = parsed.n / parsed.m
        if sparsity is not None and not math.isclose(validate_ratio(sparsity), implied, abs_tol=1e-9):
            raise ValueError(
                f"sparsity={sparsity!r} conflicts with sparsity_type='{parsed}', which implies sparsity={implied:g}; "
                f"omit sparsity or set it to {implied:g}."
            )
        return parsed, implied
    if sparsity is None:
        raise ValueError(
            "sparsity=None is only allowed with an N:M sparsity_type; 'unstructured' needs 0 < sparsity < 1."
        )
    return parsed, validate_ratio(sparsity)


def check_divisible(d_in: int, pattern: SparsityPattern) -> None:
    """Raise ``ValueError`` if an N:M pattern's ``M`` does not divide the number of input columns."""
    if pattern.is_nm and d_in % pattern.m != 0:
        raise ValueError(
            f"sparsity_type='{pattern}' needs the input dimension to be a multiple of M={pattern.m}, got d_in={d_in}; "
            "use 'unstructured' or exclude this layer with `ignore`."
        )


def validate_per(per: str) -> PerGranularity:
    """Check the unstructured selection granularity ``per`` (``"matrix"`` or ``"row"``)."""
    if per not in ("matrix", "row"):
        raise ValueError(f"per={per!r} is not a selection granularity; allowed: 'matrix', 'row'.")
    return per  # type: ignore[return-value]


def num_to_prune(ratio: float, n: int) -> int:
    """``⌊ratio·n⌋``, robust to float error: ``0.29 * 100`` is ``28.999…`` in binary but means 29."""
    exact = ratio * n
    nearest = round(exact)
    if abs(exact - nearest) <= 1e-9 * max(1.0, abs(exact)):
        return int(nearest)
    return math.floor(exact)


def _ranks(scores: Tensor) -> Tensor:
    """Rank of every entry along the last dim under the ``(score, index)`` order (0 = smallest)."""
    order = torch.sort(scores, dim=-1, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return ranks.scatter_(-1, order, positions)


def lowest_k_mask(scores: Tensor, k: int | Tensor) -> Tensor:
    """``True`` for the ``k`` lowest scores along the last dim (ties: lower index first).

    ``k`` is an int or an integer tensor broadcastable to ``scores.shape[:-1] + (1,)`` (a count per row).
    """
    return _ranks(scores) < torch.as_tensor(k, device=scores.device)


def topk_mask_per_row(scores: Tensor, k: int | Tensor) -> Tensor:
    """``True`` for the ``k`` highest scores along the last dim; the exact complement of ``lowest_k_mask(d - k)``."""
    width = scores.shape[-1]
    return _ranks(scores) >= width - torch.as_tensor(k, device=scores.device)


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Prune the ``n`` lowest of every ``m`` consecutive input columns in each row of a 2-D score matrix."""
    rows, d_in = scores.shape
    check_divisible(d_in, SparsityPattern(n, m))
    grouped = scores.reshape(rows, d_in // m, m)
    return lowest_k_mask(grouped, n).reshape(rows, d_in)


def unstructured_mask(scores: Tensor, ratio: float, per: PerGranularity = "matrix") -> Tensor:
    """Prune exactly ``⌊ratio·numel⌋`` lowest scores (``per="matrix"``) or ``⌊ratio·d_in⌋`` in each row."""
    validate_per(per)
    if per == "row":
        return lowest_k_mask(scores, num_to_prune(ratio, scores.shape[-1]))
    flat = scores.reshape(1, -1)
    return lowest_k_mask(flat, num_to_prune(ratio, flat.shape[-1])).reshape(scores.shape)


def pattern_mask(scores: Tensor, ratio: float, pattern: SparsityPattern, per: PerGranularity = "matrix") -> Tensor:
    """Dispatch to :func:`nm_mask` or :func:`unstructured_mask` for an already-resolved pattern."""
    if pattern.is_nm:
        return nm_mask(scores, pattern.n, pattern.m)
    return unstructured_mask(scores, ratio, per)
