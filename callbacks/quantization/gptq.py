"""GPTQ: second-order rounding with error feedback from the layer Hessian (quantization spec §2.2–2.4).

Columns are quantized one at a time; each column's rounding error is spread over the not-yet-quantized
columns through the upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``), so ``W X`` changes as little as
possible. Updates right of a block of ``blocksize`` columns are applied lazily, once per block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from callbacks.calibration.hessian import damped_inverse_cholesky, fix_dead_columns, no_tf32
from callbacks.quantization.quantizer import (
    QuantConfig,
    QuantizedWeight,
    compute_dtype,
    dequantize_codes,
    fit_params,
    quantize_codes,
)
from callbacks.quantization.rtn import rtn_quantize

GroupRefit = Literal["block_start", "current"]
OnFailure = Literal["rtn", "raise"]


@dataclass
class GPTQResult:
    """Outcome of one GPTQ solve.

    ``weight`` is ``Ŵ`` in the input weight's dtype (bitwise ``quantized.dequantize()`` before the cast);
    ``loss`` is ``Σ_j loss_j = ½·tr(ΔW·H_damped·ΔWᵀ)``; ``damp_used`` the relative damping λ that factorised
    (``None`` after a fallback); ``fallback`` is True when H could not be factorised and RTN was used;
    ``perm`` is the act-order permutation π (``None`` = natural order).
    """

    weight: Tensor
    quantized: QuantizedWeight
    loss: float
    damp_used: float | None
    fallback: bool
    perm: Tensor | None


def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    config: QuantConfig,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    damp_increment: float = 0.01,
    act_order: bool = True,
    static_groups: bool = True,
    group_refit: GroupRefit = "block_start",
    perm: Tensor | None = None,
    on_failure: OnFailure = "rtn",
    name: str = "weight",
) -> GPTQResult:
    """Quantize ``weight`` ``[r, c]`` with GPTQ given ``hessian`` ``[c, c]``; neither input is modified.

    Damping is ``λ·mean(diag H)``, starting at ``λ = percdamp``; when the Cholesky factorisation fails λ grows by
    ``damp_increment`` while λ < 1. If it still fails, or H is non-finite, ``on_failure="rtn"`` returns RTN with
    ``fallback=True`` and ``"raise"`` raises ``torch.linalg.LinAlgError``. ``perm`` imposes a column order
    (used to share one act-order across heads); by default act-order sorts by decreasing ``diag(H)``.
    Computation is fp32 (fp64 for fp64 inputs) with TF32 off. ``name`` only labels messages.
    """
    _validate(weight, hessian, config, blocksize, percdamp, damp_increment, group_refit, on_failure, perm)
    with no_tf32():
        w = weight.detach().to(compute_dtype(weight)).clone()
        h = hessian.detach().to(w.device, w.dtype)
        if not torch.isfinite(h).all():
            return _failure(weight, config, on_failure, f"GPTQ on {name}: the Hessian has non-finite entries.")
        # Per-channel grids come from the original weight (dead columns included), as in the reference.
        channel = fit_params(w, config) if config.group_size == -1 else None
        h, dead = fix_dead_columns(h)
        w[:, dead] = 0.0  # no input ever reaches these columns, so their value cannot matter
        static = _static_params(w, config) if static_groups and config.group_size != -1 else None
        order = _column_order(h, act_order, perm)
        if order is not None:
            w, h = w[:, order], h[order][:, order]
        upper, damp = _inverse_cholesky(h, percdamp, damp_increment)
        if upper is None:
            return _failure(
                weight, config, on_failure,
                f"GPTQ on {name}: Cholesky of the damped Hessian failed for every λ from {percdamp} in steps of "
                f"{damp_increment} up to 1; the Hessian is far from positive definite. Use more calibration samples, "
                "a larger percdamp, or exclude this module.",
            )
        solver = _Solver(w, upper, config, blocksize, order, channel, static, group_refit)
        quantized, w_hat, loss = solver.run()
    return GPTQResult(w_hat.to(weight.dtype), quantized, loss, damp, False, order)


def _validate(
    weight: Tensor, hessian: Tensor, config: QuantConfig, blocksize: int, percdamp: float,
    damp_increment: float, group_refit: str, on_failure: str, perm: Tensor | None,
) -> None:
    """Eager checks so a bad option fails before any numerical work."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [d_out, d_in], got shape {tuple(weight.shape)}.")
    cols = weight.shape[1]
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian must have shape ({cols}, {cols}) to match weight, got {tuple(hessian.shape)}.")
    config.num_groups(cols)
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize={blocksize!r} is not allowed; allowed: a positive int (default 128).")
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not 0 <= percdamp < float("inf"):
        raise ValueError(f"percdamp={percdamp!r} is not allowed; allowed: a float >= 0 (default 0.01).")
    if isinstance(damp_increment, bool) or not isinstance(damp_increment, (int, float)) or not damp_increment > 0:
        raise ValueError(f"damp_increment={damp_increment!r} is not allowed; allowed: a float > 0 (default 0.01).")
    if group_refit not in ("block_start", "current"):
        raise ValueError(f"group_refit={group_refit!r} is not allowed; allowed: 'block_start', 'current'.")
    if on_failure not in ("rtn", "raise"):
        raise ValueError(f"on_failure={on_failure!r} is not allowed; allowed: 'rtn', 'raise'.")
    if perm is not None and not torch.equal(torch.sort(perm.cpu()).values, torch.arange(cols)):
        raise ValueError(f"perm must be a permutation of range({cols}), got {perm.tolist()}.")


