"""Pure GRPO core (spec ``grpo_phased_entropy.md`` §7 tests 1-12, 15, 16 at the level of pure functions)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torch.distributions import Categorical

from lit_modules.grpo.entropy import SCHEDULES, ConstMax, ConstMin, MaxToMin, MinToMax, NoEntropy, schedule_from_config
from lit_modules.grpo.loss import (GRPOLossConfig, aggregate, clipped_surrogate, combined_advantages, completion_mask,
                                   group_advantages, grpo_loss, k3_kl, reward_metrics, token_stats)  # fmt: skip
from lit_modules.grpo.rewards import (REWARDS, Accuracy, Format, MajorityVote, RewardSet, SoftSelfConsistency,
                                      TokenEntropy, answers_match, build_reward, extract_answer,
                                      weighted_sum)  # fmt: skip

LN2, LN3, LN4, NAN = math.log(2), math.log(3), math.log(4), math.nan


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("c", [0.0, 1.0, 0.1, -3.7])
def test_constant_group_has_zero_advantage(scale: str, c: float) -> None:
    # [0.1] * 3 has a tiny non-zero float std: the zero must come from detecting the constant group.
    adv = group_advantages(torch.tensor([c] * 3 + [0.0, 1.0, 1.0]), group_size=3, scale=scale, eps=0.0)
    assert not torch.isnan(adv).any() and torch.equal(adv[:3], torch.zeros(3)) and adv[3:].abs().sum() > 0


def test_known_group_batch_scale_none_rewards_and_metrics() -> None:
    r = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    assert group_advantages(r, 4, "group", eps=0.0).tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-6)
    assert group_advantages(r, 4, "none").tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25], abs=1e-6)
    assert group_advantages(r, 4).tolist() == pytest.approx([x / 0.5001 for x in (0.75, -0.25, -0.25, -0.25)])
    batch = torch.tensor([1.0, 0.0, 3.0, 5.0])
    expected = [x / batch.std().item() for x in (0.5, -0.5, -1.0, 1.0)]
    assert group_advantages(batch, 2, "batch", eps=0.0).tolist() == pytest.approx(expected, abs=1e-6)
    adv = group_advantages(torch.tensor([NAN] * 4 + [1.0, NAN, 0.0, 0.0]), group_size=4, eps=0.0)
    std = math.sqrt(1 / 3)  # an all-None group gets 0; valid rewards [1, 0, 0] have mean 1/3, unbiased std sqrt(1/3)
    assert adv.tolist() == pytest.approx([0.0] * 4 + [2 / 3 / std, 0.0, -1 / 3 / std, -1 / 3 / std], abs=1e-6)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="scale='mean'.*group"):
        group_advantages(torch.zeros(4), 2, scale="mean")  # type: ignore[arg-type]
    metrics = reward_metrics(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2)
    assert [metrics[k].item() for k in ("reward", "reward_std", "frac_reward_zero_std")] == pytest.approx(
        [0.75, math.sqrt(0.5) / 2, 0.5])  # fmt: skip
    scores = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert combined_advantages(scores, [2.0, 5.0], 4, eps=0.0).tolist() == pytest.approx([3.0, -1.0, -1.0, -1.0])


def _toy() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Seq 1: 2 tokens with ρ = [1.5, 0.9], A = +1; seq 2: 1 token with ρ = 0.7 plus a pad, A = −1 (ℓ_old = 0)."""
    logp = torch.log(torch.tensor([[1.5, 0.9], [0.7, 1.0]], dtype=torch.float64)).requires_grad_()
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    return logp, torch.zeros_like(logp), torch.tensor([1.0, -1.0], dtype=torch.float64), mask


@pytest.mark.parametrize(("eps_high", "expected"), [
    (0.2, {"grpo": -0.125, "bnpo": -1.3 / 3, "dapo": -1.3 / 3, "dr_grpo": -0.325}),
    (0.28, {"grpo": -0.145, "bnpo": -0.46, "dapo": -0.46, "dr_grpo": -0.345})])  # fmt: skip
