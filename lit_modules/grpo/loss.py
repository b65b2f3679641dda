"""Pure tensor core of GRPO with a token-entropy term (spec §1–§2): advantages, token statistics, clipped
surrogate, k3 KL, loss aggregation and the total loss ``Agg_pg(l) − λ·Agg_H(H)``.

Shapes: ``N`` completions (``P`` prompts × ``G``), ``T`` completion positions, ``V`` lm_head outputs. A completion
``mask`` is ``[N, T]`` (bool or 0/1), 1 up to and including the first EOS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

AdvantageScale = Literal["group", "batch", "none"]
LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
EntropyAgg = Literal["seq_mean_token_mean", "same_as_policy", "grpo", "bnpo", "dr_grpo", "dapo"]
ImportanceSamplingLevel = Literal["token", "sequence"]


def check_choice(option: str, value: object, choices: object) -> None:
    """Raise ``ValueError`` naming the option, the bad value and the allowed values of a ``Literal``."""
    allowed = get_args(choices)
    if value not in allowed:
        raise ValueError(f"{option}={value!r} is not allowed; choose one of {list(allowed)}.")


@dataclass(frozen=True)
class GroupStats:
    """Per-group reward statistics over the non-NaN rewards (``[P]`` each, float64)."""

    mean: Tensor
    std: Tensor  # unbiased; 0 for groups with fewer than 2 valid rewards
    zero_std: Tensor  # bool: all valid rewards identical (or fewer than 2), so the group carries no ranking


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """``[N]`` rewards as ``[P, G]`` float64 (groups are contiguous blocks of ``G`` completions)."""
    if group_size < 2:
        raise ValueError(f"group_size={group_size} is not allowed; GRPO needs group_size >= 2.")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D, length divisible by group_size={group_size}: {tuple(rewards.shape)}.")
    return rewards.detach().to(torch.float64).reshape(-1, group_size)


def group_stats(rewards: Tensor, group_size: int) -> GroupStats:
    """Mean, unbiased std and the zero-std flag of each group; NaN rewards (all terms None) are left out."""
    r = _grouped(rewards, group_size)
    valid = ~torch.isnan(r)
    n = valid.sum(dim=1)
    mean = torch.where(valid, r, 0.0).sum(dim=1) / n.clamp(min=1)
    var = torch.where(valid, r - mean[:, None], 0.0).pow(2).sum(dim=1) / (n - 1).clamp(min=1)
    # Exact max == min, not std < tol: [0.1] * 3 has a tiny non-zero float std, yet the spec wants A = 0 exactly.
    zero_std = (n < 2) | (torch.where(valid, r, -math.inf).amax(dim=1) == torch.where(valid, r, math.inf).amin(dim=1))
    return GroupStats(mean=mean, std=torch.where(zero_std, 0.0, var.sqrt()), zero_std=zero_std)


def group_advantages(rewards: Tensor, group_size: int, scale: AdvantageScale = "group", eps: float = 1e-4) -> Tensor:
    """``A_i = (r_i − μ_g) / (σ + ε)`` with σ the group std (``group``), the batch std (``batch``) or 1 (``none``).

    Constant groups and NaN rewards get ``A_i = 0`` exactly. Returns float32 ``[N]`` (spec §1.2).
    """
    check_choice("scale", scale, AdvantageScale)
    r = _grouped(rewards, group_size)
    stats = group_stats(rewards, group_size)
    valid = ~torch.isnan(r)
    denom = {"group": lambda: stats.std[:, None] + eps, "batch": lambda: _nan_std(r) + eps, "none": lambda: 1}[scale]()
    adv = torch.where(valid & ~stats.zero_std[:, None], (r - stats.mean[:, None]) / denom, 0.0)
    return adv.reshape(-1).to(torch.float32)


def combined_advantages(
    scores: Tensor, weights: list[float], group_size: int, scale: AdvantageScale = "group", eps: float = 1e-4,
    batch_renormalize: bool = False,
) -> Tensor:  # fmt: skip
    """``normalize_then_sum`` (spec §3.3): ``A = Σ_k w_k Â_k`` over the ``[K, N]`` per-reward scores (NaN = None).

    With ``batch_renormalize`` the sum is divided by its batch std (+ε), as GDPO does.
    """
    if scores.dim() != 2 or scores.shape[0] != len(weights):
        raise ValueError(f"scores must be [K, N] with K = len(weights) = {len(weights)}; got {tuple(scores.shape)}.")
    adv = sum(w * group_advantages(s, group_size, scale, eps) for w, s in zip(weights, scores))
    adv = torch.as_tensor(adv, dtype=torch.float32)
    return adv / (adv.std() + eps) if batch_renormalize and adv.numel() > 1 else adv


def _nan_std(x: Tensor) -> Tensor:
    """Unbiased std of the non-NaN entries (0 when fewer than two)."""
    x = x[~torch.isnan(x)]
    return x.std() if x.numel() > 1 else torch.zeros((), dtype=x.dtype)


def reward_metrics(rewards: Tensor, group_size: int) -> dict[str, Tensor]:
    """TRL-named reward metrics: ``reward`` (mean), ``reward_std`` (mean within-group std), ``frac_reward_zero_std``."""
    stats = group_stats(rewards, group_size)
    return {"reward": rewards.detach().to(torch.float64).nanmean(), "reward_std": stats.std.mean(),
            "frac_reward_zero_std": stats.zero_std.to(torch.float64).mean()}  # fmt: skip


def completion_mask(completion_ids: Tensor, eos_token_id: int | list[int]) -> Tensor:
    """Bool ``[N, T]`` mask: 1 up to and including the first EOS (all 1 for a completion without EOS)."""
    eos = torch.isin(completion_ids, torch.as_tensor(eos_token_id, device=completion_ids.device))
    before = eos.long().cumsum(dim=1) - eos.long()  # number of EOS strictly before each position
    return before == 0


@dataclass
class TokenStats:
    """Per-token statistics of completions, ``[N, T]`` float32, 0 outside the mask."""

    logp: Tensor  # ℓ = log softmax(z/T)[o]
    entropy: Tensor | None  # H = −Σ_v q_v log q_v, q = softmax(z/T), full vocabulary
    self_certainty: Tensor | None  # logsumexp(z/T) − mean_v(z_v/T) = KL(U‖q) + log V


def token_stats(
    logits: Tensor, tokens: Tensor, mask: Tensor | None = None, temperature: float = 1.0, *, entropy: bool = True,
    entropy_grad: bool = True, self_certainty: bool = False, chunk_size: int = 128, excluded: Tensor | None = None,
) -> TokenStats:  # fmt: skip
    """Log-probs (with grad), entropy (with grad iff ``entropy_grad``) and self-certainty (no grad) of ``tokens``.

    ``logits[:, t]`` must be the logits that predict ``tokens[:, t]`` (completion positions only). Math is fp32 and
    runs over at most ``chunk_size`` active positions at a time, so the fp32 copy of ``[positions, V]`` stays small;
    masked-out positions are never computed, so their logits cannot leak into values or gradients. ``excluded``
    token ids are outside the policy's support (generation suppresses them, e.g. image placeholders): every
    quantity renormalises over the other tokens.
    """
    if temperature <= 0 or chunk_size < 1:
        raise ValueError(f"temperature must be > 0 and chunk_size >= 1, got {temperature} and {chunk_size}.")
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be tokens {tuple(tokens.shape)} plus a vocabulary dim.")
    flat_logits, flat_tokens = logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1)
    rows = torch.arange(tokens.numel(), device=logits.device) if mask is None else mask.reshape(-1).nonzero().squeeze(1)
    parts: dict[str, list[Tensor]] = {"logp": [], "entropy": [], "self_certainty": []}
    for start in range(0, rows.numel(), chunk_size):
        idx = rows[start : start + chunk_size]
        z = flat_logits.index_select(0, idx).float() / temperature
        if excluded is not None:
            z = z.index_fill(1, excluded, float("-inf"))
        lse = torch.logsumexp(z, dim=-1)
        parts["logp"].append(z.gather(1, flat_tokens[idx, None]).squeeze(1) - lse)
        if entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                parts["entropy"].append(_entropy(z, lse))
        if self_certainty:
            with torch.no_grad():
                support = z.shape[-1] - (0 if excluded is None else excluded.numel())
                parts["self_certainty"].append(lse - torch.where(z.isfinite(), z, 0.0).sum(dim=-1) / support)

    def scatter(values: list[Tensor]) -> Tensor:
        out = torch.zeros(tokens.numel(), dtype=torch.float32, device=logits.device)
        if values:
            out = out.index_copy(0, rows, torch.cat(values))
        return out.reshape(tokens.shape)

    return TokenStats(scatter(parts["logp"]), scatter(parts["entropy"]) if entropy else None,
                      scatter(parts["self_certainty"]) if self_certainty else None)  # fmt: skip


def _entropy(z: Tensor, lse: Tensor) -> Tensor:
    """``−Σ q log q`` of rows of scaled logits; −inf logits (q = 0) contribute 0 with a finite gradient."""
    logq = z - lse[:, None]
    q = logq.exp()
    # Zero log q where q == 0 *before* multiplying: q·(−inf) is NaN, and masking afterwards still leaks NaN grads.
    return -(q * torch.where(q > 0, logq, 0.0)).sum(dim=-1)


def importance_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor, level: ImportanceSamplingLevel = "token") -> Tensor:
    """``ρ = exp(ℓ − ℓ_old)`` per token, or GSPO's ``exp(mean_t m·(ℓ − ℓ_old))`` broadcast over the sequence."""
    check_choice("importance_sampling_level", level, ImportanceSamplingLevel)
    log_ratio = torch.where(mask.bool(), logp - old_logp, 0.0)
    if level == "sequence":
        lengths = mask.bool().sum(dim=1, keepdim=True).clamp(min=1)
        log_ratio = (log_ratio.sum(dim=1, keepdim=True) / lengths).expand_as(logp)
    return log_ratio.exp()