def _failure(weight: Tensor, config: QuantConfig, on_failure: str, message: str) -> GPTQResult:
    """RTN stand-in for a Hessian that cannot be used (flagged), or a clear error."""
    if on_failure == "raise":
        raise torch.linalg.LinAlgError(message)
    quantized = rtn_quantize(weight, config)
    return GPTQResult(quantized.dequantize(weight.dtype), quantized, float("nan"), None, True, None)


def _static_params(w: Tensor, config: QuantConfig) -> list[tuple[Tensor, Tensor]]:
    """One grid per group, fitted up front on the original column order (static groups)."""
    g = config.group_size
    return [fit_params(w[:, k : k + g], config) for k in range(0, w.shape[1], g)]


def _column_order(h: Tensor, act_order: bool, perm: Tensor | None) -> Tensor | None:
    """π: the given order, else decreasing ``diag(H)`` (stable, so equal curvature keeps natural order)."""
    if perm is not None:
        return perm.to(h.device, torch.long)
    if not act_order:
        return None
    return torch.argsort(-torch.diagonal(h), stable=True)


def _inverse_cholesky(h: Tensor, percdamp: float, increment: float) -> tuple[Tensor | None, float | None]:
    """``U`` of ``(H + λ·mean(diag H)·I)⁻¹`` for the first λ in ``percdamp, +increment, …`` (< 1) that works."""
    mean_diag = torch.diagonal(h).mean().item()
    lam, attempt = percdamp, 0
    while attempt == 0 or lam < 1.0:
        upper = damped_inverse_cholesky(h, lam * mean_diag)
        if upper is not None:
            return upper, lam
        attempt += 1
        lam = percdamp + attempt * increment  # no running sum: λ stays exact multiples of the increment
    return None, None


