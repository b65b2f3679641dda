"""Uniform integer weight quantizer (quantization spec §1): asymmetric / symmetric, per-channel or group-wise.

A row ``x`` of one group maps to integer codes ``c = clamp(round(x/s) + z, 0, maxq)`` and back to
``x̂ = s·(c − z)``. Every solver (RTN, GPTQ, APTQ) fits its grids with :func:`fit_params` and rounds with
:func:`quantize_codes`, so the same inputs give bitwise-identical codes whichever solver ran.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

ALLOWED_BITS = (2, 3, 4, 8)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class QuantConfig:
    """The grid: ``bits``, ``group_size`` (−1 = one grid per row), ``sym`` and the optional MSE clipping search.

    ``scale_dtype`` rounds every scale to its storage dtype *before* the zero-point and codes are computed, so
    the in-memory fake-quant weight and an export dequantize identically (spec §1, "scale dtype").
    """

    bits: int = 4
    group_size: int = -1
    sym: bool = False
    mse: bool = False
    grid: int = 100
    maxshrink: float = 0.8
    norm: float = 2.4
    scale_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in ALLOWED_BITS:
            raise ValueError(f"bits={self.bits!r} is not allowed; allowed: {list(ALLOWED_BITS)}.")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or not (
            self.group_size == -1 or self.group_size > 0
        ):
            raise ValueError(
                f"group_size={self.group_size!r} is not allowed; allowed: -1 (per-channel) or a positive int."
            )
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 1:
            raise ValueError(f"grid={self.grid!r} is not allowed; allowed: a positive int (default 100).")
        if not 0.0 < self.maxshrink < 1.0:
            raise ValueError(f"maxshrink={self.maxshrink!r} is not allowed; allowed: a float in (0, 1) (default 0.8).")
        if not 0.0 < self.norm < float("inf"):
            raise ValueError(f"norm={self.norm!r} is not allowed; allowed: a positive float (default 2.4).")
        if self.scale_dtype is not None and self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(
                f"scale_dtype={self.scale_dtype!r} is not allowed; allowed: None or one of {SCALE_DTYPES}."
            )

    @property
    def maxq(self) -> int:
        """Largest code, ``2^b − 1``."""
        return 2**self.bits - 1

    def num_groups(self, in_features: int) -> int:
        """Number of grids per row; raises ``ValueError`` if ``group_size`` does not divide ``in_features``."""
        if self.group_size == -1:
            return 1
        if in_features % self.group_size != 0:
            raise ValueError(
                f"group_size={self.group_size} must divide in_features={in_features}; allowed: -1 or a divisor of "
                f"{in_features} (exporters and serving kernels reject a partial last group)."
            )
        return in_features // self.group_size


@dataclass
class QuantizedWeight:
    """Integer codes ``[r, c]`` (uint8), ``scales`` and ``zeros`` ``[r, n_groups]``, and ``g_idx`` ``[c]``.

    Column ``j`` uses grid ``g_idx[j]``; ``zeros`` holds integer zero-points (uint8). ``scales`` keep the
    compute dtype (fp32, or fp64 for fp64 weights) but carry values already rounded to ``config.scale_dtype``.
    """

    codes: Tensor
    scales: Tensor
    zeros: Tensor
    g_idx: Tensor
    config: QuantConfig

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """``Ŵ = s·(c − z)`` per column's grid, computed in the scales' dtype, then cast to ``dtype``."""
        scales = self.scales[:, self.g_idx]
        zeros = self.zeros[:, self.g_idx]
        w_hat = dequantize_codes(self.codes, scales, zeros)
        return w_hat if dtype is None else w_hat.to(dtype)


def compute_dtype(weight: Tensor) -> torch.dtype:
    """fp64 stays fp64 (exact tests); everything else is solved in fp32."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def fit_params(x: Tensor, config: QuantConfig) -> tuple[Tensor, Tensor]:
    """Scale and zero-point ``(s, z)`` per row of ``x`` ``[rows, n]`` (one group per row); both ``[rows]``.

    ``z`` is returned as a float tensor holding integers. With ``config.mse`` the clipping range is shrunk to
    minimise ``Σ|x̂ − x|^norm`` per row; the unshrunk range is tried first and kept on ties, so MSE clipping
    can never do worse than min–max.
    """
    # Contiguous rows make the per-row error sums independent of how the caller sliced the weight.
    x = x.contiguous()
    xmin = x.min(dim=1).values.clamp(max=0.0)  # 0 is always representable
    xmax = x.max(dim=1).values.clamp(min=0.0)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale, zero = _params_from_range(xmin, xmax, config)
    if not config.mse:
        return scale, zero
    best = _row_error(x, scale, zero, config)
    for i in range(1, int(config.maxshrink * config.grid)):
        shrink = 1.0 - i / config.grid
        cand_scale, cand_zero = _params_from_range(shrink * xmin, shrink * xmax, config)
        err = _row_error(x, cand_scale, cand_zero, config)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, cand_scale, scale)
        zero = torch.where(better, cand_zero, zero)
    return scale, zero