def clipped_surrogate(
    ratio: Tensor, advantages: Tensor, mask: Tensor, epsilon_low: float = 0.2, epsilon_high: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token ``p = −min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A)`` and TRL's clip fractions (token means in mask)."""
    adv = advantages.reshape(-1, 1).to(ratio.dtype)
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * adv)
    m = mask.bool()
    low = (ratio < 1 - epsilon_low) & (adv < 0) & m
    high = (ratio > 1 + epsilon_high) & (adv > 0) & m
    stats = {"low_mean": low, "high_mean": high, "region_mean": low | high}
    return per_token, {f"clip_ratio/{k}": (v.sum() / m.sum().clamp(min=1)).float() for k, v in stats.items()}


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator ``exp(d) − d − 1`` with ``d = ℓ_ref − ℓ`` (≥ 0, zero value and gradient at d = 0)."""
    # Clamping d keeps exp finite in fp32 when the policy has drifted far; within ±20 the estimator is unchanged.
    d = (ref_logp - logp).clamp(-20.0, 20.0)
    return d.exp() - d - 1


def aggregate(
    x: Tensor, mask: Tensor, loss_type: LossType, *, max_completion_length: int | None = None,
    tokens_per_rank: float | None = None, grad_accum_steps: int = 1,
) -> Tensor:  # fmt: skip
    """``Agg(X)`` of one micro-batch per spec §1.4, including the gradient-accumulation scaling.

    ``grpo``/``bnpo``/``dr_grpo`` are divided by ``grad_accum_steps`` (k). ``dapo`` divides by ``tokens_per_rank`` =
    active tokens of the whole optimizer step / world size, so the summed, DDP-averaged gradient is the global token
    mean; without it (k = W = 1 only) the local token count is used, i.e. ``bnpo``. ``dr_grpo`` uses ``L_max``
    = ``max_completion_length`` (default: the mask width).
    """
    check_choice("loss_type", loss_type, LossType)
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps={grad_accum_steps} must be >= 1.")
    m = mask.bool()
    # where() rather than x·m: a NaN/inf at a padded position must not reach the sum.
    masked = torch.where(m, x, 0.0)
    lengths = m.sum(dim=1).to(x.dtype)
    if loss_type == "grpo":
        value = (masked.sum(dim=1) / lengths.clamp(min=1)).mean()
    elif loss_type == "bnpo":
        value = masked.sum() / lengths.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        value = masked.sum() / (x.shape[0] * (max_completion_length or x.shape[1]))
    else:
        if tokens_per_rank is None and grad_accum_steps > 1:
            raise ValueError("loss_type='dapo' with grad_accum_steps > 1 needs tokens_per_rank (step tokens / W).")
        denom = lengths.sum().clamp(min=1) if tokens_per_rank is None else max(float(tokens_per_rank), 1.0)
        return masked.sum() / denom
    return value / grad_accum_steps


@dataclass(frozen=True)
class GRPOLossConfig:
    """The loss options of spec §1.3–§2.2, validated eagerly (a module builds this in ``__init__``)."""

    loss_type: LossType = "grpo"
    entropy_agg: EntropyAgg = "seq_mean_token_mean"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.0
    importance_sampling_level: ImportanceSamplingLevel = "token"
    max_completion_length: int | None = None

    def __post_init__(self) -> None:
        check_choice("loss_type", self.loss_type, LossType)
        check_choice("entropy_agg", self.entropy_agg, EntropyAgg)
        check_choice("importance_sampling_level", self.importance_sampling_level, ImportanceSamplingLevel)
        for name in ("epsilon_low", "epsilon_high", "beta"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value!r} is not allowed; it must be a finite number >= 0.")
        if self.epsilon_low >= 1:
            raise ValueError(f"epsilon_low={self.epsilon_low!r} is not allowed; it must be < 1 (1 − ε_low > 0).")
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise ValueError(f"max_completion_length={self.max_completion_length!r} must be None or >= 1.")

    @property
    def entropy_loss_type(self) -> LossType:
        """The §1.4 row used for ``Agg_H`` (``seq_mean_token_mean`` is the ``grpo`` row)."""
        if self.entropy_agg == "seq_mean_token_mean":
            return "grpo"
        return self.loss_type if self.entropy_agg == "same_as_policy" else self.entropy_agg


@dataclass
class GRPOLossOutput:
    """``loss`` (with grad) = ``policy_loss + entropy_loss``; both terms and the metrics are detached.

    Loss terms are this micro-batch's *contribution* (already scaled for accumulation: sum them over micro-batches);
    metrics are micro-batch token means, with ``num_tokens`` to weight them.
    """

    loss: Tensor
    policy_loss: Tensor  # Agg_pg(p + β·k3)
    entropy_loss: Tensor  # λ·L_ent = −λ·Agg_H(H)
    metrics: dict[str, Tensor]


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask.bool(), x, 0.0).sum() / mask.bool().sum().clamp(min=1)


def grpo_loss(
    logp: Tensor, mask: Tensor, advantages: Tensor, config: GRPOLossConfig, *, old_logp: Tensor | None = None,
    ref_logp: Tensor | None = None, entropy: Tensor | None = None, entropy_coef: float = 0.0,
    tokens_per_rank: float | None = None, grad_accum_steps: int = 1,
) -> GRPOLossOutput:  # fmt: skip
    """``L = Agg_pg(p + β·k3) − λ·Agg_H(H)`` of one micro-batch (§1.5): λ > 0 raises entropy, λ < 0 lowers it.

    ``old_logp=None`` means μ = 1 (ℓ_old = stopgrad ℓ). ``ref_logp`` is required iff ``config.beta > 0``;
    ``entropy`` is required iff ``entropy_coef != 0`` and is otherwise only logged.
    """
    if config.beta > 0 and ref_logp is None:
        raise ValueError(f"beta={config.beta} > 0 needs ref_logp (reference-model log-probs).")
    if entropy_coef != 0 and entropy is None:
        raise ValueError(f"entropy_coef={entropy_coef} != 0 needs the per-token entropy tensor.")
    agg = dict(max_completion_length=config.max_completion_length, tokens_per_rank=tokens_per_rank,
               grad_accum_steps=grad_accum_steps)  # fmt: skip
    old = logp.detach() if old_logp is None else old_logp
    ratio = importance_ratio(logp, old, mask, config.importance_sampling_level)
    per_token, metrics = clipped_surrogate(ratio, advantages, mask, config.epsilon_low, config.epsilon_high)
    if ref_logp is not None:
        kl = k3_kl(logp, ref_logp)
        metrics["kl"] = _masked_mean(kl, mask).detach()
        if config.beta > 0:
            per_token = per_token + config.beta * kl
    policy_loss = aggregate(per_token, mask, config.loss_type, **agg)
    loss = policy_loss
    entropy_loss = torch.zeros((), device=logp.device)
    if entropy is not None:
        metrics["entropy"] = _masked_mean(entropy, mask).detach()
        lengths = mask.bool().sum(dim=1).clamp(min=1)
        metrics["entropy_seq"] = (torch.where(mask.bool(), entropy, 0.0).sum(dim=1) / lengths).mean().detach()
        if entropy_coef != 0:
            entropy_loss = -entropy_coef * aggregate(entropy, mask, config.entropy_loss_type, **agg)
            loss = loss + entropy_loss
    metrics["entropy_coef"] = torch.tensor(float(entropy_coef))
    metrics["num_tokens"] = mask.bool().sum().detach()
    return GRPOLossOutput(loss, policy_loss.detach(), entropy_loss.detach(), metrics)
