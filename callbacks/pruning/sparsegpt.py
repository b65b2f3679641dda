"""SparseGPT: OBS-style pruning with weight reconstruction from the layer Hessian (spec §2).

Columns are processed left to right in tiles of ``blocksize``; pruning column i leaves an error that is
spread over the not-yet-processed columns through the upper Cholesky factor ``U`` of ``H⁻¹``, so the
layer output ``W X`` changes as little as possible.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from callbacks.calibration.hessian import damped_inverse_cholesky, fix_dead_columns, no_tf32
from callbacks.pruning.patterns import (
    SparsityPattern,
    check_divisible,
    lowest_k_mask,
    resolve_sparsity,
    unstructured_mask,
)

MaskSelection = Literal["tile", "row"]
CHOLESKY_RETRIES = 3


def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float | None,
    pattern: str | SparsityPattern = "unstructured",
    blocksize: int = 128,
    percdamp: float = 0.01,
    mask_selection: MaskSelection = "tile",
    name: str = "weight",
) -> tuple[Tensor, Tensor]:
    """Prune a ``[d_out, d_in]`` weight with SparseGPT; return ``(new_weight, mask)`` (``True`` = pruned).

    Unstructured masks hold exactly ``⌊r·d_out·w⌋`` entries per column tile of width ``w``
    (``mask_selection="tile"``) or ``⌊r·w⌋`` per row per tile (``"row"``); N:M masks exactly N per
    (row, M-group). ``weight`` and ``hessian`` are not modified; the result has ``weight``'s dtype.
    ``name`` only labels error messages (the module's qualified name).
    """
    parsed, ratio = resolve_sparsity(sparsity, pattern)
    _validate_args(weight, hessian, parsed, blocksize, percdamp, mask_selection)
    with no_tf32():
        w = weight.detach().to(torch.float32).clone()
        h, dead = fix_dead_columns(hessian.detach().to(w.device, torch.float32))
        w[:, dead] = 0.0
        upper = _inverse_cholesky_with_retries(h, percdamp, name)
        mask = torch.zeros_like(w, dtype=torch.bool)
        for i1 in range(0, w.shape[1], blocksize):
            i2 = min(i1 + blocksize, w.shape[1])
            _prune_tile(w, upper, mask, i1, i2, parsed, ratio, mask_selection)
    return w.to(weight.dtype), mask


def _validate_args(
    weight: Tensor, hessian: Tensor, pattern: SparsityPattern, blocksize: int, percdamp: float, mask_selection: str
) -> None:
    """Eager checks so a bad option fails before any numerical work."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [d_out, d_in], got shape {tuple(weight.shape)}.")
    d_in = weight.shape[1]
    if hessian.shape != (d_in, d_in):
        raise ValueError(
            f"hessian must have shape ({d_in}, {d_in}) to match weight {tuple(weight.shape)}, "
            f"got {tuple(hessian.shape)}."
        )
    check_divisible(d_in, pattern)
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize={blocksize!r} must be a positive integer (default 128).")
    # N:M groups are chosen inside a tile, so a group must never straddle two tiles.
    if pattern.is_nm and blocksize % pattern.m != 0:
        raise ValueError(f"blocksize={blocksize} must be a multiple of M={pattern.m} for sparsity_type='{pattern}'.")
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not 0 < percdamp < float("inf"):
        raise ValueError(f"percdamp={percdamp!r} must be a positive float (relative damping; default 0.01).")
    if mask_selection not in ("tile", "row"):
        raise ValueError(f"mask_selection={mask_selection!r} is not allowed; allowed: 'tile', 'row'.")


def _inverse_cholesky_with_retries(h: Tensor, percdamp: float, name: str) -> Tensor:
    """``U`` of ``(H + λI)⁻¹`` with ``λ = percdamp·mean(diag H)``, retrying with λ×10 up to 3 times."""
    if not torch.isfinite(h).all():
        raise ValueError(
            f"SparseGPT on {name}: the Hessian has non-finite entries (inf/NaN activations in calibration)."
        )
    mean_diag = torch.diagonal(h).mean().item()
    damp = percdamp * mean_diag
    for _ in range(CHOLESKY_RETRIES + 1):
        upper = damped_inverse_cholesky(h, damp)
        if upper is not None:
            return upper
        damp *= 10.0
    raise torch.linalg.LinAlgError(
        f"SparseGPT on {name}: Cholesky of the damped Hessian failed {CHOLESKY_RETRIES + 1} times "
        f"(last damping {damp / 10.0:.3g} = {damp / 10.0 / mean_diag:.3g}·mean(diag H)); the Hessian is far from "
        "positive definite. Use more calibration samples, a larger percdamp, or exclude this module with `ignore`."
    )


def _prune_tile(
    w: Tensor, upper: Tensor, mask: Tensor, i1: int, i2: int, pattern: SparsityPattern, ratio: float, selection: str
) -> None:
    """Prune columns ``[i1, i2)`` of ``w`` in place, then lazily update the columns right of the tile."""
    w_tile = w[:, i1:i2].clone()
    u_tile = upper[i1:i2, i1:i2]
    u_diag_sq = torch.diagonal(u_tile).square().unsqueeze(0)
    tile_mask = torch.zeros_like(w_tile, dtype=torch.bool)
    if not pattern.is_nm:
        # One selection per tile from the weights as they stand at the tile start (after earlier tiles' updates).
        per = "matrix" if selection == "tile" else "row"
        tile_mask = unstructured_mask(w_tile.square() / u_diag_sq, ratio, per=per)
    pruned = torch.zeros_like(w_tile)
    errors = torch.zeros_like(w_tile)
    for j in range(i2 - i1):
        if pattern.is_nm and j % pattern.m == 0:
            # N:M chooses each group from the CURRENT weights, which include updates from this tile's columns.
            group = slice(j, j + pattern.m)
            scores = w_tile[:, group].square() / u_diag_sq[:, group]
            tile_mask[:, group] = lowest_k_mask(scores, pattern.n)
        column = w_tile[:, j]
        kept = column.masked_fill(tile_mask[:, j], 0.0)
        pruned[:, j] = kept
        err = (column - kept) / u_tile[j, j]
        # OBS update of the remaining columns in this tile; it also turns column j into `kept` (up to rounding).
        w_tile[:, j:] -= err.unsqueeze(1) * u_tile[j, j:].unsqueeze(0)
        errors[:, j] = err
    # Write the exact `kept` values (pruned entries exactly zero, kept ones untouched by rounding).
    w[:, i1:i2] = pruned
    mask[:, i1:i2] = tile_mask
    w[:, i2:] -= errors @ upper[i1:i2, i2:]
