"""GRPOModule on a tiny random LLaMA (no chat template: prompts are plain text), hand-built RLVR batches."""

from __future__ import annotations

import math
import re

import pytest
import torch
from lightning import LightningDataModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader

from lit_modules.grpo.entropy import ConstMax, MaxToMin
from lit_modules.grpo.module import GRPOModule
from lit_modules.grpo.rollout import Rollout, first_eos_mask, reward_columns

PROMPTS = ["What is 2 + 3? Answer:", "What is 12 + 7? Answer:"]


def _train_batch(i: int) -> dict[str, list]:
    return {"prompt": PROMPTS, "question": ["2 + 3", "12 + 7"], "label": ["6", "19"], "clean_label": ["5", "19"],
            "is_corrupted": [True, False], "id": [f"a{i}", f"b{i}"]}  # fmt: skip


class HandBatches(LightningDataModule):
    """Two train batches (one corrupted row each) and one clean validation batch, in the RLVR batch format."""

    def train_dataloader(self):
        return DataLoader([_train_batch(0), _train_batch(1)], batch_size=None)

    def val_dataloader(self):
        batch = {"prompt": PROMPTS, "question": ["2 + 3", "12 + 7"], "label": ["5", "19"], "clean_label": ["5", "19"],
                 "id": ["v0", "v1"]}  # fmt: skip
        return DataLoader([batch], batch_size=None)


class LabelBlindReward:
    """A user reward: fails if evaluation-only columns leak; otherwise varies with the text so groups differ."""

    name = "label_blind"

    def __init__(self):
        self.calls = 0

    def __call__(self, prompts, completions, **columns):
        assert "clean_label" not in columns and "is_corrupted" not in columns, sorted(columns)
        assert len(prompts) == len(completions) == len(columns["label"]) == len(columns["group_ids"])
        self.calls += 1
        return [float(len(c) % 3) for c in completions]


class Recorder(Logger):
    """In-memory logger: every ``log_metrics`` row, in order."""

    def __init__(self):
        super().__init__()
        self.rows: list[dict[str, float]] = []

    name, version = "recorder", 0

    def log_metrics(self, metrics, step=None):
        self.rows.append(dict(metrics))

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def series(self, key: str) -> list[float]:
        return [row[key] for row in self.rows if key in row]