def test_hand_computed_loss(eps_high: float, expected: dict[str, float]) -> None:
    logp, old, adv, mask = _toy()
    per_token, clip = clipped_surrogate(torch.exp(logp - old), adv, mask, 0.2, eps_high)
    assert per_token[0].tolist() == pytest.approx([-(1 + eps_high), -0.9]) and per_token[1, 0].item() == 0.8
    clip_stats = [clip[f"clip_ratio/{k}_mean"].item() for k in ("high", "low", "region")]
    assert clip_stats == pytest.approx([1 / 3, 1 / 3, 2 / 3])
    for loss_type, value in expected.items():
        config = GRPOLossConfig(loss_type=loss_type, epsilon_high=eps_high)  # type: ignore[arg-type]
        assert grpo_loss(logp, mask, adv, config, old_logp=old).loss.item() == pytest.approx(value, abs=1e-9), loss_type
    grpo_loss(logp, mask, adv, GRPOLossConfig(), old_logp=old).loss.backward()
    # Only seq 1 token 2 is unclipped: d/dℓ = −ρ·A / (|o|·B) = −0.9 / 4.
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -0.225], [0.0, 0.0]], dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize(("coef", "expected"), [(0.1, -0.211643), (-0.05, -0.081678), (0.0, -0.125)])
def test_entropy_term_on_the_toy(coef: float, expected: float) -> None:
    logp, old, adv, mask = _toy()
    entropy = torch.tensor([[LN2, 0.0], [LN4, 123.0]], dtype=torch.float64)  # 123 sits on the pad: must be ignored
    assert aggregate(entropy, mask, "grpo").item() == pytest.approx(0.866434, abs=1e-6)
    assert aggregate(entropy, mask, "bnpo").item() == pytest.approx(0.693147, abs=1e-6)
    out = grpo_loss(logp, mask, adv, GRPOLossConfig(), old_logp=old, entropy=entropy, entropy_coef=coef)
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.entropy_loss.item() == pytest.approx(-coef * 0.866434, abs=1e-6)
    assert [out.metrics[k].item() for k in ("entropy", "entropy_seq")] == pytest.approx([LN2, 0.866434], abs=1e-6)
    config = GRPOLossConfig(entropy_agg="bnpo")
    token_mean = grpo_loss(logp, mask, adv, config, old_logp=old, entropy=entropy, entropy_coef=coef).loss
    assert token_mean.item() == pytest.approx(-0.125 - coef * LN2, abs=1e-6)


