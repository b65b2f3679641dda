from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightning import Trainer
from transformers import AutoModelForCausalLM

from datamodules.text import TextDataModule
from lit_modules.causal_lm import CausalLM
from lit_modules.scoring import choice_loglikelihoods, choice_predictions

TEXT = "Wikipedia is a free online encyclopedia written by volunteers. " * 30


def _trainer(**kwargs) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, **kwargs)


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "gpt2"])
def test_validate_perplexity_equals_exp_mean_nll_by_hand(tmp_path, tiny_model_dir, family):
    folder = tiny_model_dir(family)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    data = TextDataModule(source=str(corpus), seqlen=16, batch_size=3)
    module = CausalLM(model_name_or_path=str(folder))
    metrics = _trainer().validate(module, datamodule=data)[0]

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    windows = data.eval_windows()
    losses = []
    with torch.no_grad():
        for window in windows:
            logits = model(input_ids=window[None]).logits[0]
            losses.append(F.cross_entropy(logits[:-1], window[1:], reduction="none"))
    by_hand = math.exp(torch.cat(losses).double().mean().item())
    assert metrics["val/ppl"] == pytest.approx(by_hand, rel=1e-5)
    assert metrics["val/seqlen"] == 16


def test_choice_loglikelihoods_match_one_sequence_at_a_time(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    context, choices = [5, 9, 11, 3], [[7], [8, 2, 4], [1, 1]]
    with torch.no_grad():
        batched = choice_loglikelihoods(model, context, choices)
        for score, choice in zip(batched, choices):
            ids = torch.tensor([context + choice])
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            expected = sum(logprobs[len(context) - 1 + i, tok] for i, tok in enumerate(choice))
            assert score.item() == pytest.approx(expected.item(), abs=1e-5)


def test_long_context_is_cut_from_the_left_so_choices_are_scored(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    with torch.no_grad():
        cut = choice_loglikelihoods(model, list(range(1, 40)), [[3, 4]], max_length=10)
        short = choice_loglikelihoods(model, list(range(32, 40)), [[3, 4]])
    assert cut.item() == pytest.approx(short.item(), abs=1e-5)


def test_length_normalised_prediction_can_differ_from_plain():
    plain, normalised = choice_predictions(torch.tensor([-4.0, -6.0]), [2, 12])
    assert (plain, normalised) == (0, 1)


def test_save_pretrained_reloads_to_identical_logits(tmp_path, tiny_model_dir):
    module = CausalLM(model_name_or_path=str(tiny_model_dir("gpt2")))
    module.configure_model()
    with torch.no_grad():
        module.model.transformer.h[0].mlp.c_fc.weight.mul_(0.5)  # a changed model, as after compression
    out = module.save_pretrained(tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(module.model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"model_name_or_path": "gpt-17"}, r"model_name_or_path='gpt-17'.*smollm2-135m-instruct"),
        ({"dtype": "float8"}, r"dtype='float8'.*bfloat16"),
        ({"learning_rate": 0.0}, r"learning_rate=0.0"),
    ],
)
def test_bad_options_fail_before_loading(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CausalLM(**kwargs)


def test_fit_lowers_the_training_loss(tmp_path, tiny_model_dir):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    data = TextDataModule(source=str(corpus), seqlen=16, nsamples=8, batch_size=4)
    module = CausalLM(model_name_or_path=str(tiny_model_dir("llama")), learning_rate=3e-3)
    before = _trainer().validate(module, datamodule=data)[0]["val/ppl"]
    _trainer(max_epochs=5, num_sanity_val_steps=0, enable_checkpointing=False, limit_val_batches=0).fit(module, data)
    after = _trainer().validate(module, datamodule=data)[0]["val/ppl"]
    assert after < before


@pytest.mark.slow
def test_embedded_smollm2_perplexity_is_in_the_expected_range():
    data = TextDataModule(source="wiki-leads", split="evaluation", seqlen=512, max_windows=4)
    metrics = _trainer().validate(CausalLM(), datamodule=data)[0]
    assert 8 < metrics["val/ppl"] < 20
