"""Prompts with verifiable labels for RL fine-tuning, with persistent label noise (spec §4).

Examples are split into disjoint train/val sets; exactly ``round(noise_rate * num_train)`` training labels are then
corrupted: the first examples of a permutation seeded with ``(noise_seed, "select")`` (a higher rate corrupts a
superset), each with a wrong label from ``random.Random(f"{noise_seed}:{id}")`` — the same on every rank, worker and
epoch, never re-sampled. Validation rows carry clean labels only; ``clean_label``/``is_corrupted`` are evaluation-only
and :func:`reward_columns` drops them before any reward sees a batch.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader

from datamodules.assets import check_model_source, resolve_model
from datamodules.image_tasks import corrupt_label, generate_images
from datamodules.synthetic import DEFAULT_TASK, IMAGE_TASKS, SYSTEMATIC_RULES, check_size, generate, get_task
from datamodules.synthetic import is_image_task, is_task
from datamodules.synthetic import near_miss_answer, task_names, uniform_answer
from datamodules.text import even_shards

NoiseKind = Literal["near_miss", "uniform", "systematic"]
NOISE_KINDS = ("near_miss", "uniform", "systematic")
EVAL_ONLY_COLUMNS = ("clean_label", "is_corrupted")
DEFAULT_TEMPLATE = "What is {question}? Answer with just the number."
IMAGE_TEMPLATE = "{question}"  # image-task questions are whole sentences already
RECORD_SUFFIXES = (".json", ".jsonl")


def reward_columns(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch without the evaluation-only columns: clean labels must never reach a reward (spec §4)."""
    return {key: value for key, value in batch.items() if key not in EVAL_ONLY_COLUMNS}