def test_k3_kl_beta_config_validation_and_sequence_ratio() -> None:
    logp = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    kl = k3_kl(logp, torch.tensor([LN2, 0.0, -1.3], dtype=torch.float64))
    assert kl[0].item() == pytest.approx(0.306853, abs=1e-6) and kl[1].item() == 0.0
    kl.sum().backward()
    assert logp.grad[1].item() == 0.0 and (k3_kl(torch.randn(1000), torch.randn(1000)) >= 0).all()
    logp, old, adv, mask = _toy()
    ref = torch.full_like(logp, 0.3)
    out = grpo_loss(logp, mask, adv, GRPOLossConfig(loss_type="bnpo", beta=0.04), old_logp=old, ref_logp=ref)
    kl = k3_kl(logp.detach(), ref)[mask].mean().item()
    assert out.loss.item() == pytest.approx(-1.3 / 3 + 0.04 * kl) and out.metrics["kl"].item() == pytest.approx(kl)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, mask, adv, GRPOLossConfig(beta=0.04), old_logp=old)
    for kwargs, message in [({"loss_type": "ppo"}, r"loss_type='ppo'.*'grpo', 'bnpo', 'dr_grpo', 'dapo'"),
                            ({"epsilon_high": -0.1}, "epsilon_high=-0.1"),
                            ({"entropy_agg": "mean"}, "entropy_agg='mean'")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            GRPOLossConfig(**kwargs)
    assert GRPOLossConfig(loss_type="dapo", entropy_agg="same_as_policy").entropy_loss_type == "dapo"
    logp, old, adv, mask = _toy()
    config = GRPOLossConfig(importance_sampling_level="sequence", epsilon_high=10.0)
    rho1 = math.sqrt(1.5 * 0.9)  # seq 1 shares its geometric-mean ratio; seq 2 stays 0.7 and is clipped at 0.8
    assert grpo_loss(logp, mask, adv, config, old_logp=old).loss.item() == pytest.approx((-rho1 + 0.8) / 2)


def test_entropy_self_certainty_chunking_and_dtypes() -> None:
    for vocab, temperature in [(7, 0.5), (7, 2.0), (49152, 1.0), (49152, 0.7)]:  # 49152 = SmolLM2's lm_head size
        stats = token_stats(torch.full((2, 3, vocab), 1.7), torch.zeros(2, 3, dtype=torch.long), None, temperature,
                            self_certainty=True)  # fmt: skip
        for values in (stats.entropy, stats.self_certainty, -stats.logp):  # uniform logits: H = SC = log V
            assert torch.allclose(values, torch.full((2, 3), math.log(vocab)), atol=1e-4)
    one = torch.zeros(1, 1, dtype=torch.long)
    assert token_stats(torch.tensor([[[0.0, LN3]]]), one).entropy.item() == pytest.approx(0.562335, abs=1e-5)
    peaked = token_stats(torch.tensor([[[1e4, 0.0, 0.0]]]), one)
    assert peaked.entropy.item() == pytest.approx(0.0, abs=1e-6) and peaked.logp.item() == pytest.approx(0.0, abs=1e-6)
    torch.manual_seed(0)
    logits, tokens = torch.randn(3, 5, 11) * 3, torch.randint(0, 11, (3, 5))
    for temperature in (0.7, 1.3):
        stats = token_stats(logits, tokens, temperature=temperature)
        brute = Categorical(logits=logits.double() / temperature).entropy()  # torch's own implementation
        assert torch.allclose(stats.entropy.double(), brute, atol=1e-5)
        brute_logp = torch.log_softmax(logits.double() / temperature, -1).gather(-1, tokens[..., None]).squeeze(-1)
        assert torch.allclose(stats.logp.double(), brute_logp, atol=1e-5)
    half = token_stats(logits, tokens, temperature=0.5).entropy  # T = 0.5 on z is T = 1 on 2z, not T = 1 on z
    assert torch.allclose(half, token_stats(2 * logits, tokens).entropy, atol=1e-5)
    assert not torch.allclose(half, token_stats(logits, tokens).entropy, atol=1e-2)
    sc = token_stats(logits, tokens, self_certainty=True).self_certainty  # self-certainty: ≥ log V, shift-invariant
    assert (sc >= math.log(11) - 1e-5).all()
    assert torch.allclose(sc, token_stats(logits + 5.0, tokens, self_certainty=True).self_certainty, atol=1e-4)
    kl_uniform = (math.log(1 / 11) - torch.log_softmax(logits.double(), -1)).mean(-1)  # KL(U ‖ q)
    assert torch.allclose(sc.double(), kl_uniform + math.log(11), atol=1e-4)
    torch.manual_seed(1)
    logits, tokens, mask = torch.randn(4, 6, 13), torch.randint(0, 13, (4, 6)), torch.rand(4, 6) > 0.3
    full = token_stats(logits, tokens, mask, chunk_size=10_000)
    for chunk in (1, 3, 7):
        part = token_stats(logits, tokens, mask, chunk_size=chunk)
        assert torch.allclose(part.logp, full.logp) and torch.allclose(part.entropy, full.entropy)
    bf16 = token_stats(logits.bfloat16(), tokens)
    assert bf16.entropy.dtype == torch.float32 and bf16.logp.dtype == torch.float32
    assert torch.allclose(bf16.entropy.double(), Categorical(logits=logits.bfloat16().double()).entropy(), atol=1e-5)
    logits = torch.tensor([[[0.0, 1.0, -math.inf]]], requires_grad=True)
    stats = token_stats(logits, torch.zeros(1, 1, dtype=torch.long), entropy_grad=False)
    assert stats.logp.requires_grad and not stats.entropy.requires_grad  # λ = 0: entropy is for logging only
    token_stats(logits, torch.zeros(1, 1, dtype=torch.long)).entropy.sum().backward()
    assert torch.isfinite(logits.grad).all()  # a −inf logit (q = 0) gives no NaN gradient


def test_gradient_locality_and_eos_in_mask() -> None:
    ids = torch.tensor([[4, 2, 0, 0], [4, 5, 6, 2], [5, 5, 5, 5], [2, 2, 0, 0]])  # EOS = 2, then pads / junk
    mask = completion_mask(ids, 2)
    assert mask.int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]]
    torch.manual_seed(3)
    logits = torch.randn(4, 4, 8, requires_grad=True)

    def loss_of(z: Tensor) -> Tensor:
        stats = token_stats(z, ids, mask)
        return grpo_loss(stats.logp, mask, torch.tensor([1.0, -1.0, 0.5, 2.0]), GRPOLossConfig(),
                         entropy=stats.entropy, entropy_coef=0.3).loss  # fmt: skip

    loss_of(logits).backward()
    assert torch.equal(logits.grad[~mask], torch.zeros(int((~mask).sum()), 8))
    assert logits.grad[0, 1].abs().sum() > 0  # the EOS position is trained
    changed = logits.detach().clone()
    changed[~mask] = torch.tensor(float("nan"))  # even garbage after EOS cannot reach the loss
    assert loss_of(changed).item() == loss_of(logits.detach()).item()


