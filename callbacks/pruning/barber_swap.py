"""LLM-Barber swap rule: rebuild a pruning mask by trading low-score kept weights for high-score pruned ones.

Pure tensor functions (spec ``pruning.md`` §3.4 and the tie-safe exact-count Project decision §3.6.6).
A mask is a ``bool`` tensor with ``True`` = pruned. Within one *comparison group* (a row, a column, a
matrix, or all matrices of a block), with ``g`` the pruned scores sorted descending and ``p`` the kept
scores sorted ascending::

    K = #{k < min(|g|, |p|) : g_k > p_k}        # a prefix, since g falls and p rises
    n = floor(K * threshold)

the top-``n`` pruned entries regrow and the bottom-``n`` kept entries are pruned, both picked by stable
sort index, so the group's pruned count never changes. This equals the reference's threshold rule
(``S > g[n]`` regrows, ``S < p[n]`` prunes) whenever ``threshold < 1`` and there is no tie at
``g[n-1] = g[n]`` or ``p[n-1] = p[n]``; :class:`SwapStats` counts the groups where such a tie occurred.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, Mapping

import torch
from torch import Tensor

Granularity = Literal["output1", "input1", "layer"]
GRANULARITIES: tuple[str, ...] = ("output1", "input1", "layer", "block")


@dataclass(frozen=True)
class SwapStats:
    """What one rebuild did, for the per-layer report.

    Attributes:
        groups: number of comparison groups (rows, columns, matrices or blocks).
        candidates: sum over groups of K, the number of beneficial (pruned, kept) pairs.
        swaps: number of regrown entries; the same number of kept entries was pruned.
        tie_groups: groups whose swap boundary fell on a tie, i.e. where the reference threshold rule
            would have regrown or pruned a different number of entries.
    """

    groups: int = 0
    candidates: int = 0
    swaps: int = 0
    tie_groups: int = 0

    def __add__(self, other: SwapStats) -> SwapStats:
        return SwapStats(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _check_threshold(threshold: float) -> None:
    # Above 1 the reference indexes past the sorted lists; below 0 is meaningless.
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")


def _check_pair(scores: Tensor, mask: Tensor, name: str = "scores") -> None:
    if mask.dtype != torch.bool:
        raise ValueError(f"mask for {name} must be a bool tensor (True = pruned), got dtype {mask.dtype}")
    if scores.shape != mask.shape:
        raise ValueError(f"{name} has shape {tuple(scores.shape)} but its mask has shape {tuple(mask.shape)}")
    # NaN compares false with everything and would silently corrupt K and the sort order.
    if not torch.isfinite(scores).all():
        raise ValueError(f"{name} contains NaN or infinite values; cannot rank weights")


def _side_order(scores: Tensor, mask: Tensor, pruned_side: bool) -> Tensor:
    """Per-row permutation listing one side of the mask first, in the order the swap consumes it.

    ``pruned_side=True``: pruned entries first, by descending score. ``False``: kept entries first, by
    ascending score. Two stable sorts (score, then side) give a lexicographic order in which ties keep
    their index order, which makes the exact-count choice deterministic.
    """
    order = torch.sort(scores, dim=-1, descending=pruned_side, stable=True).indices
    side = mask.gather(-1, order)
    # Sort key 0 goes first: the wanted side must map to 0.
    key = (~side if pruned_side else side).to(torch.uint8)
    return order.gather(-1, torch.sort(key, dim=-1, stable=True).indices)


def _count_swaps(g: Tensor, p: Tensor, n_pruned: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """K and n per row from the sorted pruned scores ``g`` and kept scores ``p`` (valid prefixes)."""
    positions = torch.arange(g.shape[-1], device=g.device)
    paired = positions < torch.minimum(n_pruned, g.shape[-1] - n_pruned).unsqueeze(-1)
    k = (paired & (g > p)).sum(-1)
    # The reference multiplies an integer tensor by a Python float, i.e. evaluates K*τ in float32;
    # doing the same keeps n identical (e.g. K=100, τ=0.29 gives 29 here but 28 in float64).
    n = torch.floor(k * threshold).to(torch.long)
    return k, n


def _boundary_tie(sorted_scores: Tensor, n: Tensor, available: Tensor) -> Tensor:
    """Rows where entry n-1 and entry n of ``sorted_scores`` tie, given n > 0 and n < available."""
    last = sorted_scores.shape[-1] - 1
    before = sorted_scores.gather(-1, (n - 1).clamp(0, last).unsqueeze(-1)).squeeze(-1)
    at = sorted_scores.gather(-1, n.clamp(0, last).unsqueeze(-1)).squeeze(-1)
    return (n > 0) & (n < available) & (before == at)


def _first_n(order: Tensor, n: Tensor) -> Tensor:
    """Boolean tensor marking, per row, the entries at the first n positions of ``order``."""
    take = torch.arange(order.shape[-1], device=order.device) < n.unsqueeze(-1)
    return torch.zeros_like(take).scatter(-1, order, take)


def _swap_rows(scores: Tensor, mask: Tensor, threshold: float) -> tuple[Tensor, SwapStats]:
    """Apply the exact-count swap independently to every row of 2-D ``scores`` / ``mask``."""
    n_pruned = mask.sum(-1)
    n_kept = mask.shape[-1] - n_pruned
    g_order = _side_order(scores, mask, pruned_side=True)
    p_order = _side_order(scores, mask, pruned_side=False)
    g, p = scores.gather(-1, g_order), scores.gather(-1, p_order)
    k, n = _count_swaps(g, p, n_pruned, threshold)
    ties = _boundary_tie(g, n, n_pruned) | _boundary_tie(p, n, n_kept)
    new_mask = (mask & ~_first_n(g_order, n)) | _first_n(p_order, n)
    stats = SwapStats(mask.shape[0], int(k.sum()), int(n.sum()), int(ties.sum()))
    return new_mask, stats


def rebuild_mask(
    scores: Tensor, init_mask: Tensor, threshold: float, granularity: Granularity = "output1"
) -> tuple[Tensor, SwapStats]:
    """Rebuild one matrix's mask with the exact-count Barber swap.

    Args:
        scores: Barber metric S of shape ``(d_out, d_in)`` (see ``barber.barber_scores``).
        init_mask: initial mask M0, bool, ``True`` = pruned, same shape.
        threshold: τ in [0, 1]; the fraction of the K beneficial swaps that is performed.
        granularity: comparison group: ``"output1"`` each row, ``"input1"`` each column, ``"layer"``
            the whole matrix. Use :func:`rebuild_block_masks` for ``"block"``.

    Returns:
        The new mask (a new tensor; the pruned count of every group is unchanged) and its stats.
    """
    _check_threshold(threshold)
    _check_pair(scores, init_mask)
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (d_out, d_in), got shape {tuple(scores.shape)}")
    if granularity == "output1":
        return _swap_rows(scores, init_mask, threshold)
    if granularity == "input1":
        new_mask, stats = _swap_rows(scores.t(), init_mask.t(), threshold)
        return new_mask.t().contiguous(), stats
    if granularity == "layer":
        new_mask, stats = _swap_rows(scores.reshape(1, -1), init_mask.reshape(1, -1), threshold)
        return new_mask.reshape(init_mask.shape), stats
    if granularity == "block":
        raise ValueError("granularity='block' spans several matrices: use rebuild_block_masks")
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def rebuild_block_masks(
    scores_by_name: Mapping[str, Tensor], masks_by_name: Mapping[str, Tensor], threshold: float
) -> tuple[dict[str, Tensor], SwapStats]:
    """Rebuild the masks of all matrices of a block as ONE comparison group (granularity ``"block"``).

    Only the block's total pruned count is preserved; per-matrix counts may drift, as in the reference.
    """
    _check_threshold(threshold)
    if set(scores_by_name) != set(masks_by_name):
        raise ValueError(
            f"scores and masks name different matrices: {sorted(scores_by_name)} vs {sorted(masks_by_name)}"
        )
    names = list(scores_by_name)
    if not names:
        return {}, SwapStats()
    for name in names:
        _check_pair(scores_by_name[name], masks_by_name[name], name)
    flat_scores = torch.cat([scores_by_name[name].float().reshape(-1) for name in names]).unsqueeze(0)
    flat_mask = torch.cat([masks_by_name[name].reshape(-1) for name in names]).unsqueeze(0)
    new_flat, stats = _swap_rows(flat_scores, flat_mask, threshold)
    pieces = torch.split(new_flat.squeeze(0), [masks_by_name[name].numel() for name in names])
    return {name: piece.reshape(masks_by_name[name].shape) for name, piece in zip(names, pieces)}, stats


def rebuild_mask_nm(
    scores: Tensor, init_mask: Tensor, threshold: float, n: int, m: int
) -> tuple[Tensor, SwapStats]:
    """Rebuild an N:M mask: regrow per row, then re-prune inside each group so N:M stays exact.

    Per row, the top-``⌊τ·K⌋`` pruned entries regrow (K from the row's own pruned/kept scores). Then in
    every group of ``m`` consecutive input columns that regrew ``r`` entries, the ``r`` lowest-score
    entries among those kept by ``init_mask`` are pruned. Granularity does not apply to N:M.

    Args:
        scores: Barber metric S, shape ``(d_out, d_in)`` with ``d_in % m == 0``.
        init_mask: an exact N:M mask (``n`` pruned in every group), bool, ``True`` = pruned.
        threshold: τ in [0, 1].
        n, m: the pattern; ``n <= m - n`` so a group always has enough kept entries to re-prune.

    Returns:
        The new mask (still exactly N:M) and stats; ``groups`` counts rows, ``tie_groups`` counts rows
        with a tie at their regrowth boundary or at the re-prune boundary of any of their groups.
    """
    _check_threshold(threshold)
    _check_pair(scores, init_mask)
    if not (0 < n <= m - n):
        raise ValueError(f"N:M rebuild needs 0 < n <= m - n, got n={n}, m={m}")
    if scores.dim() != 2 or scores.shape[1] % m:
        raise ValueError(f"scores must be 2-D with d_in divisible by m={m}, got shape {tuple(scores.shape)}")
    d_out, d_in = scores.shape
    if not (init_mask.reshape(d_out, d_in // m, m).sum(-1) == n).all():
        raise ValueError(f"init_mask is not an exact {n}:{m} mask")

    # Row level: which pruned entries regrow (only the regrowth half of the swap rule is used).
    n_pruned = init_mask.sum(-1)
    g_order = _side_order(scores, init_mask, pruned_side=True)
    p_order = _side_order(scores, init_mask, pruned_side=False)
    g = scores.gather(-1, g_order)
    k, n_swap = _count_swaps(g, scores.gather(-1, p_order), n_pruned, threshold)
    regrow = _first_n(g_order, n_swap)
    row_ties = _boundary_tie(g, n_swap, n_pruned)

    # Group level: prune the r lowest-score originally-kept entries of each group that regrew r.
    grouped_scores = scores.reshape(-1, m)
    grouped_mask = init_mask.reshape(-1, m)
    r = regrow.reshape(-1, m).sum(-1)
    kept_order = _side_order(grouped_scores, grouped_mask, pruned_side=False)
    prune = _first_n(kept_order, r).reshape(d_out, d_in)
    group_ties = _boundary_tie(grouped_scores.gather(-1, kept_order), r, m - grouped_mask.sum(-1))

    new_mask = (init_mask & ~regrow) | prune
    ties = row_ties | group_ties.reshape(d_out, -1).any(-1)
    return new_mask, SwapStats(d_out, int(k.sum()), int(n_swap.sum()), int(ties.sum()))
