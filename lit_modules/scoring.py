"""Pure scoring functions: window negative log-likelihood and multiple-choice log-likelihoods."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric


def window_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL of ``[B, T]`` windows and the number of predictions, ``B * (T - 1)``.

    Position t predicts token t+1; the first token of a window has no context and is not predicted.
    """
    shift_logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), targets.reshape(-1), reduction="sum")
    return nll, targets.numel()


class TokenPerplexity(Metric):
    """Token-weighted perplexity: ``exp(sum NLL / number of predicted tokens)`` over all windows and ranks."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, nll_sum: torch.Tensor, count: int) -> None:
        self.nll_sum += nll_sum.detach().to(torch.float64)
        self.count += count

    def compute(self) -> torch.Tensor:
        return torch.exp(self.nll_sum / self.count.clamp(min=1))


def choice_loglikelihoods(
    model: torch.nn.Module, context_ids: list[int], choice_ids: list[list[int]], max_length: int | None = None
) -> torch.Tensor:
    """``log p(choice | context)`` summed over each choice's tokens, one forward for all choices.

    Sequences are ``context + choice``, right-padded; if one is longer than ``max_length`` the context is
    cut from the left, as evaluation harnesses do, so the choice tokens are always scored.
    """
    if not choice_ids or any(len(c) == 0 for c in choice_ids):
        raise ValueError("every choice needs at least one token")
    sequences, starts = [], []
    for choice in choice_ids:
        seq = list(context_ids) + list(choice)
        if max_length is not None and len(seq) > max_length:
            seq = seq[len(seq) - max_length :]
        sequences.append(seq)
        starts.append(len(seq) - len(choice))
    device = next(model.parameters()).device
    width = max(map(len, sequences))
    ids = torch.zeros(len(sequences), width, dtype=torch.long, device=device)
    attention = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, device=device)
        attention[row, : len(seq)] = 1
    logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=attention).logits.float(), dim=-1)
    scores = []
    for row, (seq, start) in enumerate(zip(sequences, starts)):
        positions = torch.arange(start - 1, len(seq) - 1, device=device)
        targets = ids[row, start : len(seq)]
        scores.append(logprobs[row, positions, targets].sum())
    return torch.stack(scores)


def choice_predictions(loglikelihoods: torch.Tensor, choice_chars: list[int]) -> tuple[int, int]:
    """(argmax of log-likelihood, argmax of log-likelihood per character of the choice string)."""
    lengths = torch.tensor(choice_chars, dtype=loglikelihoods.dtype, device=loglikelihoods.device).clamp(min=1)
    return int(loglikelihoods.argmax()), int((loglikelihoods / lengths).argmax())