def _reference_loss(logp: Tensor, old: Tensor, adv: Tensor, mask: Tensor, loss_type: str, l_max: int) -> Tensor:
    """Independent loop implementation of spec §1.3-1.4 (ε = 0.2, β = λ = 0, one micro-batch)."""
    ratios = [torch.exp(lp - o)[m] for lp, o, m in zip(logp, old, mask)]  # one 1-D tensor of ρ per sequence
    seqs = [[-torch.min(r * a, torch.clamp(r, 0.8, 1.2) * a) for r in rs] for rs, a in zip(ratios, adv)]
    total, count = sum(sum(seq) for seq in seqs), sum(len(seq) for seq in seqs)
    if loss_type == "grpo":
        return sum(sum(seq) / max(1, len(seq)) for seq in seqs) / len(seqs)
    return total / (logp.shape[0] * l_max) if loss_type == "dr_grpo" else total / max(count, 1)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_reduces_to_plain_grpo(loss_type: str) -> None:
    torch.manual_seed(4)
    old = torch.randn(5, 6, dtype=torch.float64) * 0.1 - 2
    logp = (old + torch.randn(5, 6, dtype=torch.float64) * 0.3).requires_grad_()
    mask, adv = torch.rand(5, 6) > 0.3, torch.randn(5, dtype=torch.float64)
    config = GRPOLossConfig(loss_type=loss_type, max_completion_length=8)  # type: ignore[arg-type]
    out = grpo_loss(logp, mask, adv, config, old_logp=old)
    ref = _reference_loss(logp, old, adv, mask, loss_type, 8)
    assert out.loss.item() == pytest.approx(ref.item(), abs=1e-9)
    assert torch.allclose(torch.autograd.grad(out.loss, logp)[0], torch.autograd.grad(ref, logp)[0], atol=1e-9)


@pytest.mark.parametrize(("loss_type", "splits"), [("dapo", [1, 4, 3]), ("grpo", [2, 2, 2, 2]), ("dr_grpo", [4, 4])])
def test_accumulation_invariance(loss_type: str, splits: list[int]) -> None:
    torch.manual_seed(5)
    logp = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    entropy = torch.rand(8, 5, dtype=torch.float64, requires_grad=True)
    mask, adv = torch.rand(8, 5) > 0.4, torch.randn(8, dtype=torch.float64)
    # The entropy term follows the policy's row: a seq-mean entropy term is only invariant for equal micro-batches.
    config = GRPOLossConfig(loss_type=loss_type, entropy_agg="same_as_policy")  # type: ignore[arg-type]

    def grads(chunks: list[int]) -> list[Tensor]:
        logp.grad = entropy.grad = None
        for rows in torch.arange(8).split(chunks):
            out = grpo_loss(logp[rows], mask[rows], adv[rows], config, old_logp=logp[rows].detach() * 0.9,
                            entropy=entropy[rows], entropy_coef=0.1, tokens_per_rank=float(mask.sum()),
                            grad_accum_steps=len(chunks))  # fmt: skip
            out.loss.backward()
        return [logp.grad.clone(), entropy.grad.clone()]

    for whole, split in zip(grads([8]), grads(splits)):
        assert torch.allclose(whole, split, atol=1e-12)


