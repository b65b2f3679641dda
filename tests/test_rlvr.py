"""RLVRDataModule and synthetic tasks: label noise (spec §4, §7 tests 14–15), splits, prompts, sharding."""

from __future__ import annotations

import json
from types import SimpleNamespace

import datasets
import pytest
import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger

from datamodules.assets import SMOLLM2, resolve_model
from datamodules.rlvr import EVAL_ONLY_COLUMNS, RLVRDataModule, reward_columns
from datamodules.synthetic import DIFFICULTY, SYSTEMATIC_RULES, TASKS, generate, get_task, parse_question
from lit_modules.grpo.rewards import MajorityVote, SoftSelfConsistency
from tests.tiny_models import tiny_config, tiny_tokenizer

TEMPLATE = "What is {question}? Answer with just the number."


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A folder with the tiny tokenizer (no chat template) and a config.json, as a local HF model folder has."""
    folder = tmp_path_factory.mktemp("tiny-tok")
    tiny_tokenizer().save_pretrained(folder)
    tiny_config("llama").save_pretrained(folder)
    return str(folder)


def make(tok_dir: str | None = None, **kwargs) -> RLVRDataModule:
    """A set-up module on add_0_20 (441 questions), 40 train / 12 val unless overridden."""
    dm = RLVRDataModule(**(dict(source="add_0_20", num_train=40, num_val=12, tokenizer=tok_dir) | kwargs))
    dm.setup("fit")
    return dm


def value(question: str) -> int:
    """The true answer, computed independently of the task code."""
    a, op, b = parse_question(question)
    return {"+": a + b, "-": a - b, "*": a * b}[op]


# --- synthetic tasks ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TASKS))
def test_synthetic_records_are_correct_distinct_and_seeded(name):
    records = generate(name, 30, seed=3)
    assert all(int(r["label"]) == value(r["question"]) for r in records)
    assert len({r["question"] for r in records}) == len({r["id"] for r in records}) == 30
    assert records == generate(name, 30, seed=3) and records != generate(name, 30, seed=4)
    assert all(int(r["label"]) >= 0 for r in records)  # every shipped task has non-negative answers


def test_synthetic_difficulty_levels_and_unknown_names():
    assert {get_task(level).name for level in DIFFICULTY} <= set(TASKS)
    assert get_task("easy") is TASKS["add_1digit"]
    with pytest.raises(ValueError, match="task='add_9digit'.*allowed.*add_1digit"):
        get_task("add_9digit")
    with pytest.raises(ValueError, match="101.*100 distinct questions"):
        generate("add_1digit", 101, seed=0)


# --- noise model (spec §4; §7 test 14) ---------------------------------------------------------------------------

@pytest.mark.parametrize("rate", [0.0, 0.1, 0.25, 0.33, 0.5, 0.77, 1.0])
def test_exact_corrupted_count(rate):
    dm = make(noise_rate=rate)
    flags = [r["is_corrupted"] for r in dm._train]
    assert sum(flags) == round(rate * 40)
    assert all((r["label"] != r["clean_label"]) == r["is_corrupted"] for r in dm._train)


def test_zero_noise_corrupts_nothing_and_full_noise_everything():
    assert all(r["label"] == r["clean_label"] for r in make(noise_rate=0.0)._train)
    assert all(r["label"] != r["clean_label"] for r in make(noise_rate=1.0)._train)


def test_higher_rate_corrupts_a_superset():
    low, high = (make(noise_rate=p, noise_seed=5) for p in (0.2, 0.6))
    corrupted = [{r["id"] for r in dm._train if r["is_corrupted"]} for dm in (low, high)]
    assert corrupted[0] < corrupted[1]


def test_manifest_fixed_per_seed_rank_and_worker_count_and_differs_across_seeds(tok_dir):
    runs = []
    for rank, workers in ((0, 0), (1, 1)):
        dm = RLVRDataModule(source="add_0_20", num_train=40, num_val=12, noise_rate=0.5, noise_seed=7,
                            tokenizer=tok_dir, num_workers=workers)  # fmt: skip
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, lightning_module=None)
        dm.setup("fit")
        seen = {i: y for batch in dm.train_dataloader() for i, y in zip(batch["id"], batch["label"])}
        runs.append((dm.manifest_hash, seen))
    assert runs[0] == runs[1] and runs[0][1] == make(noise_rate=0.5, noise_seed=7).manifest
    other = make(noise_rate=0.5, noise_seed=8)
    assert other.manifest_hash != runs[0][0] and other.manifest != runs[0][1]
    assert dm.hparams["noise_manifest_sha256"] == dm.manifest_hash and len(dm.manifest_hash) == 64


@pytest.mark.parametrize("kind", ["near_miss", "uniform", "systematic"])
@pytest.mark.parametrize("source", ["add_1digit", "add_10_49", "sub_0_20", "mul_1digit"])
def test_corrupted_labels_differ_from_clean(kind, source):
    dm = make(source=source, noise_kind=kind, noise_rate=1.0, num_train=48)
    assert all(r["label"] != r["clean_label"] and r["label"].lstrip("-").isdigit() for r in dm._train)


def test_near_miss_is_clean_plus_minus_1_or_10():
    dm = make(noise_kind="near_miss", noise_rate=1.0, num_train=300)
    deltas = {int(r["label"]) - int(r["clean_label"]) for r in dm._train}
    assert deltas == {-10, -1, 1, 10}
    assert all(int(r["label"]) >= 0 for r in dm._train)  # add_0_20 has no negative answers


def test_uniform_stays_in_the_task_range():
    dm = make(source="add_1digit", noise_kind="uniform", noise_rate=1.0, num_train=80)
    labels = {int(r["label"]) for r in dm._train}
    assert labels <= set(range(0, 19)) and len(labels) > 10


@pytest.mark.parametrize("noise_seed", range(6))
def test_systematic_follows_one_rule_per_seed(noise_seed):
    dm = make(noise_kind="systematic", noise_rate=0.5, noise_seed=noise_seed)
    corrupted = [r for r in dm._train if r["is_corrupted"]]
    rules = [name for name, rule in SYSTEMATIC_RULES.items()
             if all(str(rule(r["question"], int(r["clean_label"]))) == r["label"] for r in corrupted)]  # fmt: skip
    assert rules == [dm.rule] and dm.hparams["noise_rule"] == dm.rule


def test_systematic_rule_can_be_pinned_and_carry_flip_flips_the_carry():
    dm = make(noise_kind="systematic", noise_rate=1.0, systematic_rule="carry_flip")
    for r in dm._train:
        a, _, b = parse_question(r["question"])
        carry = a % 10 + b % 10 >= 10
        assert int(r["label"]) == int(r["clean_label"]) + (-10 if carry else 10)
    with pytest.raises(ValueError, match="systematic_rule='carry_flip'.*allowed"):
        RLVRDataModule(source="mul_1digit", systematic_rule="carry_flip")


# --- splits, batches, reward columns, prompts ---------------------------------------------------------------------

def test_train_and_val_are_disjoint_and_val_is_clean(tok_dir):
    dm = make(tok_dir, source="add_1digit", num_train=70, num_val=30, noise_rate=1.0)
    train, val = dm.rows("train"), dm.rows("val")
    assert not {r["question"] for r in train} & {r["question"] for r in val}
    assert all(r["label"] == r["clean_label"] == str(value(r["question"])) for r in val)
    assert all("is_corrupted" not in r for r in val)
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"prompt", "question", "label", "clean_label", "id", "counted"} and len(batch["id"]) == 4
    assert batch["counted"] == [True] * 4  # one process: nothing to even out


def test_train_batches_and_seeded_shuffle(tok_dir):
    dm = make(tok_dir, noise_rate=0.5, prompts_per_batch=8)
    batches = list(dm.train_dataloader())
    assert set(batches[0]) == {"prompt", "question", "label", "clean_label", "is_corrupted", "id"}
    assert [len(b["id"]) for b in batches] == [8] * 5
    again = make(tok_dir, noise_rate=0.5, prompts_per_batch=8).train_dataloader()
    order = [i for b in batches for i in b["id"]]
    assert order == [i for b in again for i in b["id"]] and order != [r["id"] for r in dm._train]  # seeded, shuffled


def test_reward_columns_drop_eval_only_columns(tok_dir):
    """Spec §7 test 14: a reward that asserts the clean label is absent passes."""
    batch = next(iter(make(tok_dir, noise_rate=0.5).train_dataloader()))

    def strict_reward(prompts, completions, **columns):
        assert not set(EVAL_ONLY_COLUMNS) & set(columns)
        return [float(c == y) for c, y in zip(completions, columns["label"])]

    assert set(columns := reward_columns(batch)) == {"prompt", "question", "label", "id"} and "clean_label" in batch
    assert strict_reward(batch["prompt"], batch["label"], **columns) == [1.0] * len(batch["id"])


def test_label_free_rewards_ignore_permuted_labels(tok_dir):
    """Spec §7 test 15 for the vote rewards, fed from a real batch."""
    batch = reward_columns(next(iter(make(tok_dir, noise_rate=0.5, prompts_per_batch=2).train_dataloader())))
    completions = ["7", "7", "8", "no idea"] * 2
    columns = {k: [v for v in values for _ in range(4)] for k, values in batch.items()}
    permuted = dict(columns, label=columns["label"][::-1])
    for reward in (MajorityVote(), SoftSelfConsistency()):
        groups = [0] * 4 + [1] * 4
        out = [reward(columns["prompt"], completions, group_ids=groups, **cols) for cols in (columns, permuted)]
        assert out[0] == out[1]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_val_shards_cover_each_example_once(tok_dir, world):
    """Counted rows: every example once; with padding rows, every rank samples as many prompts (FSDP gathers)."""
    ids, per_rank = [], []
    for rank in range(world):
        dm = RLVRDataModule(source="add_0_20", num_train=10, num_val=11, tokenizer=tok_dir, prompts_per_batch=3)
        dm.trainer = SimpleNamespace(world_size=world, global_rank=rank, lightning_module=None)
        dm.setup("validate")
        batches = list(dm.val_dataloader())
        ids += [i for batch in batches for i, counted in zip(batch["id"], batch["counted"]) if counted]
        per_rank.append([len(batch["id"]) for batch in batches])
    assert sorted(ids) == sorted(r["id"] for r in make(num_train=10, num_val=11)._val)
    assert all(sizes == per_rank[0] for sizes in per_rank)


def test_plain_prompt_without_chat_template(tok_dir):
    dm = make(tok_dir)
    question = dm._train[0]["question"]
    assert dm.rows("train")[0]["prompt"] == TEMPLATE.format(question=question)
    dm = make(tok_dir, system_prompt="Be brief.", prompt_template="Q: {question} A:")
    assert dm.format_prompt("1 + 2") == "Be brief.\n\nQ: 1 + 2 A:"


def test_tokenizer_defaults_to_the_modules_model(tok_dir):
    dm = RLVRDataModule(source="add_1digit", num_train=4, num_val=2)
    with pytest.raises(ValueError, match="tokenizer=None"):
        dm.format_prompt("1 + 1")
    module = SimpleNamespace(model_name_or_path=tok_dir)
    dm.trainer = SimpleNamespace(world_size=1, global_rank=0, lightning_module=module)
    assert dm.format_prompt("1 + 1") == TEMPLATE.format(question="1 + 1")


def test_chat_prompt_with_smollm2_template():
    dm = make(str(resolve_model(SMOLLM2)), system_prompt="You add numbers.")  # materialised on first use
    prompt = dm.format_prompt("3 + 4")
    assert prompt.startswith("<|im_start|>system\nYou add numbers.<|im_end|>")
    assert "<|im_start|>user\nWhat is 3 + 4? Answer with just the number.<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


# --- file sources, validation, Trainer ---------------------------------------------------------------------------

def test_json_jsonl_and_saved_dataset_sources(tmp_path):
    rows = [{"question": f"{a} + {a}", "label": 2 * a} for a in range(30)] + [{"question": "0 + 0", "label": 1}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    sources = [str(tmp_path / name) for name in ("d.jsonl", "d.json", "saved")]
    dms = [make(source=source, num_train=20, num_val=10, noise_rate=0.5) for source in sources]
    for dm in dms:  # the repeated "0 + 0" is dropped, keeping its first (correct) record: no question in both splits
        assert not {r["question"] for r in dm._train} & {r["question"] for r in dm._val}
        assert all(r["clean_label"] == str(value(r["question"])) for r in dm._train + dm._val)
        assert sum(r["is_corrupted"] for r in dm._train) == 10
    assert dms[0].manifest == dms[1].manifest  # ids default to "<file stem>-<row>": both files give "d-<row>"


def test_non_integer_labels_need_zero_noise(tmp_path):
    (tmp_path / "w.jsonl").write_text("\n".join(json.dumps({"question": f"q{i}", "label": "cat"}) for i in range(6)))
    assert len(make(source=str(tmp_path / "w.jsonl"), num_train=4, num_val=2)._train) == 4
    with pytest.raises(ValueError, match="noise_rate > 0 needs integer labels"):
        make(source=str(tmp_path / "w.jsonl"), num_train=4, num_val=2, noise_rate=0.5)


@pytest.mark.parametrize("options, match", [
    ({"noise_rate": 1.5}, "noise_rate=1.5"),
    ({"noise_rate": -0.1}, "noise_rate=-0.1"),
    ({"noise_kind": "gaussian"}, "noise_kind='gaussian'.*near_miss"),
    ({"num_train": 0}, "num_train=0"),
    ({"num_val": 0}, "num_val=0"),
    ({"prompts_per_batch": 0}, "prompts_per_batch=0"),
    ({"source": "add_9digit"}, "source='add_9digit'.*add_1digit"),
    ({"source": "/no/such/file.jsonl"}, "source='/no/such/file.jsonl'"),
    ({"source": "add_1digit", "num_train": 90, "num_val": 20}, "num_train \\+ num_val=110"),
    ({"systematic_rule": "mirror"}, "systematic_rule='mirror'"),
    ({"prompt_template": "What is it?"}, "prompt_template="),
    ({"prompt_template": "{q} {question}"}, "prompt_template="),
    ({"tokenizer": "/no/such/model"}, "tokenizer='/no/such/model'"),
    ({"num_workers": -1}, "num_workers=-1"),
])  # fmt: skip
def test_bad_options_raise_naming_the_option(options, match):
    with pytest.raises(ValueError, match=match):
        RLVRDataModule(**options)


class _Probe(LightningModule):
    """Checks what a GRPO module would receive; never loads a model."""

    def __init__(self, tok_dir: str):
        super().__init__()
        self.model_name_or_path, self.layer, self.seen = tok_dir, torch.nn.Linear(1, 1), []

    def training_step(self, batch, batch_idx):
        assert batch["label"] and "is_corrupted" in batch
        self.seen += batch["id"]
        return self.layer(torch.ones(1, 1)).sum()

    def validation_step(self, batch, batch_idx):
        assert batch["label"] == batch["clean_label"]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_runs_under_a_trainer_and_logs_the_manifest_hash(tok_dir, tmp_path):
    dm = RLVRDataModule(source="add_1digit", num_train=8, num_val=4, noise_rate=0.5, prompts_per_batch=4)
    probe = _Probe(tok_dir)
    trainer = Trainer(max_epochs=1, accelerator="cpu", logger=CSVLogger(tmp_path), enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(probe, datamodule=dm)
    assert sorted(probe.seen) == sorted(dm.manifest)
    logged = (tmp_path / "lightning_logs" / "version_0" / "hparams.yaml").read_text()
    assert f"noise_manifest_sha256: {dm.manifest_hash}" in logged
