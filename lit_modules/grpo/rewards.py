"""Reward callables (spec §3): ``fn(prompts, completions, **columns) -> list[float | None]``, index-aligned.

``None`` = "not applicable" (e.g. no label); a parse failure scores 0. Rewards with ``needs_model_stats = True`` read
the module's no-grad ``[N, T]`` CPU tensors ``token_logp``, ``token_entropy``, ``token_self_certainty`` and
``completion_mask`` from ``columns``; vote rewards read ``group_ids``. YAML picks rewards by registry name,
``{"name": ..., **args}`` or an import path ``"pkg.module.fn"``.
"""
from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor

RewardFn = Callable[..., list[float | None]]

_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.S | re.I)
_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>((?:(?!</?answer>).)*)</answer>\s*", re.S | re.I)
_PREFIX = re.compile(r"\banswer\b(?:\s+is\b\s*:?|\s*[:：=])\s*([^\n]+)", re.I)
# A minus is a sign only when not preceded by a word or closing bracket: "5-3" has the numbers 5 and 3.
_NUMBER = re.compile(
    r"(?:(?<![\w)\]])-)?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?(?:/\d+)?"
)
_FRAC = re.compile(r"\\d?frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}")
_LATEX_WRAP = re.compile(r"\\(?:text|mathrm|textbf)\{([^{}]*)\}")


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), with nested braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i : j - 1] if depth == 0 else None


def parse_number(text: str) -> float | None:
    """The value of a string that is *only* a number: ``"1,234"``, ``"-0.50"``, ``"$5"``, ``"50%"``, ``"3/4"``,
    ``"\\frac{3}{4}"``, ``"1e3"``; otherwise None."""
    s = _FRAC.sub(r"\1/\2", text.strip()).replace("$", "").replace("\\%", "").rstrip("%").strip().rstrip(".")
    if _NUMBER.fullmatch(s) is None and re.fullmatch(r"-?[\d.]+/-?[\d.]+", s) is None:
        return None
    num, _, den = s.replace(",", "").partition("/")
    try:
        value = float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        return None
    return value if math.isfinite(value) else None


def normalize_answer(text: str) -> str:
    """Strip, drop LaTeX wrappers and a final period, lowercase, collapse whitespace, canonicalise numbers."""
    s = _LATEX_WRAP.sub(r"\1", text.strip())
    s = s.strip().strip("$").removeprefix("\\(").removesuffix("\\)").strip().rstrip(".").strip()
    if s.startswith("\\boxed{") and (inner := _last_boxed(s)) is not None:
        s = inner.strip()
    value = parse_number(s)
    if value is not None:
        # Canonical form so that "0.50", ".5" and "1/2" vote together.
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else format(value, ".12g")
    return " ".join(s.lower().split())


def extract_answer(text: str, last_number: bool = True) -> str | None:
    """Normalised answer of a completion, or None if nothing parses.

    Order: last ``<answer>…</answer>`` (an unclosed final tag counts), last ``\\boxed{}``, last ``answer: X`` /
    ``answer is X`` (up to the line end), and, with ``last_number``, the last number in the text.
    """
    tags = _ANSWER_TAG.findall(text)
    span = tags[-1] if tags else _last_boxed(text)
    if span is None and (prefixes := _PREFIX.findall(text)):
        span = prefixes[-1]
        # "The answer is 42. Done." -> "42": a prefix answer that starts with a number is that number.
        if (lead := _NUMBER.match(span.strip().lstrip("$"))) is not None:
            span = lead.group(0)
    if span is None and last_number and (numbers := _NUMBER.findall(text)):
        span = numbers[-1]
    if span is None:
        return None
    answer = normalize_answer(span)
    return answer or None


def answers_match(pred: str | None, label: Any, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    """Numeric closeness when both sides are numbers, else equality after :func:`normalize_answer`."""
    if pred is None or label is None:
        return False
    label_text = normalize_answer(str(label))
    a, b = parse_number(pred), parse_number(label_text)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)
    return pred == label_text


