"""VLMSFTModule: the supervised warm start of a tiny Qwen2-VL on generated images, and its published artifact."""

from __future__ import annotations

import json

import pytest
import torch
from lightning import Trainer

from datamodules.assets import TINY_VLM_GROUNDING, built_model_dir, check_model_source
from datamodules.image_tasks import answer_text
from datamodules.rlvr import RLVRDataModule
from lit_modules.grpo.policy import load_policy
from lit_modules.sft import VLMSFTModule
from lit_modules.vlm.processor import load_processor


def _fit(module, folder, steps: int, **data):
    datamodule = RLVRDataModule(**{**dict(source="image_colour", num_train=4, num_val=4, prompts_per_batch=4,
                                          tokenizer=str(folder)), **data})  # fmt: skip
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                      val_check_interval=steps, check_val_every_n_epoch=None)  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    return trainer, datamodule


def test_answers_are_box_centres_or_the_label_text():
    assert answer_text([28, 56, 55, 83]) == "(41, 69)"
    assert answer_text("blue") == "blue" and answer_text("3") == "3"


def _batch(rows):
    return {"prompt": [r["prompt"] for r in rows], "image": [r["image"] for r in rows],
            "label": [r["label"] for r in rows]}  # fmt: skip


def test_the_loss_scores_the_answer_tokens_only(tiny_vlm_dir):
    """Against an independent computation: the processor on prompt + answer text, the model's own forward, and
    the cross-entropy of the positions after the prompt."""
    folder = tiny_vlm_dir("qwen2_vl")
    module = VLMSFTModule(model_name_or_path=str(folder), export_to=None)
    module.configure_model()
    data = RLVRDataModule(source="image_grounding", num_train=2, num_val=1, tokenizer=str(folder))
    batch = _batch(data.rows("train"))
    processor = module.processor
    expected = []
    for prompt, image, label in zip(batch["prompt"], batch["image"], batch["label"]):
        n_prompt = processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"].shape[1]
        enc = processor(text=[prompt + answer_text(label) + processor.tokenizer.eos_token], images=[image],
                        return_tensors="pt")  # fmt: skip
        with torch.no_grad():
            logits = module.model(**enc).logits[0, n_prompt - 1:-1]
        expected.append(torch.nn.functional.cross_entropy(logits, enc["input_ids"][0, n_prompt:], reduction="sum"))
        expected.append(enc["input_ids"].shape[1] - n_prompt)
    with torch.no_grad():
        loss = module.answer_loss(batch)
    total, count = sum(expected[0::2]), sum(expected[1::2])
    torch.testing.assert_close(loss, total / count, atol=1e-5, rtol=1e-5)


def test_fit_lowers_the_loss_and_publishes_a_folder_that_reloads_identically(tiny_vlm_dir, tmp_path):
    folder = tiny_vlm_dir("qwen2_vl")
    export = tmp_path / "warm"
    module = VLMSFTModule(model_name_or_path=str(folder), export_to=str(export), learning_rate=3e-3, warmup_steps=1)
    module.configure_model()
    data = RLVRDataModule(source="image_colour", num_train=4, num_val=4, tokenizer=str(folder))
    batch = _batch(data.rows("train"))
    with torch.no_grad():
        before = float(module.answer_loss(batch))
    torch.manual_seed(0)
    _fit(module, folder, steps=30)
    with torch.no_grad():
        after = float(module.answer_loss(batch))
    assert after < 0.5 * before

    summary = json.loads((export / "litforge_sft.json").read_text())
    assert summary["steps"] == 30 and summary["val_clean_acc"][-1]["step"] == 30
    reloaded, processor = load_policy(export, torch.float32), load_processor(export)
    enc = processor(text=batch["prompt"][:1], images=batch["image"][:1], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**enc).logits, module.model(**enc).logits)


def test_the_warm_start_name_explains_how_to_build_it(monkeypatch, tmp_path):
    monkeypatch.setenv("LITFORGE_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="configs/sft/tiny_vl_grounding.yaml"):
        check_model_source(TINY_VLM_GROUNDING)
    assert built_model_dir(TINY_VLM_GROUNDING).parent == tmp_path


@pytest.mark.parametrize("option, value", [("learning_rate", 0.0), ("warmup_steps", -1), ("max_new_tokens", 0)])
def test_bad_options_fail_eagerly(tiny_vlm_dir, option, value):
    with pytest.raises(ValueError, match=option):
        VLMSFTModule(model_name_or_path=str(tiny_vlm_dir("qwen2_vl")), **{option: value})