def _params_from_range(xmin: Tensor, xmax: Tensor, config: QuantConfig) -> tuple[Tensor, Tensor]:
    """``(s, z)`` from a clipping range ``xmin ≤ 0 ≤ xmax`` (rows not all zero)."""
    maxq = config.maxq
    if config.sym:
        # Grid s·[−2^(b−1), 2^(b−1)−1]: the largest positive value is clipped by one step, as in the reference.
        scale = _round_scale(2.0 * torch.maximum(-xmin, xmax) / maxq, config)
        return scale, torch.full_like(scale, float(2 ** (config.bits - 1)))
    scale = _round_scale((xmax - xmin) / maxq, config)
    zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def _round_scale(scale: Tensor, config: QuantConfig) -> Tensor:
    """Round ``s`` to the storage dtype; clamp to its smallest normal so a tiny row never divides by zero."""
    if config.scale_dtype is None:
        return scale.clamp(min=torch.finfo(scale.dtype).tiny)
    stored = scale.to(config.scale_dtype).clamp(min=torch.finfo(config.scale_dtype).tiny)
    return stored.to(scale.dtype)


def _row_error(x: Tensor, scale: Tensor, zero: Tensor, config: QuantConfig) -> Tensor:
    """``Σ_j |x̂_j − x_j|^norm`` per row for the grid ``(scale, zero)``."""
    s, z = scale.unsqueeze(1), zero.unsqueeze(1)
    x_hat = dequantize_codes(quantize_codes(x, s, z, config.maxq), s, z)
    return (x_hat - x).abs().pow(config.norm).sum(dim=1)


def quantize_codes(x: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """``clamp(round(x/s) + z, 0, maxq)`` as floats holding integers (``torch.round`` rounds half to even)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def dequantize_codes(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """``s·(c − z)`` in the scale's dtype (codes and zeros may be integer tensors)."""
    return scale * (codes.to(scale.dtype) - zero.to(scale.dtype))


def quantize_weight(weight: Tensor, config: QuantConfig) -> QuantizedWeight:
    """Round-to-nearest over a whole ``[r, c]`` weight: fit each group's grid on the weight and round it.

    ``weight`` is not modified. Groups are consecutive input columns, so ``g_idx[j] = j // group_size``.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [d_out, d_in], got shape {tuple(weight.shape)}.")
    rows, cols = weight.shape
    n_groups = config.num_groups(cols)
    width = cols if config.group_size == -1 else config.group_size
    w = weight.detach().to(compute_dtype(weight))
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=w.device)
    scales = torch.empty(rows, n_groups, dtype=w.dtype, device=w.device)
    zeros = torch.empty(rows, n_groups, dtype=torch.uint8, device=w.device)
    for k in range(n_groups):
        # The same per-group call GPTQ makes, so GPTQ with H = I reproduces these codes bit for bit.
        cols_k = slice(k * width, (k + 1) * width)
        scale, zero = fit_params(w[:, cols_k], config)
        codes_k = quantize_codes(w[:, cols_k], scale.unsqueeze(1), zero.unsqueeze(1), config.maxq)
        codes[:, cols_k] = codes_k.to(torch.uint8)
        scales[:, k], zeros[:, k] = scale, zero.to(torch.uint8)
    g_idx = torch.arange(cols, device=w.device) // width
    return QuantizedWeight(codes, scales, zeros, g_idx, config)


def fake_quantize(weight: Tensor, config: QuantConfig) -> Tensor:
    """``Ŵ = s·(c − z)`` of :func:`quantize_weight`, in ``weight``'s dtype (what the evaluated model runs with)."""
    return quantize_weight(weight, config).dequantize(weight.dtype)