@pytest.mark.parametrize("coef", [0.5, -0.5])
def test_sign_convention_moves_entropy(coef: float) -> None:
    torch.manual_seed(6)
    logits = (torch.randn(4, 3, 10) * 2).requires_grad_()
    tokens, mask = torch.randint(0, 10, (4, 3)), torch.ones(4, 3, dtype=torch.bool)
    before = token_stats(logits.detach(), tokens).entropy.mean().item()
    stats = token_stats(logits, tokens, mask)
    out = grpo_loss(stats.logp, mask, torch.zeros(4), GRPOLossConfig(), entropy=stats.entropy, entropy_coef=coef)
    out.loss.backward()
    with torch.no_grad():
        logits -= 0.5 * logits.grad  # one SGD step with zero advantages: only the entropy term acts
    assert (token_stats(logits.detach(), tokens).entropy.mean().item() > before) == (coef > 0)


def test_schedule_values_resume_statelessness_and_validation() -> None:
    phased, reversed_ = MaxToMin(lam_max=0.01, lam_min=0.02), MinToMax(lam_max=0.01, lam_min=0.02)
    for s, value in [(0, 0.01), (79, 0.01), (80, -0.02), (99, -0.02), (150, -0.02)]:
        assert phased(s, 100) == value and reversed_(s, 100) == (-0.02 if value > 0 else 0.01)
    assert sum(phased(s, 10) > 0 for s in range(10)) == 8
    assert MaxToMin(switch_frac=0.29).switch_step(100) == 29  # 0.29 * 100 floors to 28 without care
    for s in (0, 50, 99, 500):
        assert ConstMax(0.01)(s, 100) == 0.01 and ConstMin(0.02)(s, 100) == -0.02 and NoEntropy()(s, 100) == 0.0
    linear = MaxToMin(lam_max=0.01, lam_min=0.02, transition="linear", width_frac=0.2)
    assert [linear(s, 100) for s in (70, 80, 90)] == pytest.approx([0.01, -0.005, -0.02])
    cosine, mid = MaxToMin(lam_max=0.01, lam_min=0.02, transition="cosine", width_frac=0.2), (0.01 - 0.02) / 2
    for d in range(1, 10):
        assert cosine(80 + d, 100) - mid == pytest.approx(-(cosine(80 - d, 100) - mid))
    assert cosine(80, 100) == pytest.approx(mid) and cosine(60, 100) == 0.01 and cosine(95, 100) == -0.02
    config = {"name": "max_to_min", "lam_max": 0.01, "lam_min": 0.02, "transition": "linear", "width_frac": 0.3}
    uninterrupted = [schedule_from_config(config)(s, 10) for s in range(10)]
    first, second = schedule_from_config(config), schedule_from_config(config)  # a fresh object after "resume"
    assert [first(s, 10) for s in range(6)] + [second(s, 10) for s in range(6, 10)] == uninterrupted
    shuffled = torch.randperm(10, generator=torch.Generator().manual_seed(0)).tolist()
    assert [first(s, 10) for s in shuffled + shuffled] == [uninterrupted[s] for s in shuffled + shuffled]
    assert set(SCHEDULES) == {"none", "const_max", "const_min", "max_to_min", "min_to_max"}
    assert isinstance(schedule_from_config("min_to_max", switch_frac=0.5), MinToMax)
    assert isinstance(schedule_from_config(None), NoEntropy)
    assert schedule_from_config(MaxToMin(lam_max=0.03)).hparams()["lam_max"] == 0.03
    for call, message in [(lambda: schedule_from_config("phased"), r"name='phased'.*max_to_min"),
                          (lambda: MaxToMin(lam_max=-0.01), "lam_max=-0.01"),
                          (lambda: MaxToMin(switch_frac=1.5), "switch_frac=1.5"),
                          (lambda: MaxToMin(transition="step"), "transition='step'.*hard"),
                          (lambda: MaxToMin(transition="cosine"), "width_frac"),
                          (lambda: schedule_from_config("const_max", lam_min=0.1), "bad arguments"),
                          (lambda: MaxToMin()(-1, 10), "step=-1")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize(("text", "answer"), [
    ("<think>2+2</think><answer> 4 </answer>", "4"), ("so \\boxed{\\frac{1}{2}} done", "0.5"),
    ("<answer>1</answer> wait <answer>0.50</answer>", "0.5"), ("The answer is $1,234.", "1234"),
    ("Final answer: 42. Checked 3 times.", "42"), ("I answered 3 times; total 7", "7"), ("x = 5-3 = 2", "2"),
    ("it drops to -7", "-7"), ("<answer>Persian  Cat.</answer>", "persian cat"), ("\\boxed{x^{2}}", "x^{2}"),
    ("<think>..</think><answer>17", "17"), ("no idea", None), ("1,2,3", "3")])  # fmt: skip
def test_answer_extraction(text: str, answer: str | None) -> None:
    assert extract_answer(text) == answer


def test_matching_accuracy_format_and_votes() -> None:
    assert answers_match("0.3333333", "1/3", rel_tol=1e-6) and not answers_match("0.33", "1/3")
    assert answers_match("persian cat", " Persian Cat ") and not answers_match(None, "1")
    completions = ["<answer>12</answer>", "twelve", "<answer>(5, 5)</answer>", "the answer is 12.0"]
    assert Accuracy()([""] * 4, completions, label=["12", "12", [0, 0, 10, 10], None]) == [1.0, 0.0, 1.0, None]
    think = "<think>a</think>"
    good, bad = f"  {think}\n<answer>3</answer>\n", ["<answer>3</answer>", f"{think}<answer></answer>",
                                                       f"{think}<answer>x</answer><answer>3</answer>"]  # fmt: skip
    assert Format()([""] * 4, [good, *bad]) == [1.0, 0.0, 0.0, 0.0]
    assert Format("number")([""] * 2, [good, f"{think}<answer>cat</answer>"]) == [1.0, 0.0]
    completions, groups = ["<answer>a</answer>", "<answer>a</answer>", "<answer>b</answer>", "nothing"], [0, 0, 0, 0]
    assert MajorityVote(last_number=False)([""] * 4, completions, group_ids=groups) == [1.0, 1.0, 0.0, 0.0]
    assert SoftSelfConsistency(last_number=False)([""] * 4, completions, group_ids=groups) == [0.5, 0.5, 0.25, 0.0]
    votes = [f"<answer>{x}</answer>" for x in "abbabaa"]  # groups [a, b], [b, a] tie to the earliest; [b, a, a] -> a
    assert MajorityVote()([""] * 7, votes, group_ids=[0, 0, 1, 1, 2, 2, 2]) == [1, 0, 1, 0, 0, 1, 1]
    assert MajorityVote()([""] * 2, ["x", "y"], group_ids=[3, 3]) == [0.0, 0.0]  # all None
    hybrid = MajorityVote(hybrid=True)
    assert hybrid([""] * 3, completions[:3], group_ids=[0] * 3, label=["b"] * 3) == [0.0, 0.0, 1.0]
    assert hybrid([""] * 3, completions[:3], group_ids=[0] * 3, label=["c"] * 3) == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="group_ids"):
        MajorityVote()([""], ["a"])


