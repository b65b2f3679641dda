from __future__ import annotations

import json

import datasets
import pytest
import torch

from datamodules.text import (
    TextDataModule,
    WindowDataset,
    calibration_windows,
    even_shards,
    eval_windows,
    pad_shard,
)

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def test_eval_windows_are_non_overlapping_and_drop_the_remainder():
    ids = list(range(103))
    windows = eval_windows(ids, 10)
    assert windows.shape == (10, 10)
    assert windows.flatten().tolist() == ids[:100]
    assert eval_windows(ids, 10, max_windows=3).shape == (3, 10)


def test_calibration_windows_are_seeded_and_in_bounds():
    ids = list(range(1000))
    a, b, c = (calibration_windows(ids, 16, 8, seed) for seed in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (8, 16)
    # Every window is a contiguous slice of the stream.
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_even_shards_count_every_window_exactly_once_and_have_equal_lengths(world):
    data = WindowDataset(torch.arange(7).unsqueeze(1).repeat(1, 4))
    shards = [[data_set[i] for i in (sampler or range(len(data_set)))]
              for data_set, sampler in (even_shards(data, world, rank) for rank in range(world))]  # fmt: skip
    assert {len(shard) for shard in shards} == {-(-7 // world)}  # as many forward passes on every rank
    counted = [int(item["input_ids"][0]) for shard in shards for item in shard if item["counted"]]
    assert sorted(counted) == list(range(7))
    assert sum(not item["counted"] for shard in shards for item in shard) == world * -(-7 // world) - 7


def test_padded_list_shards_mark_their_padding():
    items = [{"i": i} for i in range(5)]
    assert pad_shard(items[1::2], items, 2) == [{"i": 1, "counted": True}, {"i": 3, "counted": True},
                                                {"i": 0, "counted": False}]  # fmt: skip
    assert pad_shard(items[0::2], items, 2) == [{"i": i, "counted": True} for i in (0, 2, 4)]


def _module(tmp_path, tiny_model_dir, source, **kwargs):
    dm = TextDataModule(source=str(source), tokenizer=str(tiny_model_dir("llama")), **kwargs)
    dm.setup("validate")
    return dm


def test_local_text_file(tmp_path, tiny_model_dir):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    dm = _module(tmp_path, tiny_model_dir, path, seqlen=16)
    expected = dm.tokenizer()(TEXT)["input_ids"]
    assert dm.eval_windows().flatten().tolist() == expected[: len(expected) // 16 * 16]
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape == (1, 16)


def test_local_jsonl_and_saved_dataset_agree(tmp_path, tiny_model_dir):
    rows = [{"text": TEXT[:200]}, {"text": TEXT[200:500]}]
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    folder = tmp_path / "saved"
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)}).save_to_disk(str(folder))
    from_jsonl = _module(tmp_path, tiny_model_dir, jsonl, seqlen=8)
    from_disk = _module(tmp_path, tiny_model_dir, folder, split="validation", seqlen=8)
    assert torch.equal(from_jsonl.eval_windows(), from_disk.eval_windows())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"source": "no/such/file.txt"}, r"source='no/such/file.txt' does not exist"),
        ({"source": "wiki-leads", "split": "train"}, r"split='train'.*calibration.*evaluation"),
        ({"nsamples": 0}, r"nsamples=0.*>= 1"),
        ({"seqlen": 0}, r"seqlen=0.*>= 1"),
        ({"max_windows": 0}, r"max_windows=0"),
    ],
)
def test_bad_options_fail_in_init(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TextDataModule(**kwargs)


def test_split_given_for_a_file_is_rejected(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(TEXT)
    with pytest.raises(ValueError, match="files have no splits"):
        TextDataModule(source=str(path), split="evaluation")


def test_seqlen_longer_than_the_text(tmp_path, tiny_model_dir):
    path = tmp_path / "short.txt"
    path.write_text("a few words")
    with pytest.raises(ValueError, match=r"seqlen=64 is longer than the text"):
        _module(tmp_path, tiny_model_dir, path, seqlen=64)


def test_seqlen_beyond_the_model_context(tmp_path, tiny_model_dir):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT * 10)
    with pytest.raises(ValueError, match=r"seqlen=512 exceeds the model's context of 256"):
        _module(tmp_path, tiny_model_dir, path, seqlen=512)


def test_unknown_text_field(tmp_path, tiny_model_dir):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"body": TEXT}))
    with pytest.raises(ValueError, match=r"text_field='text'.*\['body'\]"):
        _module(tmp_path, tiny_model_dir, path, seqlen=8)


def test_calibration_set_too_small_for_the_requested_samples(tmp_path, tiny_model_dir):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    dm = _module(tmp_path, tiny_model_dir, path, seqlen=16, nsamples=10_000)
    with pytest.raises(ValueError, match=r"nsamples=10000 windows of seqlen=16 need 160000 tokens"):
        dm.calibration_windows()
