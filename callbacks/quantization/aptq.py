"""APTQ attention-aware Hessians for q/k/v (quantization spec §3.3) and their traces (§4).

With layer input ``X`` ``[T, c]`` (one sequence), ``P_p = X W_pᵀ (+ b_p)`` and the attention output ``O``, the
Gauss–Newton Hessian of ``‖O(Ŵ_p) − O(W_p)‖²`` is estimated with random output probes ``u``: one VJP gives
``G_p = ∂⟨u, O⟩/∂P_p`` for q, k and v at once; ``w_t = E_u‖G_{p,t}‖²`` reweights tokens in GPTQ's Hessian,
``H̃_p = (2/N) Σ_seq Xᵀ diag(w/d_out) X`` (``reduce="token_diag"``), or ``(2/N) E_u[XᵀG GᵀX]/d_out`` (``"gram"``).

Assumptions of :func:`attention_core` (LLaMA / Qwen2 family, as in HF transformers): RoPE in the
``rotate_half`` convention, ``q·cos + rotate_half(q)·sin`` with the model's ``cos``/``sin`` ``[T, head_dim]``
(omit both for no RoPE); query head ``j`` reads KV head ``j // (num_heads / num_key_value_heads)``; causal
mask, no padding; scores scaled by ``1/√head_dim`` unless ``scaling`` is given; no dropout, no softcapping.
Any other attention can be probed by passing its own ``attn_fn`` to :func:`probe_statistics`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

Probe = Literal["rademacher", "gaussian"]
Reduce = Literal["token_diag", "gram"]
ProbeSpace = Literal["attn_out", "o_proj_out"]
PROJECTIONS = ("q", "k", "v")


@dataclass(frozen=True)
class AttentionHeads:
    """Head layout: ``num_heads`` query heads sharing ``num_key_value_heads`` KV heads (GQA), ``head_dim`` each."""

    num_heads: int
    num_key_value_heads: int
    head_dim: int
    scaling: float | None = None

    def __post_init__(self) -> None:
        for option in ("num_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{option}={value!r} is not allowed; allowed: a positive int.")
        if self.num_heads % self.num_key_value_heads != 0:
            raise ValueError(f"num_key_value_heads={self.num_key_value_heads} is not allowed; "
                             f"allowed: a divisor of num_heads={self.num_heads}.")

    @property
    def n_rep(self) -> int:
        """Query heads per KV head, ``|J(k)|``."""
        return self.num_heads // self.num_key_value_heads

    @property
    def scale(self) -> float:
        """Score scaling; ``1/√head_dim`` by default."""
        return self.scaling if self.scaling is not None else 1.0 / math.sqrt(self.head_dim)


def _split_heads(p: Tensor, n_heads: int) -> Tensor:
    """``[T, n·d]`` → ``[n, T, d]``."""
    return p.reshape(p.shape[0], n_heads, -1).transpose(0, 1)


def _rope(x: Tensor, cos: Tensor | None, sin: Tensor | None) -> Tensor:
    """HF ``apply_rotary_pos_emb`` on ``[n, T, d]`` with ``cos``/``sin`` ``[T, d]``; identity when both are None."""
    if cos is None and sin is None:
        return x
    if cos is None or sin is None:
        raise ValueError("cos and sin must be given together (or both omitted for no RoPE).")
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def attention_probs(
    p_q: Tensor, p_k: Tensor, heads: AttentionHeads, cos: Tensor | None = None, sin: Tensor | None = None
) -> Tensor:
    """Causal attention probabilities ``A_j`` of every query head, ``[num_heads, T, T]``."""
    q = _rope(_split_heads(p_q, heads.num_heads), cos, sin)
    k = _rope(_split_heads(p_k, heads.num_key_value_heads), cos, sin)
    k = k.repeat_interleave(heads.n_rep, dim=0)  # query head j reads KV head j // n_rep, like HF repeat_kv
    scores = (q @ k.transpose(1, 2)) * heads.scale
    future = torch.ones_like(scores[0], dtype=torch.bool).triu(1)
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)


def attention_core(
    p_q: Tensor, p_k: Tensor, p_v: Tensor, heads: AttentionHeads, cos: Tensor | None = None, sin: Tensor | None = None
) -> Tensor:
    """``O = concat_h A_h V_{h // n_rep}`` ``[T, num_heads·head_dim]`` (the o_proj input) from one sequence's P."""
    probs = attention_probs(p_q, p_k, heads, cos, sin)
    v = _split_heads(p_v, heads.num_key_value_heads).repeat_interleave(heads.n_rep, dim=0)
    return (probs @ v).transpose(0, 1).reshape(p_q.shape[0], -1)


def make_probes(
    n: int, shape: Sequence[int], probe: Probe, like: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """``n`` probes of ``shape`` with ``E[uuᵀ] = I``: Rademacher ±1 or standard Gaussian, on ``like``'s device."""
    device, size = (generator.device if generator is not None else like.device), (n, *shape)
    if probe == "rademacher":
        u = torch.randint(0, 2, size, generator=generator, device=device).to(like.dtype) * 2 - 1
    else:
        u = torch.randn(size, generator=generator, device=device, dtype=like.dtype)
    return u.to(like.device)


def probe_gradients(
    attn_fn: Callable[..., Tensor], projections: Sequence[Tensor], n_probes: int, probe: Probe = "rademacher",
    generator: torch.Generator | None = None, batch: int = 1,
) -> Iterator[tuple[Tensor, tuple[Tensor, ...]]]:
    """Yield ``(u, (G_q, G_k, G_v))``, ``G_p = ∂⟨u, O⟩/∂P_p``, for ``batch`` probes ``u`` at a time (leading dim).

    One forward builds the graph; each probe is one backward through it (autograd handles softmax, RoPE and
    GQA); ``batch > 1`` vmaps the backward over probes. The probes do not depend on ``batch``. Grad is enabled
    locally because the calibration engine runs under ``no_grad``.
    """
    with torch.enable_grad():
        leaves = [p.detach().requires_grad_(True) for p in projections]
        out = attn_fn(*leaves)
        probes = make_probes(n_probes, out.shape, probe, out, generator)
        for start in range(0, n_probes, batch):
            u, keep = probes[start : start + batch], start + batch < n_probes  # keep the graph for later probes
            if batch == 1:
                grads = torch.autograd.grad(out, leaves, grad_outputs=u[0], retain_graph=keep)
                yield u, tuple(g.unsqueeze(0) for g in grads)
            else:
                yield u, torch.autograd.grad(out, leaves, grad_outputs=u, retain_graph=keep, is_grads_batched=True)


@dataclass
class QKVStatistics:
    """Sums over calibration sequences: ``H̃_p = (2/N)·hessian_sum[p]``, ``tr_p = (2/N)·trace_sum[p]``.

    Sums plus the sample count (not means) so DDP can all-reduce them and batching cannot change the result.
    ``hessian_sum`` is empty when only traces were requested (pass 1 of the two-pass plan).
    """

    hessian_sum: dict[str, Tensor] = field(default_factory=dict)
    trace_sum: dict[str, Tensor] = field(default_factory=dict)
    nsamples: int = 0

    def add_(self, other: QKVStatistics) -> QKVStatistics:
        """Accumulate ``other`` into ``self`` (in place) and return ``self``."""
        for target, source in ((self.hessian_sum, other.hessian_sum), (self.trace_sum, other.trace_sum)):
            for p, value in source.items():
                target[p] = target[p] + value if p in target else value.clone()
        self.nsamples += other.nsamples
        return self

    def hessian(self, p: str) -> Tensor:
        """``H̃_p = (2/N)·Σ`` for projection ``p`` in ``{"q", "k", "v"}``."""
        return self.hessian_sum[p] * (2.0 / self._count())

    def trace(self, p: str) -> float:
        """``tr(I ⊗ H̃_p)``, the trace of the full Hessian of module ``p`` (spec §4)."""
        return float(self.trace_sum[p]) * 2.0 / self._count()

    def _count(self) -> int:
        """N, the number of sequences; an empty accumulator is an error, not a silent zero."""
        if self.nsamples == 0:
            raise RuntimeError("QKVStatistics is empty: no calibration sequence was added.")
        return self.nsamples


def _stat_dtype(x: Tensor) -> torch.dtype:
    """Statistics in fp32, or fp64 for fp64 inputs (the exact tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def token_weighted_gram(x: Tensor, token_weights: Tensor | None = None) -> Tensor:
    """``Xᵀ diag(w) X`` for one sequence ``[T, c]`` (``w = None``: plain ``XᵀX``, the GPTQ Hessian sum)."""
    x = x.to(_stat_dtype(x))
    left = x if token_weights is None else x * token_weights.to(x).unsqueeze(1)
    return left.T @ x


def plain_statistics(x: Tensor, d_outs: Mapping[str, int], with_hessian: bool = True) -> QKVStatistics:
    """``attention_aware=False``: every projection gets the GPTQ Hessian ``XᵀX`` and trace ``d_out·Σ‖x_t‖²``."""
    x = x.detach().to(_stat_dtype(x))
    hessians = {p: token_weighted_gram(x) for p in d_outs} if with_hessian else {}
    return QKVStatistics(hessians, {p: x.square().sum() * d for p, d in d_outs.items()}, 1)


def probe_statistics(
    x: Tensor, projections: Mapping[str, Tensor], attn_fn: Callable[..., Tensor], *, n_probes: int = 4,
    probe: Probe = "rademacher", reduce: Reduce = "token_diag", generator: torch.Generator | None = None,
    with_hessian: bool = True, probe_batch: int = 1,
) -> QKVStatistics:
    """Attention-aware statistics of one sequence from its projection outputs and any attention function.

    ``projections`` maps names (``q``, ``k``, ``v``) to ``P_p`` ``[T, d_out_p]`` in ``attn_fn``'s argument order;
    ``attn_fn(*P)`` returns ``O`` ``[T, ·]``; ``probe_batch`` probes share one (vmapped) backward. ``token_diag``
    keeps ``Σ_t w_t x_t x_tᵀ/d_out`` and trace ``Σ_t w_t‖x_t‖²``; ``gram`` keeps ``E_u[XᵀG GᵀX]/d_out`` and the
    exact GN trace ``E_u‖GᵀX‖²``.
    """
    _check_probe_options(n_probes, probe, reduce, probe_batch)
    x = x.detach().to(_stat_dtype(x))
    names, leaves = list(projections), [p.detach().to(x.dtype) for p in projections.values()]
    sq_grad = {p: x.new_zeros(x.shape[0]) for p in names}
    gram, gram_trace = {p: x.new_zeros(x.shape[1], x.shape[1]) for p in names}, {p: x.new_zeros(()) for p in names}
    for _, grads in probe_gradients(attn_fn, leaves, n_probes, probe, generator, probe_batch):
        for p, g in zip(names, grads):  # g: [probes, T, d_out]
            sq_grad[p] += g.square().sum(dim=(0, 2)) / n_probes
            if reduce == "gram":
                gx = g.transpose(1, 2) @ x  # Gᵀ X, [probes, d_out, c]; its squared norm is ‖J_pᵀu‖²
                gram_trace[p] += gx.square().sum() / n_probes
                if with_hessian:
                    gram[p] += (gx.transpose(1, 2) @ gx).sum(0) / (n_probes * g.shape[2])
    d_out = {p: leaf.shape[1] for p, leaf in zip(names, leaves)}
    if reduce == "gram":
        return QKVStatistics(gram if with_hessian else {}, gram_trace, 1)
    traces = {p: (sq_grad[p] * x.square().sum(dim=1)).sum() for p in names}
    hessians = {p: token_weighted_gram(x, sq_grad[p] / d_out[p]) for p in names} if with_hessian else {}
    return QKVStatistics(hessians, traces, 1)


def _check_probe_options(n_probes: int, probe: str, reduce: str, probe_batch: int) -> None:
    """Eager validation: ``ValueError`` naming the option, the value and what is allowed."""
    for option, value in (("n_probes", n_probes), ("probe_batch", probe_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{option}={value!r} is not allowed; allowed: a positive int.")
    if probe not in ("rademacher", "gaussian"):
        raise ValueError(f"probe={probe!r} is not allowed; allowed: 'rademacher', 'gaussian'.")
    if reduce not in ("token_diag", "gram"):
        raise ValueError(f"reduce={reduce!r} is not allowed; allowed: 'token_diag', 'gram'.")


def project(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``P = X Wᵀ + b`` in the statistics dtype (the q/k/v outputs the probes differentiate against)."""
    dtype = _stat_dtype(x)
    out = x.to(dtype) @ weight.detach().to(dtype).T
    return out if bias is None else out + bias.detach().to(dtype)


def qkv_statistics(
    x: Tensor,
    weights: Mapping[str, Tensor],
    heads: AttentionHeads,
    *,
    biases: Mapping[str, Tensor | None] | None = None,
    cos: Tensor | None = None,
    sin: Tensor | None = None,
    attention_aware: bool = True,
    n_probes: int = 4,
    probe: Probe = "rademacher",
    reduce: Reduce = "token_diag",
    generator: torch.Generator | None = None,
    with_hessian: bool = True,
    probe_batch: int = 1,
    out_weight: Tensor | None = None,
) -> QKVStatistics:
    """q/k/v statistics for inputs ``x`` ``[T, c]`` (one sequence) or ``[B, T, c]`` (B sequences).

    ``weights`` / ``biases`` map ``q``, ``k``, ``v`` to the projection parameters; ``cos``/``sin`` are the RoPE
    tables ``[T, head_dim]`` (``[B, T, head_dim]`` for batched ``x``). ``attention_aware=False`` returns the
    plain GPTQ statistics (spec §3.3 ablation), ignoring the probe options.

    ``out_weight`` (o_proj's weight) moves the probes to o_proj's output (``probe_space="o_proj_out"``): the
    error is then measured where o_proj's own GPTQ Hessian measures it, so q/k/v traces share o_proj's and
    down_proj's units (the residual stream) instead of the attention-output units (spec §4, limitation).
    """
    if set(weights) != set(PROJECTIONS):
        raise ValueError(f"weights must have keys {list(PROJECTIONS)}, got {sorted(weights)}.")
    _check_probe_options(n_probes, probe, reduce, probe_batch)
    seqs = x if x.dim() == 3 else x.unsqueeze(0)
    total = QKVStatistics()
    for b, seq in enumerate(seqs):
        if not attention_aware:
            total.add_(plain_statistics(seq, {p: weights[p].shape[0] for p in PROJECTIONS}, with_hessian))
            continue
        # RoPE tables are [T, d] for one sequence, [B, T, d] for a batch.
        cos_b, sin_b = (t[b] if t is not None and t.dim() == 3 else t for t in (cos, sin))
        proj = {p: project(seq, weights[p], (biases or {}).get(p)) for p in PROJECTIONS}

        w_out = out_weight.detach().to(proj["q"].dtype) if out_weight is not None else None

        def attn_fn(q: Tensor, k: Tensor, v: Tensor, c: Tensor | None = cos_b, s: Tensor | None = sin_b) -> Tensor:
            out = attention_core(q, k, v, heads, c, s)
            return out if w_out is None else out @ w_out.T

        total.add_(probe_statistics(seq, proj, attn_fn, n_probes=n_probes, probe=probe, reduce=reduce,
                                    generator=generator, with_hessian=with_hessian, probe_batch=probe_batch))
    return total


def v_exact_hessian_sum(
    x: Tensor, p_q: Tensor, p_k: Tensor, heads: AttentionHeads, cos: Tensor | None = None, sin: Tensor | None = None
) -> Tensor:
    """``Σ_{j∈J(k)} (A_j X)ᵀ(A_j X)`` for each KV head k, ``[num_key_value_heads, c, c]``, for one sequence.

    ``O`` is linear in ``W_v``, so ``(2/N)·Σ_seq`` of this is the exact Hessian of every row of head k.
    """
    dtype = _stat_dtype(x)
    probs = attention_probs(p_q.to(dtype), p_k.to(dtype), heads, cos, sin)
    ax = probs @ x.to(dtype)  # [H, T, c]
    per_head = ax.transpose(1, 2) @ ax
    return per_head.reshape(heads.num_key_value_heads, heads.n_rep, *per_head.shape[1:]).sum(dim=1)


def v_exact_token_weights(
    p_q: Tensor, p_k: Tensor, heads: AttentionHeads, cos: Tensor | None = None, sin: Tensor | None = None
) -> Tensor:
    """The exact ``w_t = E_u‖G_{v,t}‖² = head_dim·Σ_j Σ_s A_j[s, t]²`` (what v's probes estimate), ``[T]``."""
    dtype = _stat_dtype(p_q)
    probs = attention_probs(p_q.to(dtype), p_k.to(dtype), heads, cos, sin)
    return heads.head_dim * probs.square().sum(dim=(0, 1))
