"""RLVRDataModule on the generated-image tasks: image rows, chat-templated image prompts, persistent label noise."""

from __future__ import annotations

import pytest

from datamodules.image_tasks import NOISE_KINDS
from datamodules.rlvr import RLVRDataModule, reward_columns
from lit_modules.grpo.rewards import Accuracy


def _make(folder, **kwargs) -> RLVRDataModule:
    dm = RLVRDataModule(**({"source": "image_grounding", "num_train": 20, "num_val": 6, "tokenizer": str(folder)}
                           | kwargs))  # fmt: skip
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_exactly_the_requested_share_of_labels_is_wrong_and_validation_is_clean(tiny_vlm_dir, kind):
    dm = _make(tiny_vlm_dir("qwen2_vl"), noise_rate=0.4, noise_kind=kind)
    train, val = dm.rows("train"), dm.rows("val")
    corrupted = [r for r in train if r["is_corrupted"]]
    assert len(corrupted) == 8
    assert all(r["label"] != r["clean_label"] for r in corrupted)
    assert all(r["label"] == r["clean_label"] for r in train if not r["is_corrupted"])
    # A corrupted grounding label is another cell's box, so the clean box's centre scores 0 against it.
    scorer = Accuracy()
    for r in corrupted:
        x1, y1, x2, y2 = r["clean_label"]
        assert scorer.score(f"({(x1 + x2) // 2}, {(y1 + y2) // 2})", r["label"]) == 0.0
    assert all("is_corrupted" not in r and r["label"] == r["clean_label"] for r in val)
    # The same manifest on a second instance (every rank, every run).
    assert _make(tiny_vlm_dir("qwen2_vl"), noise_rate=0.4, noise_kind=kind).manifest_hash == dm.manifest_hash


def test_rows_carry_their_image_and_prompts_hold_the_image_placeholder(tiny_vlm_dir):
    dm = _make(tiny_vlm_dir("qwen2_vl"), source="image_count", prompts_per_batch=4)
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["image"]) == len(batch["prompt"]) == 4
    assert all(im.size == (112, 112) for im in batch["image"])
    assert all(p.count("<|vision_start|><|image_pad|><|vision_end|>") == 1 for p in batch["prompt"])
    assert all(p.endswith("<|im_start|>assistant\n") and "How many" in p for p in batch["prompt"])
    assert "image" in reward_columns(batch) and "clean_label" not in reward_columns(batch)


def test_image_tasks_refuse_a_systematic_rule_and_a_text_only_model_folder(tiny_vlm_dir, tiny_model_dir):
    with pytest.raises(ValueError, match="systematic_rule"):
        RLVRDataModule(source="image_shape", systematic_rule="carry_flip")
    dm = RLVRDataModule(source="image_shape", num_train=2, num_val=1, tokenizer=str(tiny_model_dir("llama")))
    with pytest.raises(ValueError, match="no image processor"):
        dm.rows("train")