def _checked(option: str, value: Any, allowed: list[Any]) -> Any:
    """Eager validation of a choice, naming the option, the bad value and what is allowed."""
    if value not in allowed:
        raise ValueError(f"{option}={value!r} is not allowed; choose one of {allowed}.")
    return value


def _point_in_box(pred: str | None, box: Sequence[float]) -> bool:
    """Grounding: the answer's first two numbers (x, y) lie in ``[x1, y1, x2, y2]`` ("(10,200)" is not 10200)."""
    xy = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", pred or "")[:2]]
    return len(xy) == 2 and box[0] <= xy[0] <= box[2] and box[1] <= xy[1] <= box[3]


class Accuracy:
    """``1[match(extract(o_i), label_i)]``; a 4-number label is a box (point-in-box grounding); no label -> None."""

    name = "accuracy"

    def __init__(self, label_key: str = "label", rel_tol: float = 1e-6, abs_tol: float = 1e-9,
                 last_number: bool = True):  # fmt: skip
        self.label_key, self.rel_tol, self.abs_tol, self.last_number = label_key, rel_tol, abs_tol, last_number

    def score(self, completion: str, label: Any) -> float | None:
        """Reward of one completion against one label."""
        if label is None:
            return None
        if isinstance(label, (list, tuple)) and len(label) == 4:
            # A point is two numbers: the answer span if the completion marks one, else the whole text ("the last
            # number" would keep only y).
            return float(_point_in_box(extract_answer(completion, last_number=False) or completion, label))
        # A completion that marks no answer and holds no number is its own answer ("blue" for a colour question).
        pred = extract_answer(completion, self.last_number) or normalize_answer(completion) or None
        return float(answers_match(pred, label, self.rel_tol, self.abs_tol))

    def __call__(self, prompts: list, completions: list[str], **columns: Any) -> list[float | None]:
        labels = columns.get(self.label_key, [None] * len(completions))
        return [self.score(c, y) for c, y in zip(completions, labels)]


class Format:
    """1 if the completion is ``<think>…</think><answer>…</answer>`` (whitespace around ignored) and the answer
    parses (``answer_type="number"``: as a number; ``"any"``: non-empty), else 0."""

    name = "format"

    def __init__(self, answer_type: Literal["any", "number"] = "any"):
        self.answer_type = _checked("answer_type", answer_type, ["any", "number"])

    def score(self, completion: str) -> float:
        """1.0 for a well-formed completion with a parsable answer, else 0.0."""
        match = _FORMAT.fullmatch(completion)
        answer = normalize_answer(match.group(1)) if match else ""
        return float(bool(answer) and (self.answer_type == "any" or parse_number(answer) is not None))

    def __call__(self, prompts: list, completions: list[str], **columns: Any) -> list[float | None]:
        return [self.score(c) for c in completions]


def _stat(columns: dict[str, Any], key: str) -> Tensor:
    """A per-token column as a float64 CPU tensor, with a clear error when the module did not provide it."""
    if key not in columns:
        raise ValueError(f"this reward needs the column {key!r}; the module adds it when needs_model_stats=True.")
    return torch.as_tensor(columns[key]).detach().to("cpu", torch.float64)


def _seq_mean(values: Tensor, mask: Tensor) -> list[float | None]:
    """Masked per-row mean; an empty row (no completion tokens) is not scorable -> None."""
    n, means = mask.sum(dim=1), torch.where(mask > 0, values, 0.0).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return [float(v) if k > 0 else None for v, k in zip(means.tolist(), n.tolist())]


class _TokenMean:
    """Reward = masked mean over the completion of the per-token column ``key``."""

    key = ""
    needs_model_stats = True

    def __call__(self, prompts: list, completions: list[str], **columns: Any) -> list[float | None]:
        return _seq_mean(_stat(columns, self.key), _stat(columns, "completion_mask"))