class StopAt(Callback):
    """Stop once ``global_step`` reaches ``step`` (a run interrupted mid-schedule)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        trainer.should_stop = trainer.should_stop or trainer.global_step >= self.step


def _module(folder, **kwargs) -> GRPOModule:
    defaults = dict(num_generations=3, max_new_tokens=6, learning_rate=1e-2, entropy_chunk_size=8)
    return GRPOModule(model_name_or_path=str(folder), **{**defaults, **kwargs})


def _fit(module, logger=None, ckpt_path=None, callbacks=(), **kwargs) -> Trainer:
    trainer = Trainer(accelerator="cpu", devices=1, logger=logger or False, log_every_n_steps=1,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      num_sanity_val_steps=0, callbacks=list(callbacks), **kwargs)  # fmt: skip
    trainer.fit(module, datamodule=HandBatches(), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize(
    "option, value",
    [("num_generations", 1), ("loss_type", "ppo"), ("scale_rewards", "std"), ("epsilon_low", -0.1),
     ("epsilon_high", -1.0), ("temperature", 0.0), ("top_p", 1.5), ("max_new_tokens", 0), ("beta", -0.1),
     ("num_iterations", 0), ("learning_rate", 0.0), ("total_steps", 0), ("entropy_chunk_size", 0), ("zero_reward_patience", 0),
     ("dtype", "int8"), ("rewards", ["no_such_reward"]), ("entropy_schedule", "no_such_schedule")],
)  # fmt: skip
def test_invalid_options_fail_eagerly_naming_option_and_value(tiny_model_dir, option, value):
    with pytest.raises(ValueError, match=rf"^{option}={re.escape(repr(value))}.*allowed"):
        _module(tiny_model_dir("llama"), **{option: value})


def test_model_source_is_checked_before_loading(tmp_path):
    with pytest.raises(ValueError, match="model_name_or_path="):
        GRPOModule(model_name_or_path=str(tmp_path / "missing"))


def test_reward_columns_drop_only_eval_columns():
    assert sorted(reward_columns(_train_batch(0))) == ["id", "label", "prompt", "question"]


def test_fit_logs_metrics_follows_schedule_and_updates_policy(tiny_model_dir):
    reward = LabelBlindReward()
    schedule = MaxToMin(lam_max=0.01, lam_min=0.02, switch_frac=0.5)
    module = _module(tiny_model_dir("llama"), rewards=["accuracy", reward], reward_weights=[1.0, 1.0],
                     entropy_schedule=schedule)  # fmt: skip
    module.configure_model()
    before = [p.detach().clone() for p in module.model.parameters()]
    recorder = Recorder()
    trainer = _fit(module, logger=recorder, max_steps=2)

    assert trainer.global_step == 2 and reward.calls == 2
    assert module.ref_model is None  # beta = 0: no reference model
    # S = max_steps = 2, so s_sw = 1: step 0 explores (+λ_max), step 1 exploits (−λ_min).
    assert recorder.series("train/entropy_coef") == pytest.approx([schedule(0, 2), schedule(1, 2)])
    assert recorder.series("train/entropy_coef") == pytest.approx([0.01, -0.02])
    logged = set().union(*recorder.rows)
    for key in ("reward", "reward_std", "frac_reward_zero_std", "entropy", "entropy_coef", "completion_length",
                "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clean_acc",
                "noisy_label_agreement", "rewards/label_blind/mean", "rewards/accuracy/mean", "policy_loss"):
        assert f"train/{key}" in logged, key
    assert "train/kl" not in logged
    assert all(0 <= v <= 1 for v in recorder.series("train/clean_acc") + recorder.series("val/clean_acc"))
    assert len(recorder.series("val/clean_acc")) == 1
    entropy = recorder.series("train/entropy")
    assert all(0 < h <= math.log(320) + 1e-4 for h in entropy)
    assert any(not torch.equal(a, b) for a, b in zip(before, module.model.parameters()))


def test_beta_creates_frozen_reference_and_logs_kl_with_old_logps(tiny_model_dir):
    # self_certainty (weight 0) needs the no-grad per-token model statistics the module adds to the columns.
    module = _module(tiny_model_dir("llama"), beta=0.1, num_iterations=2,
                     rewards=[LabelBlindReward(), "self_certainty"], reward_weights=[1.0, 0.0])  # fmt: skip
    recorder = Recorder()
    trainer = _fit(module, logger=recorder, max_steps=2, limit_val_batches=0)

    assert trainer.global_step == 2 and len(recorder.series("train/kl")) == 1  # μ = 2 steps from one batch
    assert module.ref_model is not None
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not any(p.requires_grad or id(p) in optimised for p in module.ref_model.parameters())
    changed = [not torch.equal(a, b) for a, b in zip(module.ref_model.parameters(), module.model.parameters())]
    assert any(changed)  # the policy moved, the reference did not follow it
    assert recorder.series("train/kl")[0] >= 0
    assert recorder.series("train/rewards/self_certainty/mean")[0] >= math.log(320) - 1e-4  # SC >= log V


def test_gradients_flow_only_through_completion_tokens(tiny_model_dir):
    """Only completion positions reach the lm_head, and post-EOS positions get exactly zero gradient."""
    module = _module(tiny_model_dir("llama"), entropy_schedule=ConstMax(0.1))
    module.configure_model()
    prompt_ids, prompt_mask = torch.tensor([[0, 5, 9, 11], [7, 8, 12, 13]]), torch.tensor([[0, 1, 1, 1], [1] * 4])
    completion_ids = torch.tensor([[21, 0, 0, 0], [30, 31, 32, 33]])  # row 0: EOS (id 0) at t=1, then padding
    mask, truncated = first_eos_mask(completion_ids, [0])
    assert mask.tolist() == [[True, True, False, False], [True] * 4] and truncated.tolist() == [False, True]
    rollout = Rollout(prompt_ids, prompt_mask, completion_ids, mask, ["", ""], truncated)
    captured = []

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured.append(output)

    handle = module.model.get_output_embeddings().register_forward_hook(keep)
    try:
        out = module.compute_loss(rollout, torch.tensor([1.0, -1.0]), entropy_coef=0.1)
    finally:
        handle.remove()
    out.loss.backward()
    (head_out,) = captured
    assert head_out.shape[1] == completion_ids.shape[1] + 1  # prompt positions never go through the lm_head
    grad = head_out.grad[:, :-1].abs().sum(dim=-1)  # position t predicts completion token t
    assert torch.all(grad[~mask] == 0) and torch.all(grad[mask] > 0)  # EOS is inside the mask, post-EOS is not
    assert torch.all(head_out.grad[:, -1] == 0)  # the last position predicts past the sequence


def test_resume_continues_entropy_schedule_and_keeps_checkpointed_total(tiny_model_dir, tmp_path):
    schedule = MaxToMin(lam_max=0.01, lam_min=0.02, switch_frac=0.5)
    first, ckpt = Recorder(), tmp_path / "step2.ckpt"
    trainer = _fit(_module(tiny_model_dir("llama"), entropy_schedule=schedule), logger=first, max_steps=4,
                   callbacks=[StopAt(2)], limit_val_batches=0)  # fmt: skip
    trainer.save_checkpoint(ckpt)
    assert first.series("train/entropy_coef") == pytest.approx([0.01, 0.01])  # S = 4, s_sw = 2
    assert torch.load(ckpt, weights_only=False)["grpo_schedule"] == {"total_steps": 4, "switch_step": 2}

    resumed = Recorder()
    # max_steps=8 would re-resolve S to 8 (s_sw = 4, λ(2) = +0.01): the checkpointed S = 4 must win.
    with pytest.warns(UserWarning, match="keeping 4"):
        _fit(_module(tiny_model_dir("llama"), entropy_schedule=schedule), logger=resumed, ckpt_path=str(ckpt),
             max_steps=8, callbacks=[StopAt(3)], limit_val_batches=0)  # fmt: skip
    assert resumed.series("train/entropy_coef") == pytest.approx([schedule(2, 4)])
    assert schedule(2, 4) == pytest.approx(-0.02)


def test_strategies_without_gathering_are_refused_naming_the_strategy_and_the_alternatives():
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

    from lit_modules.grpo.policy import refuse_unsupported_strategy

    with pytest.raises(MisconfigurationException, match=r"ModelParallelStrategy strategy.*strategy='fsdp'.*'ddp'"):
        refuse_unsupported_strategy(ModelParallelStrategy())
    # DeepSpeed is not installed here (Lightning refuses to build its strategy); a class of that name stands in.
    deepspeed_like = type("DeepSpeedStrategy", (DDPStrategy,), {})
    with pytest.raises(MisconfigurationException, match=r"DeepSpeedStrategy strategy.*strategy='fsdp'"):
        refuse_unsupported_strategy(deepspeed_like())
    refuse_unsupported_strategy(DDPStrategy())  # replicated parameters
    refuse_unsupported_strategy(FSDPStrategy())  # sharded, gathered for generation (tests/test_fsdp.py)


class NeverRewarded:
    name = "never"

    def __call__(self, prompts, completions, **columns):
        return [0.0] * len(completions)


def test_a_policy_that_is_never_rewarded_is_reported_once(tiny_model_dir):
    module = _module(tiny_model_dir("llama"), rewards=[NeverRewarded()], zero_reward_patience=2)
    with pytest.warns(UserWarning, match="no completion earned any reward for 2 steps") as caught:
        _fit(module, max_steps=4, limit_val_batches=0)
    assert sum("no completion earned any reward" in str(w.message) for w in caught) == 1
