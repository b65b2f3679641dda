"""Wanda: score ``|W_ij|·‖X_j‖₂`` from calibration inputs, per-row selection, no weight update (spec §2)."""

from __future__ import annotations

import torch
from torch import Tensor

from callbacks.pruning.patterns import SparsityPattern, check_divisible, pattern_mask, resolve_sparsity


class WandaStats:
    """Running per-input-feature squared norm ``s_j = (1/N) Σ_n Σ_t X_n[t, j]²`` over N calibration samples.

    A sample is one sequence: ``[B, T, d_in]`` adds B samples, ``[tokens, d_in]`` adds one. The fp32 sum and the
    sample count are kept separately (and can be all-reduced across ranks); :meth:`col_sq_norm` divides at the end.
    """

    def __init__(self, d_in: int, device: torch.device | str | None = None) -> None:
        self.d_in = d_in
        self.sq_sum = torch.zeros(d_in, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add_batch(self, x: Tensor) -> None:
        """Accumulate a batch of layer inputs, ``[B, T, d_in]`` or ``[tokens, d_in]``."""
        x = _as_samples(x, self.d_in)
        # One sample at a time so the sum (and hence the mask) is bit-identical for any DataModule batch size.
        for sample in x:
            self.sq_sum += sample.to(self.sq_sum.device, torch.float32).pow(2).sum(dim=0)
        self.nsamples += x.shape[0]

    def col_sq_norm(self) -> Tensor:
        """The mean ``s_j`` (shape ``[d_in]``); raises if nothing was accumulated."""
        if self.nsamples == 0:
            raise RuntimeError(
                "WandaStats.col_sq_norm() called before any add_batch(); no calibration data reached the layer."
            )
        return self.sq_sum / self.nsamples


def _as_samples(x: Tensor, d_in: int) -> Tensor:
    """View layer inputs as ``[samples, tokens, d_in]``; a 2-D input is a single sample."""
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3 or x.shape[-1] != d_in:
        raise ValueError(f"expected inputs [B, T, {d_in}] or [tokens, {d_in}], got shape {tuple(x.shape)}.")
    return x.detach()


def wanda_scores(weight: Tensor, col_sq_norm: Tensor) -> Tensor:
    """``S_ij = |W_ij|·sqrt(s_j)`` in fp32 (same ranking as ``|W|·‖X_j‖₂``)."""
    if col_sq_norm.shape != (weight.shape[1],):
        raise ValueError(
            f"col_sq_norm must have shape ({weight.shape[1]},) to match weight {tuple(weight.shape)}, "
            f"got {tuple(col_sq_norm.shape)}."
        )
    norms = col_sq_norm.detach().to(weight.device, torch.float32).sqrt()
    return weight.detach().float().abs() * norms.unsqueeze(0)


def wanda_mask(
    weight: Tensor,
    col_sq_norm: Tensor,
    sparsity: float | None,
    pattern: str | SparsityPattern = "unstructured",
) -> Tensor:
    """Wanda mask (``True`` = pruned): ``⌊r·d_in⌋`` lowest scores per output row, or N:M on the scores."""
    parsed, ratio = resolve_sparsity(sparsity, pattern)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [d_out, d_in], got shape {tuple(weight.shape)}.")
    check_divisible(weight.shape[1], parsed)
    # Per output row: the reference's comparison group, which keeps every output neuron equally sparse.
    return pattern_mask(wanda_scores(weight, col_sq_norm), ratio, parsed, per="row")