class SelfCertainty(_TokenMean):
    """INTUITOR: ``(1/|o_i|) Σ_t [logsumexp(z̃_t) − mean_v z̃_t]`` from ``token_self_certainty`` (≥ log V)."""

    name, key = "self_certainty", "token_self_certainty"


class SeqLogProb(_TokenMean):
    """EM-RL-seq: mean token log-prob ``(1/|o_i|) Σ_t ℓ^old`` from ``token_logp``."""

    name, key = "seq_logprob", "token_logp"


class TokenEntropy:
    """RENT / EM-RL-token: ``−H̄_i`` over ``span``: ``all`` tokens, the ``last_k`` tokens, or the ``answer`` tokens
    (the boolean ``answer_mask`` column, ``[N, T]``, which the module derives from token offsets)."""

    name = "token_entropy"
    needs_model_stats = True

    def __init__(self, span: Literal["all", "answer", "last_k"] = "all", last_k: int = 16):
        _checked("span", span, ["all", "answer", "last_k"])
        if last_k < 1:
            raise ValueError(f"last_k={last_k!r} is not allowed; it must be >= 1.")
        self.span, self.last_k = span, last_k

    def __call__(self, prompts: list, completions: list[str], **columns: Any) -> list[float | None]:
        mask = _stat(columns, "completion_mask")
        if self.span == "answer":
            mask = mask * _stat(columns, "answer_mask")
        elif self.span == "last_k":
            from_end = mask.flip(1).cumsum(1).flip(1)  # 1 at the last active token, 2 before it, ...
            mask = mask * (from_end <= self.last_k)
        return [None if h is None else -h for h in _seq_mean(_stat(columns, "token_entropy"), mask)]


def _groups(columns: dict[str, Any], n: int) -> dict[Any, list[int]]:
    """Completion indices per group, in order."""
    ids = columns.get("group_ids")
    if ids is None or len(ids) != n:
        raise ValueError("vote rewards need the column 'group_ids' (one group id per completion).")
    groups: dict[Any, list[int]] = {}
    for i, g in enumerate(ids):
        groups.setdefault(int(g), []).append(i)
    return groups


def majority_answer(answers: Sequence[str | None]) -> str | None:
    """Mode of the non-None answers; ties go to the answer that appears first. All None -> None."""
    counts: dict[str, int] = {}
    for a in answers:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1  # dict order = first appearance, so max() breaks ties to the earliest
    return max(counts, key=counts.__getitem__) if counts else None


class MajorityVote:
    """TTRL: ``r_i = 1[a_i ≡ a*]`` with a* the group's majority answer. ``hybrid``: if some completion of the group
    matches the (noisy) label, reward label matches instead of the vote."""

    name = "majority_vote"

    def __init__(self, hybrid: bool = False, label_key: str = "label", last_number: bool = True):
        self.hybrid, self.label_key, self.last_number = hybrid, label_key, last_number

    def __call__(self, prompts: list, completions: list[str], **columns: Any) -> list[float | None]:
        answers = [extract_answer(c, self.last_number) for c in completions]
        labels = columns.get(self.label_key, [None] * len(completions))
        out: list[float | None] = [0.0] * len(completions)
        for idx in _groups(columns, len(completions)).values():
            hits = [answers_match(answers[i], labels[i]) for i in idx]
            use_label = self.hybrid and any(hits)
            winner = majority_answer([answers[i] for i in idx])
            for i, hit in zip(idx, hits):
                out[i] = float(hit if use_label else winner is not None and answers[i] == winner)
        return out


class SoftSelfConsistency:
    """``r_i = |{j ∈ g : a_j ≡ a_i}| / G``; an unparsable answer scores 0."""

    name = "soft_self_consistency"

    def __init__(self, last_number: bool = True):
        self.last_number = last_number

    def __call__(self, prompts: list, completions: list[str], **columns: Any) -> list[float | None]:
        answers = [extract_answer(c, self.last_number) for c in completions]
        out: list[float | None] = [0.0] * len(completions)
        for idx in _groups(columns, len(completions)).values():
            for i in idx:
                out[i] = sum(answers[j] == answers[i] for j in idx) / len(idx) if answers[i] is not None else 0.0
        return out