def _model_columns() -> dict[str, object]:
    torch.manual_seed(7)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    return {"completion_mask": mask, "token_logp": -torch.rand(3, 4), "token_entropy": torch.rand(3, 4),
            "token_self_certainty": torch.rand(3, 4) + 3, "group_ids": [0, 0, 1], "label": ["1", "2", "3"]}  # fmt: skip


def test_model_statistic_and_label_free_rewards() -> None:
    cols, blank = _model_columns(), [""] * 3
    h = cols["token_entropy"]
    assert TokenEntropy()(blank, blank, **cols)[:2] == pytest.approx([-h[0, :3].mean().item(), -h[1].mean().item()])
    last2 = [-h[0, 1:3].mean().item(), -h[1, 2:].mean().item()]
    assert TokenEntropy("last_k", last_k=2)(blank, blank, **cols)[:2] == pytest.approx(last2)
    assert build_reward("seq_logprob")(blank, blank, **cols)[0] == pytest.approx(cols["token_logp"][0, :3].mean())
    assert build_reward("self_certainty")(blank, blank, **cols)[2] is None  # empty completion: not scorable
    assert all(REWARDS[n].needs_model_stats for n in ("token_entropy", "self_certainty", "seq_logprob"))
    with pytest.raises(ValueError, match="token_entropy"):
        TokenEntropy()([""], [""], completion_mask=cols["completion_mask"][:1])
    assert RewardSet(["accuracy", "self_certainty"]).needs_model_stats and not RewardSet(["accuracy"]).needs_model_stats
    texts, permuted = ["<answer>1</answer>"] * 2 + ["<answer>2</answer>"], {**cols, "label": ["3", "1", "2"]}
    for name in ("token_entropy", "self_certainty", "seq_logprob", "majority_vote", "soft_self_consistency"):
        reward = build_reward(name)  # label-free rewards: permuting the labels changes nothing
        assert reward(blank, texts, **cols) == reward(blank, texts, **permuted), name


