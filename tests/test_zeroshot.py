"""Zero-shot multiple-choice data: BIG-bench conversion, record validation, tokenization, sharding."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from tokenizers.processors import TemplateProcessing
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from datamodules.bigbench import convert_bigbench_task
from datamodules.zeroshot import (
    ExampleStream,
    ZeroShotDataModule,
    collate_examples,
    encode_example,
    shard,
    shipped_tasks,
    start_ids,
)

GOOD = {"context": "Is fire hot?", "choices": ["yes", "no"], "label": 0}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tokenizer) -> str:
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer) -> PreTrainedTokenizerFast:
    """The tiny tokenizer, but adding BOS by default like LLaMA-family tokenizers do."""
    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    backend.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


# --- BIG-bench conversion --------------------------------------------------------------------------

def hand_built_task() -> dict:
    return {
        "name": "toy",
        "task_prefix": "Answer the question.",
        "examples": [
            {"input": "Is the sky blue?", "target_scores": {"no": 0, "yes": 1}},
            {"input": "Tied best", "target_scores": {"a": 1, "b": 1, "c": 0}},
            {"input": "No positive", "target_scores": {"a": 0, "b": 0}},
            {"input": "Generative", "target": "free text"},
            {"input": "Graded", "target_scores": {"x": 0.2, "y": 0.5, "z": 0.9}},
            {"input": "One choice", "target_scores": {"only": 1}},
        ],
    }


def test_convert_bigbench_task_keeps_single_best_choice_examples():
    records = convert_bigbench_task(hand_built_task())
    assert records == [
        {"context": "Answer the question.\nQ: Is the sky blue?\nA: ", "choices": ["no", "yes"], "label": 1},
        {"context": "Answer the question.\nQ: Graded\nA: ", "choices": ["x", "y", "z"], "label": 2},
    ]


def test_convert_bigbench_task_custom_prefixes_and_path(tmp_path):
    task = {"example_input_prefix": "Q: ", "example_output_prefix": " A:", "examples": [
        {"input": "2+2?", "target_scores": {"3": 0, "4": 1}}]}
    path = tmp_path / "task.json"
    path.write_text(json.dumps(task))
    assert convert_bigbench_task(path) == [{"context": "Q: 2+2? A:", "choices": ["3", "4"], "label": 1}]


# --- validation ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ({"context": "c", "choices": ["a", "b"], "label": 2}, "'label' must be an integer in [0, 1], got 2"),
        ({"context": "c", "choices": ["a", "b"], "label": -1}, "got -1"),
        ({"context": "c", "choices": ["a"], "label": 0}, "'choices' must be a list of at least 2"),
        ({"context": 3, "choices": ["a", "b"], "label": 0}, "'context' must be a string"),
        ({"context": "c", "choices": ["a", "b"]}, "'label' must be an integer"),
    ],
)
def test_bad_record_names_file_and_line(tmp_path, bad, expected):
    path = write_jsonl(tmp_path / "mine.jsonl", [GOOD, bad])
    with pytest.raises(ValueError) as err:
        ZeroShotDataModule(tasks=[str(path)])
    assert f"{path} line 2" in str(err.value)
    assert expected in str(err.value)


def test_invalid_json_line_names_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n{not json\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl line 3: not valid JSON"):
        ZeroShotDataModule(tasks=[str(path)])


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(ValueError, match=r"tasks: file .*nowhere\.jsonl.* does not exist"):
        ZeroShotDataModule(tasks=[str(missing)])


def test_unknown_task_lists_shipped_names():
    with pytest.raises(ValueError) as err:
        ZeroShotDataModule(tasks=["bigbench_no_such_task"])
    message = str(err.value)
    assert "unknown task 'bigbench_no_such_task'" in message
    for name in shipped_tasks():
        assert name in message


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"max_examples_per_task": 0}, "max_examples_per_task: must be None or >= 1, got 0"),
        ({"num_workers": -1}, "num_workers: must be >= 0, got -1"),
        ({"tokenizer": "/no/such/tokenizer"}, "tokenizer: '/no/such/tokenizer' is not a folder"),
    ],
)
def test_bad_options_are_named(kwargs, expected):
    with pytest.raises(ValueError) as err:
        ZeroShotDataModule(tasks=["bigbench_web_of_lies"], **kwargs)
    assert expected in str(err.value)


def test_empty_or_duplicate_task_lists_are_refused(tmp_path):
    with pytest.raises(ValueError, match="tasks: expected a non-empty list"):
        ZeroShotDataModule(tasks=[])
    with pytest.raises(ValueError, match="named 'bigbench_web_of_lies'"):
        ZeroShotDataModule(tasks=["bigbench_web_of_lies", "bigbench_web_of_lies"])


# --- loading ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(shipped_tasks()))
def test_shipped_task_loads_with_valid_labels(name):
    records = ZeroShotDataModule(tasks=[name]).records[name]
    assert len(records) >= 100
    for record in records:
        assert len(record["choices"]) >= 2
        assert 0 <= record["label"] < len(record["choices"])
    labels = {record["label"] for record in records}
    assert len(labels) > 1, "a task whose answer is always the same choice measures nothing"


def test_shipped_tasks_are_listed():
    assert {"bigbench_web_of_lies", "bigbench_boolean_expressions"} <= set(shipped_tasks())


def test_max_examples_keeps_first_k(tmp_path):
    rows = [{"context": f"q{i}", "choices": ["a", "b"], "label": i % 2} for i in range(5)]
    path = write_jsonl(tmp_path / "five.jsonl", rows)
    dm = ZeroShotDataModule(tasks=[str(path)], max_examples_per_task=3)
    assert dm.task_names == ["five"]
    assert dm.records["five"] == rows[:3]


def test_datasets_folder_and_json_array(tmp_path):
    from datasets import Dataset

    rows = [GOOD, {"context": "Is ice hot?", "choices": ["yes", "no", "maybe"], "label": 1}]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved_task"))
    (tmp_path / "array.json").write_text(json.dumps(rows))
    dm = ZeroShotDataModule(tasks=[str(tmp_path / "saved_task"), str(tmp_path / "array.json")])
    assert dm.task_names == ["saved_task", "array"]
    assert dm.records["saved_task"] == rows
    assert dm.records["array"] == rows


def test_folder_that_is_not_a_dataset_is_refused(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not a `datasets` save_to_disk folder"):
        ZeroShotDataModule(tasks=[str(tmp_path / "plain")])


# --- tokenization ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("context", "joint_texts"),
    [
        ("The quick brown fox", ["The quick brown fox jumps", "The quick brown fox sleeps"]),
        ("Question: What is 12 + 7?\nAnswer: ", ["Question: What is 12 + 7?\nAnswer: 19", "Question: What is 12 + 7?\nAnswer: 20"]),
        ("A language model\n", ["A language model\njumps", "A language model\nsleeps"]),
    ],
)
def test_context_plus_choice_tokens_equal_joint_encoding(tokenizer, context, joint_texts):
    record = {"context": context, "choices": [t[len(context):].strip() for t in joint_texts], "label": 0}
    example = encode_example(tokenizer, record, "t", start_ids(tokenizer))
    for choice_ids, text in zip(example["choice_ids"], joint_texts):
        assert example["context_ids"] + choice_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(example["context_ids"]) == context.rstrip()
    assert example["choice_chars"] == [len(c) for c in record["choices"]]


def test_separator_space_belongs_to_the_choice(tokenizer):
    example = encode_example(tokenizer, {"context": "Is fire hot?", "choices": ["yes", "no"], "label": 0}, "t", [])
    assert [tokenizer.decode(ids) for ids in example["choice_ids"]] == [" yes", " no"]


def test_shipped_examples_split_cleanly(tokenizer):
    dm = ZeroShotDataModule(tasks=sorted(shipped_tasks()), max_examples_per_task=50)
    for task, records in dm.records.items():
        for record in records:
            example = encode_example(tokenizer, record, task, [])
            for choice, ids in zip(record["choices"], example["choice_ids"]):
                joint = record["context"] + choice if record["context"][-1:].isspace() else record["context"] + " " + choice
                assert example["context_ids"] + ids == tokenizer(joint, add_special_tokens=False)["input_ids"]


def test_empty_context_starts_with_eos(tokenizer):
    assert start_ids(tokenizer) == []
    example = encode_example(tokenizer, {"context": "", "choices": ["fox", "dog"], "label": 0}, "t", [])
    assert example["context_ids"] == [tokenizer.eos_token_id]
    assert example["choice_ids"][0] == tokenizer("fox", add_special_tokens=False)["input_ids"]


def test_bos_is_prepended_once_when_the_tokenizer_adds_it(bos_tokenizer):
    bos = bos_tokenizer.bos_token_id
    assert start_ids(bos_tokenizer) == [bos]
    example = encode_example(bos_tokenizer, GOOD, "t", start_ids(bos_tokenizer))
    assert example["context_ids"] + example["choice_ids"][0] == bos_tokenizer("Is fire hot? yes")["input_ids"]
    assert example["context_ids"].count(bos) == 1


# --- batches and sharding --------------------------------------------------------------------------

def test_dataloaders_yield_lists_of_example_dicts(tokenizer_dir):
    dm = ZeroShotDataModule(tasks=sorted(shipped_tasks()), tokenizer=tokenizer_dir, max_examples_per_task=4)
    dm.setup("validate")
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        batches = list(loader)
        assert len(batches) == 4 * len(shipped_tasks())
        for batch in batches:
            assert isinstance(batch, list) and len(batch) == 1
            example = batch[0]
            assert set(example) == {"task", "context_ids", "choice_ids", "choice_chars", "label", "counted"}
            assert example["task"] in dm.task_names
            assert all(isinstance(i, int) for i in example["context_ids"])
            assert len(example["choice_ids"]) == len(example["choice_chars"]) >= 2


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shards_cover_every_example_exactly_once(world_size):
    items = list(range(10))
    shards = [shard(items, rank, world_size) for rank in range(world_size)]
    assert sorted(i for s in shards for i in s) == items
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_shard_refuses_bad_rank():
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        shard([1, 2, 3], 2, 2)


def test_workers_split_a_shard_without_repeats():
    loader = DataLoader(ExampleStream([{"i": i} for i in range(7)]), batch_size=1,
                        collate_fn=collate_examples, num_workers=2)
    assert sorted(batch[0]["i"] for batch in loader) == list(range(7))


class _Counter(pl.LightningModule):
    """Minimal module with the `tokenizer` attribute ZeroShotDataModule falls back to."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[dict] = []

    def validation_step(self, batch, batch_idx):
        self.seen.extend(batch)


def test_trainer_validate_uses_module_tokenizer_and_sees_each_example_once(tokenizer):
    dm = ZeroShotDataModule(tasks=sorted(shipped_tasks()), max_examples_per_task=5)
    module = _Counter(tokenizer)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, datamodule=dm)
    assert len(module.seen) == 5 * len(shipped_tasks())
    assert [e["task"] for e in module.seen].count("bigbench_web_of_lies") == 5


def test_missing_tokenizer_is_explained():
    dm = ZeroShotDataModule(tasks=["bigbench_web_of_lies"], max_examples_per_task=1)
    with pytest.raises(ValueError, match="tokenizer: is None"):
        dm.setup("validate")