_CLASSES = (Accuracy, Format, SelfCertainty, SeqLogProb, TokenEntropy, MajorityVote, SoftSelfConsistency)
REWARDS: dict[str, type] = {cls.name: cls for cls in _CLASSES}
RewardSpec = str | dict[str, Any] | RewardFn


def build_reward(spec: RewardSpec) -> RewardFn:
    """A reward from a registry name, ``{"name": name_or_import_path, **args}``, ``"pkg.module.fn"`` or a callable."""
    if callable(spec) and not isinstance(spec, str):
        return spec
    kwargs: dict[str, Any] = {}
    if isinstance(spec, dict):
        kwargs = dict(spec)
        spec = kwargs.pop("name", None)
    if isinstance(spec, str) and spec in REWARDS:
        target: Any = REWARDS[spec]
    elif isinstance(spec, str) and "." in spec:
        module_name, _, attr = spec.rpartition(".")
        try:
            target = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"reward={spec!r} could not be imported: {err}") from err
    else:
        raise ValueError(f"reward={spec!r} is not allowed; choose one of {sorted(REWARDS)} or a path 'pkg.module.fn'.")
    if isinstance(target, type):
        return target(**kwargs)
    return partial(target, **kwargs) if kwargs else target


def reward_name(fn: RewardFn) -> str:
    """Name used in ``rewards/<name>/mean`` metrics."""
    for obj in (fn, getattr(fn, "func", None)):  # functools.partial keeps the function in .func
        name = getattr(obj, "name", None) or getattr(obj, "__name__", None)
        if isinstance(name, str):
            return name
    return type(fn).__name__


def weighted_sum(scores: Tensor, weights: Sequence[float]) -> Tensor:
    """``sum_then_normalize`` (§3.3): ``r_i = Σ_k w_k r_{k,i}`` over ``[K, N]`` scores, skipping NaN (None) terms;
    NaN when every term of completion i is None (so its advantage is 0)."""
    w = torch.as_tensor(list(weights), dtype=scores.dtype).reshape(-1, 1)
    present = ~torch.isnan(scores)
    total = torch.where(present, scores * w, 0.0).sum(dim=0)
    return torch.where(present.any(dim=0), total, math.nan)


class RewardSet:
    """Several rewards with weights: :meth:`scores` gives the ``[K, N]`` matrix (NaN = None), calling it gives the
    weighted sum as ``list[float | None]`` (so a ``RewardSet`` is itself a reward callable)."""

    def __init__(self, rewards: Sequence[RewardSpec], weights: Sequence[float] | None = None):
        self.fns = [build_reward(r) for r in rewards]
        if not self.fns:
            raise ValueError("rewards=[] is not allowed; give at least one reward.")
        self.weights = [1.0] * len(self.fns) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.fns) or not all(math.isfinite(w) for w in self.weights):
            raise ValueError(f"weights={weights!r} is not allowed; give one finite weight per reward ({len(self.fns)})")
        self.names = [reward_name(fn) for fn in self.fns]
        self.needs_model_stats = any(getattr(fn, "needs_model_stats", False) for fn in self.fns)

    def scores(self, prompts: list, completions: list[str], **columns: Any) -> Tensor:
        """Each reward's values, float64 ``[K, N]``, NaN where a reward returned None."""
        rows = []
        for name, fn in zip(self.names, self.fns):
            values = list(fn(prompts, completions, **columns))
            if len(values) != len(completions):
                raise ValueError(f"reward {name!r} returned {len(values)} values for {len(completions)} completions.")
            rows.append([math.nan if v is None else float(v) for v in values])
        return torch.tensor(rows, dtype=torch.float64).reshape(len(self.fns), len(completions))

    def __call__(self, prompts: list, completions: list[str], **columns: Any) -> list[float | None]:
        total = weighted_sum(self.scores(prompts, completions, **columns), self.weights)
        return [None if math.isnan(v) else v for v in total.tolist()]