class _Solver:
    """The column loop of spec §2.2 over a (permuted) working copy ``w``; one instance per solve."""

    def __init__(
        self, w: Tensor, upper: Tensor, config: QuantConfig, blocksize: int, order: Tensor | None,
        channel: tuple[Tensor, Tensor] | None, static: list[tuple[Tensor, Tensor]] | None, refit: str,
    ) -> None:
        self.w, self.upper, self.config, self.blocksize = w, upper, config, blocksize
        rows, cols = w.shape
        self.order = order if order is not None else torch.arange(cols, device=w.device)
        self.source_column = self.order.tolist()  # host copy: no device sync per column
        self.channel, self.static, self.refit = channel, static, refit
        n_groups = config.num_groups(cols)
        self.scales = torch.zeros(rows, n_groups, dtype=w.dtype, device=w.device)
        self.zeros = torch.zeros(rows, n_groups, dtype=w.dtype, device=w.device)
        self.group_of = torch.zeros(cols, dtype=torch.long, device=w.device)  # by solve position
        self.codes = torch.zeros(rows, cols, dtype=w.dtype, device=w.device)
        self.w_hat = torch.zeros_like(w)
        self.loss = torch.zeros((), dtype=w.dtype, device=w.device)

    def run(self) -> tuple[QuantizedWeight, Tensor, float]:
        """Solve all blocks, then undo π: codes / Ŵ return to the original column order."""
        cols = self.w.shape[1]
        for i1 in range(0, cols, self.blocksize):
            self._block(i1, min(i1 + self.blocksize, cols))
        codes = torch.empty_like(self.codes)
        w_hat = torch.empty_like(self.w_hat)
        g_idx = torch.empty_like(self.group_of)
        codes[:, self.order], w_hat[:, self.order], g_idx[self.order] = self.codes, self.w_hat, self.group_of
        quantized = QuantizedWeight(
            codes.to(torch.uint8), self.scales, self.zeros.to(torch.uint8), g_idx, self.config
        )
        return quantized, w_hat, float(self.loss)

    def _block(self, i1: int, i2: int) -> None:
        """Quantize columns ``[i1, i2)`` with in-block error feedback, then update the columns right of it."""
        w_b = self.w[:, i1:i2].clone()
        u_b = self.upper[i1:i2, i1:i2]
        errors = torch.zeros_like(w_b)
        for j in range(i2 - i1):
            scale, zero = self._grid(i1 + j, w_b, errors, i1, i2)
            column = w_b[:, j]
            codes = quantize_codes(column, scale, zero, self.config.maxq)
            q = dequantize_codes(codes, scale, zero)
            self.codes[:, i1 + j], self.w_hat[:, i1 + j] = codes, q
            d = u_b[j, j]
            self.loss += (column - q).square().sum() / (2 * d * d)
            err = (column - q) / d
            # OBS update of this block's remaining columns (column j itself becomes q up to rounding).
            w_b[:, j:] -= err.unsqueeze(1) * u_b[j, j:].unsqueeze(0)
            errors[:, j] = err
        self.w[:, i2:] -= errors @ self.upper[i1:i2, i2:]

    def _grid(self, pos: int, w_b: Tensor, errors: Tensor, i1: int, i2: int) -> tuple[Tensor, Tensor]:
        """``(s, z)`` for solve position ``pos``; records the column's group and the group's grid."""
        g = self.config.group_size
        if g == -1:
            gid = 0
            self.scales[:, 0], self.zeros[:, 0] = self.channel
        elif self.static is not None:
            gid = self.source_column[pos] // g  # static grids follow the original column order
            self.scales[:, gid], self.zeros[:, gid] = self.static[gid]
        else:
            gid = pos // g  # dynamic grids follow the solve order, so act-order needs g_idx
            if pos % g == 0:
                source = self._refit_source(pos, w_b, errors, i1, i2)
                self.scales[:, gid], self.zeros[:, gid] = fit_params(source, self.config)
        self.group_of[pos] = gid
        return self.scales[:, gid], self.zeros[:, gid]

    def _refit_source(self, pos: int, w_b: Tensor, errors: Tensor, i1: int, i2: int) -> Tensor:
        """Columns ``[pos, pos+g)`` to fit a dynamic group on.

        ``block_start`` (reference parity) reads ``W`` without this block's own updates; ``current`` applies them,
        including the pending lazy update for columns right of the block. Both agree when g is a multiple of B.
        """
        end = pos + self.config.group_size
        if self.refit == "block_start":
            return self.w[:, pos:end]
        inside = w_b[:, pos - i1 :]
        if end <= i2:
            return inside[:, : end - pos]
        outside = self.w[:, i2:end] - errors @ self.upper[i1:i2, i2:end]
        return torch.cat([inside, outside], dim=1)


def gptq_quantize_heads(weight: Tensor, hessians: Tensor, config: QuantConfig, **options: object) -> GPTQResult:
    """GPTQ with one Hessian per block of rows, e.g. v_proj with the exact per-KV-head Hessians (spec §3.3).

    ``weight`` ``[n·d, c]`` is split into ``n = hessians.shape[0]`` equal row blocks, block k solved with
    ``hessians[k]``; ``options`` are :func:`gptq_quantize`'s. Act-order with dynamic groups would give each
    head its own ``g_idx``, which no format stores, so one π from the head-averaged diagonal is shared.
    If any head falls back, the whole weight falls back to RTN (one consistent grid layout).
    """
    if hessians.dim() != 3 or weight.dim() != 2 or weight.shape[0] % hessians.shape[0] != 0:
        raise ValueError(
            f"hessians must be [n_heads, c, c] with n_heads dividing d_out; got weight {tuple(weight.shape)}, "
            f"hessians {tuple(hessians.shape)}."
        )
    dynamic_act_order = options.get("act_order", True) and not options.get("static_groups", True)
    if dynamic_act_order and config.group_size != -1 and options.get("perm") is None:
        mean_diag = torch.diagonal(hessians, dim1=1, dim2=2).mean(dim=0)
        options = {**options, "perm": torch.argsort(-mean_diag, stable=True)}
    blocks = weight.chunk(hessians.shape[0], dim=0)
    results = [gptq_quantize(w_k, h_k, config, **options) for w_k, h_k in zip(blocks, hessians)]
    if any(r.fallback for r in results):
        quantized = rtn_quantize(weight, config)
        return GPTQResult(quantized.dequantize(weight.dtype), quantized, float("nan"), None, True, None)
    quantized = QuantizedWeight(
        torch.cat([r.quantized.codes for r in results]),
        torch.cat([r.quantized.scales for r in results]),
        torch.cat([r.quantized.zeros for r in results]),
        results[0].quantized.g_idx,
        config,
    )
    shared_perm = options.get("perm")  # per-head act-order permutations differ, so only a shared one is reported
    return GPTQResult(
        torch.cat([r.weight for r in results]), quantized, sum(r.loss for r in results),
        max(r.damp_used for r in results if r.damp_used is not None), False, shared_perm,
    )