def collate_rows(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Rows -> a dict of lists (strings do not stack into tensors)."""
    return {key: [row[key] for row in rows] for key in rows[0]} if rows else {}


def read_records(source: str) -> list[dict[str, str]]:
    """``{"id", "question", "label"}`` records of a .json/.jsonl file or a ``save_to_disk`` folder (splits pooled:
    the module draws its own disjoint split)."""
    path = Path(source).expanduser()
    if path.is_dir():
        from datasets import DatasetDict, load_from_disk

        data = load_from_disk(str(path))
        parts = [data[name] for name in sorted(data)] if isinstance(data, DatasetDict) else [data]
        rows = [dict(row) for part in parts for row in part]
    else:
        text = path.read_text(encoding="utf-8")
        parsed = json.loads(text) if path.suffix == ".json" and text.lstrip().startswith("[") else None
        rows = parsed if parsed is not None else [json.loads(line) for line in text.splitlines() if line.strip()]
    return [_checked_record(row, i, path) for i, row in enumerate(rows)]


def _checked_record(row: Any, index: int, path: Path) -> dict[str, str]:
    question, label = (row.get("question"), row.get("label")) if isinstance(row, dict) else (None, None)
    if not isinstance(question, str) or not question.strip() or label is None or str(label).strip() == "":
        raise ValueError(f"{path} record {index}: needs a non-empty 'question' string and a 'label', got {row!r}")
    return {"id": str(row.get("id", f"{path.stem}-{index}")), "question": question, "label": str(label).strip()}


def split_records(records: list[dict[str, str]], num_train: int, num_val: int, seed: int, source: str):
    """Seeded disjoint (train, val) split; repeated questions keep their first record, so no question is in both."""
    first: dict[str, dict[str, str]] = {}
    unique = [first.setdefault(q, r) for r in records if (q := r["question"].strip()) not in first]
    if len({r["id"] for r in unique}) != len(unique):
        raise ValueError(f"source={source!r} has duplicate ids; allowed: one 'id' per record (or none at all)")
    if num_train + num_val > len(unique):
        raise ValueError(f"num_train + num_val={num_train + num_val} exceeds the {len(unique)} distinct questions "
                         f"of source={source!r}; allowed: at most {len(unique)}")  # fmt: skip
    random.Random(seed).shuffle(unique)
    return unique[num_val : num_val + num_train], unique[:num_val]


@dataclass(frozen=True)
class LabelSpace:
    """Integer answers in ``[low, high]`` (where ``uniform`` noise draws) and the systematic rules that apply."""

    low: int
    high: int
    rules: tuple[str, ...]

    @classmethod
    def of(cls, records: list[dict[str, str]], source: str) -> LabelSpace:
        """A synthetic task's answer range, or the range of a file's labels, which must then be integers."""
        if is_task(source):
            task = get_task(source)
            return cls(*task.answer_range(), task.systematic_rules())
        bad = next((r for r in records if not re.fullmatch(r"-?\d+", r["label"])), None)
        if bad is not None:
            raise ValueError(f"noise_rate > 0 needs integer labels, but source={source!r} has label {bad['label']!r} "
                             f"(id {bad['id']!r}); allowed: integer labels, or noise_rate=0")  # fmt: skip
        values = [int(r["label"]) for r in records]
        return cls(min(values), max(values), ("off_by_one_up", "off_by_one_down"))

    def corrupt(self, kind: str, rule: str, record: dict[str, str], rng: random.Random) -> str:
        """A label != the clean one, by ``kind``; ``rng`` is the example's own generator."""
        y = int(record["label"])
        if kind == "near_miss":  # negative labels only where the task has negative answers
            return str(near_miss_answer(y, rng, floor=min(self.low, 0)))
        if kind == "uniform":
            return str(uniform_answer(y, self.low, self.high, rng))
        return str(SYSTEMATIC_RULES[rule](record["question"], y))


def pick_rule(space: LabelSpace, noise_seed: int, rule: str | None) -> str:
    """The seed's one systematic rule: ``rule`` when given, else a seeded choice among the space's rules."""
    if rule is None:
        return random.Random(f"{noise_seed}:systematic").choice(space.rules)
    if rule not in space.rules:
        raise ValueError(f"systematic_rule={rule!r} does not apply to these labels; allowed: {list(space.rules)}")
    return rule


Corruption = Callable[[dict[str, Any], random.Random], Any]  # (record, its own generator) -> a wrong label


def build_manifest(train: list[dict[str, Any]], rate: float, noise_seed: int, corrupt: Corruption
                   ) -> tuple[dict[str, Any], set[str]]:  # fmt: skip
    """(id -> training label, ids of corrupted examples); a pure function of the records, the rate, the seed and
    ``corrupt(record, rng)``, which returns a wrong label drawn from the example's own generator."""
    order = list(range(len(train)))
    random.Random(f"{noise_seed}:select").shuffle(order)
    chosen = {train[i]["id"] for i in order[: round(rate * len(train))]}
    manifest = {}
    for record in train:
        rng = random.Random(f"{noise_seed}:{record['id']}")  # str seeds hash with SHA-512: no PYTHONHASHSEED effect
        manifest[record["id"]] = corrupt(record, rng) if record["id"] in chosen else record["label"]
    return manifest, chosen


def manifest_sha256(manifest: dict[str, str]) -> str:
    """SHA-256 of the manifest as canonical JSON (sorted keys), so equal manifests hash equally."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class RLVRDataModule(LightningDataModule):
    """Templated prompts + (noisy) verifiable labels for ``GRPOModule``; clean labels for evaluation.

    Args:
        source: a synthetic task (``add_1digit``, ``add_0_20``, ``add_10_49``, ``mul_1digit``, ``sub_0_20``, ...,
            or ``easy``/``medium``/``hard``), a generated-image task (``image_grounding``, ``image_shape``,
            ``image_colour``, ``image_pattern``, ``image_count``: rows then carry an ``image`` and prompts the
            processor's image placeholder), a local ``.json``/``.jsonl`` file of ``{"question", "label"}``
            records (optional ``"id"``), or a ``datasets.save_to_disk`` folder with those columns.
        num_train, num_val: examples per split; the splits never share a question.
        seed: seed of the question draw, of the train/val split and of the training shuffle.
        noise_rate: fraction of training labels corrupted, in [0, 1]; exactly ``round(noise_rate * num_train)``.
        noise_kind: ``near_miss`` (clean ± 1 or ± 10; image tasks: a distractor's box, a confusable class, a count
            off by one), ``uniform`` (any other value in range) or ``systematic`` (one fixed wrong rule).
        noise_seed: seed of which examples are corrupted and of their wrong labels.
        systematic_rule: pins the ``systematic`` rule; ``None`` = a seeded choice among the rules that apply.
        prompts_per_batch: prompts per training/validation batch (each is expanded to G completions later).
        tokenizer: embedded model name or local HF folder; default: the LightningModule's ``model_name_or_path``.
            Image tasks use that folder's processor (its chat template writes the image placeholder).
        prompt_template: user message with a ``{question}`` field, in the tokenizer's chat template if it has one;
            default ``"What is {question}? Answer with just the number."`` (image tasks: ``"{question}"``).
        system_prompt: optional system message (without a chat template: prepended with a blank line).
    """

    def __init__(
        self,
        source: str = DEFAULT_TASK,
        num_train: int = 64,
        num_val: int = 32,
        seed: int = 0,
        noise_rate: float = 0.0,
        noise_kind: NoiseKind = "near_miss",
        noise_seed: int = 0,
        systematic_rule: str | None = None,
        prompts_per_batch: int = 4,
        tokenizer: str | None = None,
        prompt_template: str | None = None,
        system_prompt: str | None = None,
        num_workers: int = 0,
    ):
        super().__init__()
        _check_int(1, num_train=num_train, num_val=num_val, prompts_per_batch=prompts_per_batch)
        _check_int(0, num_workers=num_workers)
        _check_source(source, num_train + num_val, systematic_rule)
        if prompt_template is None:
            prompt_template = IMAGE_TEMPLATE if is_image_task(source) else DEFAULT_TEMPLATE
        _check_options(noise_rate, noise_kind, systematic_rule, prompt_template)
        if tokenizer is not None:
            check_model_source(tokenizer, option="tokenizer")
        self.source, self.num_train, self.num_val, self.seed = source, num_train, num_val, seed
        self.noise_rate, self.noise_kind, self.noise_seed = float(noise_rate), noise_kind, noise_seed
        self.systematic_rule, self.prompts_per_batch, self.num_workers = systematic_rule, prompts_per_batch, num_workers
        self.tokenizer_source, self.prompt_template, self.system_prompt = tokenizer, prompt_template, system_prompt
        self._train: list[dict[str, Any]] | None = None  # None until build()
        self._val: list[dict[str, Any]] = []
        self._tokenizer, self._processor, self.rule = None, None, ""  # rule: the systematic rule in force (build())
        self.manifest: dict[str, str] = {}  # id -> training label; its SHA-256 is manifest_hash (both set by build)
        self.manifest_hash = ""

    def build(self) -> None:
        """Draw, split and corrupt the examples (no tokenizer needed); idempotent and identical on every rank."""
        if self._train is not None:
            return
        if is_image_task(self.source):
            self._build_images()
            return
        if is_task(self.source):
            records = generate(get_task(self.source).name, self.num_train + self.num_val, self.seed)
            train, val = records[: self.num_train], records[self.num_train :]
        else:
            train, val = split_records(read_records(self.source), self.num_train, self.num_val, self.seed, self.source)
        # Without noise no label is ever corrupted, so non-numeric labels are fine then.
        space = LabelSpace.of(train + val, self.source) if self.noise_rate > 0 else None
        if space is not None and self.noise_kind == "systematic":
            self.rule = pick_rule(space, self.noise_seed, self.systematic_rule)
        self._corrupt_split(train, val, lambda record, rng: space.corrupt(self.noise_kind, self.rule, record, rng))

    def _build_images(self) -> None:
        """Rendered images: ``num_train + num_val`` records of one seeded draw; noise from each record's own wrong
        labels (``image_tasks.corrupt_label``), the same on every rank."""
        records = generate_images(IMAGE_TASKS[self.source], self.num_train + self.num_val, self.seed)
        self._corrupt_split(records[: self.num_train], records[self.num_train :],
                            lambda record, rng: corrupt_label(record, self.noise_kind, rng))  # fmt: skip

    def _corrupt_split(self, train: list[dict[str, Any]], val: list[dict[str, Any]], corrupt: Corruption) -> None:
        self.manifest, corrupted = build_manifest(train, self.noise_rate, self.noise_seed, corrupt)
        self.manifest_hash = manifest_sha256(self.manifest)
        self._train = [dict(r, label=self.manifest[r["id"]], clean_label=r["label"], is_corrupted=r["id"] in corrupted)
                       for r in train]  # fmt: skip
        self._val = [dict(r, clean_label=r["label"]) for r in val]

    def setup(self, stage: str | None = None) -> None:
        self.build()
        # Lightning logs hparams after setup; the noise_ prefix keeps them from clashing with the module's hparams.
        noise = {"rate": self.noise_rate, "kind": self.noise_kind, "seed": self.noise_seed, "rule": self.rule,
                 "manifest_sha256": self.manifest_hash}
        self.save_hyperparameters({f"noise_{key}": value for key, value in noise.items()})

    def rows(self, split: Literal["train", "val"]) -> list[dict[str, Any]]:
        """``prompt, question, label, clean_label, [is_corrupted,] id`` per example; val labels are the clean ones."""
        self.build()
        fields = ("question", "label", "clean_label", "is_corrupted", "id", "image")
        records = self._train if split == "train" else self._val
        image = is_image_task(self.source)
        return [{"prompt": self.format_prompt(r["question"], image=image), **{f: r[f] for f in fields if f in r}}
                for r in records]  # fmt: skip

    def format_prompt(self, question: str, image: bool = False) -> str:
        """The template filled in, wrapped in the chat template when the tokenizer has one; with ``image``, the
        user message starts with an image part (the processor's chat template writes its placeholder)."""
        text = self.prompt_template.format(question=question)
        templater = self.processor() if image else self.tokenizer()
        if getattr(templater, "chat_template", None):
            messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            content = [{"type": "image"}, {"type": "text", "text": text}] if image else text
            messages.append({"role": "user", "content": content})
            return templater.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if image:
            raise ValueError(f"source={self.source!r} needs a processor with a chat template (it writes the image "
                             f"placeholder); {self._model_source()!r} has none")  # fmt: skip
        return f"{self.system_prompt}\n\n{text}" if self.system_prompt else text

    def _model_source(self) -> str:
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        name = self.tokenizer_source or getattr(module, "model_name_or_path", None)
        if name is None:
            raise ValueError("tokenizer=None needs a LightningModule with `model_name_or_path` attached through a "
                             "Trainer; allowed: tokenizer='<embedded model name or local HF folder>'")  # fmt: skip
        return name

    def tokenizer(self):
        """The tokenizer whose chat template wraps the prompts: ``tokenizer``, else the module's model (loaded once)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(resolve_model(self._model_source(), option="tokenizer"))
        return self._tokenizer

    def processor(self):
        """The image-text model's processor (image tasks): ``tokenizer``'s folder, else the module's model."""
        if self._processor is None:
            from lit_modules.vlm.processor import load_processor

            self._processor = load_processor(resolve_model(self._model_source(), option="tokenizer"))
        return self._processor

    def train_dataloader(self) -> DataLoader:
        # A seeded shuffle: reproducible epochs; under DDP Lightning swaps in its DistributedSampler.
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.rows("train"), batch_size=self.prompts_per_batch, shuffle=True, generator=generator,
                          collate_fn=collate_rows, num_workers=self.num_workers)  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        # Padding rows (``counted`` False) even out the shards; GRPOModule samples them but does not score them.
        rows, sampler = even_shards(self.rows("val"), world, rank)
        return DataLoader(rows, batch_size=self.prompts_per_batch, sampler=sampler, collate_fn=collate_rows,
                          num_workers=self.num_workers)  # fmt: skip

    test_dataloader = val_dataloader  # held-out clean data either way


def _check_source(source: str, num_examples: int, rule: str | None) -> None:
    if is_image_task(source):
        if rule is not None:
            raise ValueError(f"systematic_rule={rule!r} does not apply to image tasks (their systematic noise is a "
                             "fixed wrong class/box per example); allowed: None")  # fmt: skip
        return
    if is_task(source):
        task = get_task(source, option="source")
        check_size(task, num_examples, option="num_train + num_val")
        if rule is not None:  # a rule the task has no use for (carry_flip on products) is refused now, not at setup
            pick_rule(LabelSpace(*task.answer_range(), task.systematic_rules()), 0, rule)
        return
    if not ((path := Path(source).expanduser()).is_dir() or (path.is_file() and path.suffix in RECORD_SUFFIXES)):
        what = "a file with another suffix" if path.is_file() else "neither a synthetic task nor an existing path"
        raise ValueError(f"source={source!r} is {what}; allowed: one of {task_names()}, a local "
                         f"{'/'.join(RECORD_SUFFIXES)} file or a datasets.save_to_disk folder")  # fmt: skip


def _check_int(minimum: int, **values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name}={value!r} is not allowed; allowed: an integer >= {minimum}")


def _check_options(rate: float, kind: str, rule: str | None, template: str) -> None:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise_rate={rate!r} is not allowed; allowed: a number in [0, 1]")
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise_kind={kind!r} is not allowed; allowed: {list(NOISE_KINDS)}")
    if rule is not None and rule not in SYSTEMATIC_RULES:
        raise ValueError(f"systematic_rule={rule!r} is not allowed; allowed: None or one of {list(SYSTEMATIC_RULES)}")
    try:
        filled = template.format(question="\0")
    except (KeyError, IndexError, ValueError):  # another {field}, or a lone brace
        filled = ""
    if "\0" not in filled:
        raise ValueError(f"prompt_template={template!r} is not allowed; allowed: text with a '{{question}}' field "
                         "and no other fields (write literal braces as {{ and }})")  # fmt: skip