def user_length_reward(prompts: list, completions: list[str], scale: float = 1.0, **columns: object) -> list[float]:
    """A user reward reached through its import path."""
    return [scale * len(c) for c in completions]


def test_weighted_sum_registry_and_import_paths() -> None:
    total = weighted_sum(torch.tensor([[1.0, NAN, NAN, 0.0], [0.5, 2.0, NAN, NAN]], dtype=torch.float64), [1.0, 0.5])
    assert total[:2].tolist() == [1.25, 1.0] and math.isnan(total[2]) and total[3].item() == 0.0
    rewards = RewardSet(["accuracy", {"name": "tests.test_grpo_loss.user_length_reward", "scale": 0.1}], [1.0, 2.0])
    assert rewards.names == ["accuracy", "user_length_reward"] and not rewards.needs_model_stats
    assert rewards([""] * 2, ["<answer>4</answer>", "ab"], label=[4, None]) == pytest.approx([1.0 + 2.0 * 1.8, 0.4])
    assert RewardSet(["accuracy"])([""], ["4"], label=[None]) == [None]
    assert isinstance(build_reward({"name": "token_entropy", "span": "last_k"}), TokenEntropy)
    short = RewardSet([lambda prompts, completions, **columns: [1.0]])
    for call, message in [(lambda: build_reward("acc"), "reward='acc'"),
                          (lambda: build_reward("tests.no_such_module.fn"), "could not be imported"),
                          (lambda: short.scores(["", ""], ["a", "b"]), "returned 1 values"),
                          (lambda: RewardSet(["accuracy", "format"], [1.0]), "weights")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            call()


def test_rewards_not_divisible_into_groups_are_refused() -> None:
    """7 rewards cannot come from groups of G = 3: one clear error instead of a silently misaligned reshape."""
    with pytest.raises(ValueError, match=r"divisible by group_size=3: \(7,\)"):
        group_advantages(torch.arange(7.0), group_size=3)


def test_accuracy_takes_a_bare_word_completion_as_its_answer():
    """Classification answers ("blue", "Triangle.") hold no number and no answer tag: the text itself is compared."""
    accuracy = Accuracy()
    assert accuracy.score("Blue.", "blue") == 1.0 and accuracy.score(" triangle", "triangle") == 1.0
    assert accuracy.score("blue", "red") == 0.0 and accuracy.score("", "red") == 0.0
    assert accuracy.score("It is 3", "3") == 1.0  # numbers still win over the whole text


def test_token_stats_renormalise_over_the_tokens_left_in_the_support():
    torch.manual_seed(0)
    logits, tokens = torch.randn(2, 3, 7), torch.tensor([[0, 2, 6], [1, 1, 3]])
    excluded = torch.tensor([4, 5])
    stats = token_stats(logits, tokens, temperature=0.7, self_certainty=True, excluded=excluded)
    allowed = logits[..., [0, 1, 2, 3, 6]] / 0.7
    logq = allowed.log_softmax(-1)
    index = {0: 0, 1: 1, 2: 2, 3: 3, 6: 4}
    expected_logp = logq.gather(-1, tokens.apply_(lambda t: index[t])[..., None]).squeeze(-1)
    torch.testing.assert_close(stats.logp, expected_logp)
    torch.testing.assert_close(stats.entropy, -(logq.exp() * logq).sum(-1))
    torch.testing.assert_close(stats.self_certainty, allowed.logsumexp(-1) - allowed.mean(-1))
