"""Second-order calibration statistics shared by SparseGPT (pruning) and GPTQ/APTQ (quantization).

``H = (2/N) Σ_n X_nᵀ X_n`` where N counts calibration *samples* (sequences), not tokens or batches
(pruning spec §2, quantization spec §2.1). The helpers below prepare H for the OBS solvers:
dead-column handling, relative damping and the upper Cholesky factor of ``H⁻¹``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor


class HessianAccumulator:
    """Accumulates ``Σ_n X_nᵀ X_n`` in fp32 plus the sample count; :meth:`hessian` forms ``(2/N)·Σ``.

    Keeping the sum and the count (rather than the reference's running mean) lets DDP all-reduce both and
    makes the result independent of how samples were batched.
    """

    def __init__(self, d_in: int, device: torch.device | str | None = None) -> None:
        self.d_in = d_in
        self.xtx_sum = torch.zeros(d_in, d_in, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add_batch(self, x: Tensor, token_weights: Tensor | None = None) -> None:
        """Add layer inputs ``[B, T, d_in]`` (B samples) or ``[tokens, d_in]`` (one sample).

        ``token_weights`` (``[B, T]`` or ``[tokens]``) gives ``Σ_t w_t x_t x_tᵀ``, the weighted form the
        attention-aware (APTQ) Hessian needs; ``None`` means all ones.
        """
        x, token_weights = _as_samples(x, token_weights, self.d_in)
        # One matmul per sample: the sum is then bit-identical for every DataModule batch size.
        for n, sample in enumerate(x):
            sample = sample.to(self.xtx_sum.device, torch.float32)
            left = sample if token_weights is None else sample * token_weights[n].to(sample).unsqueeze(1)
            self.xtx_sum += left.T @ sample
        self.nsamples += x.shape[0]

    def hessian(self) -> Tensor:
        """``H = (2/N)·Σ_n X_nᵀ X_n`` (a new fp32 tensor); raises if nothing was accumulated."""
        if self.nsamples == 0:
            raise RuntimeError(
                "HessianAccumulator.hessian() called before any add_batch(); no calibration data reached the layer."
            )
        return self.xtx_sum * (2.0 / self.nsamples)


def _as_samples(x: Tensor, token_weights: Tensor | None, d_in: int) -> tuple[Tensor, Tensor | None]:
    """View inputs as ``[samples, tokens, d_in]`` (and weights as ``[samples, tokens]``); 2-D is one sample."""
    if x.dim() == 2:
        x = x.unsqueeze(0)
        token_weights = None if token_weights is None else token_weights.reshape(1, -1)
    if x.dim() != 3 or x.shape[-1] != d_in:
        raise ValueError(f"expected inputs [B, T, {d_in}] or [tokens, {d_in}], got shape {tuple(x.shape)}.")
    if token_weights is not None and token_weights.shape != x.shape[:2]:
        raise ValueError(f"token_weights must have shape {tuple(x.shape[:2])}, got {tuple(token_weights.shape)}.")
    return x.detach(), None if token_weights is None else token_weights.detach()


@contextmanager
def no_tf32() -> Iterator[None]:
    """Disable TF32 matmuls inside the block: the OBS updates and Cholesky need full fp32 (as the references do)."""
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = previous


def fix_dead_columns(hessian: Tensor) -> tuple[Tensor, Tensor]:
    """Return ``(H', dead)``: a copy of H with ``H'[j, j] = 1`` where ``diag(H) == 0``, and the dead-column mask.

    A column that never saw a nonzero input has no curvature; setting its diagonal to 1 keeps H invertible,
    and the caller zeroes the matching weight column (its value cannot affect the layer output).
    """
    h = hessian.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    return h, dead


def damped_inverse_cholesky(hessian: Tensor, damp: float) -> Tensor | None:
    """Upper Cholesky factor ``U`` of ``(H + damp·I)⁻¹`` (so ``U_jj²`` is the OBS inverse-Hessian term).

    Returns ``None`` if a factorisation fails or the result is not finite, so callers choose their own retry
    policy (SparseGPT: ×10 damping; GPTQ: additive increments).
    """
    h = hessian.clone()
    h.diagonal().add_(damp)
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        return None
    h_inv = torch.cholesky_inverse(lower)
    upper, info = torch.linalg.cholesky_ex(h_inv, upper=True)
    if int(info) != 0 or not torch.isfinite(upper).all():
        return None
    return upper
