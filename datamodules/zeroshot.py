"""Zero-shot multiple-choice evaluation data: shipped BIG-bench extracts or local JSON/JSONL/`datasets`.

A task is a list of records `{"context": str, "choices": [str, ...], "label": int}`. Each choice is
scored as a continuation of the context, the way lm-evaluation-harness does it: context and
continuation are encoded together and split at the context's token length, so the choice tokens are
exactly those the model has to predict after the context.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datamodules.text import pad_shard

SHIPPED_DIR = Path(__file__).parent / "data" / "zeroshot"
JSON_SUFFIXES = (".json", ".jsonl")


def shipped_tasks() -> dict[str, Path]:
    """Name -> file of every task shipped with the package (the file name without `.jsonl`)."""
    return {path.stem: path for path in sorted(SHIPPED_DIR.glob("*.jsonl"))}


# --- reading and validating records ----------------------------------------------------------------

def validate_record(record: Any, where: str) -> dict[str, Any]:
    """Check one record's shape; `where` (file and line) goes into the error message."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with context/choices/label, got {type(record).__name__}")
    context, choices, label = record.get("context"), record.get("choices"), record.get("label")
    if not isinstance(context, str):
        raise ValueError(f"{where}: 'context' must be a string, got {context!r}")
    if not isinstance(choices, list) or len(choices) < 2:
        raise ValueError(f"{where}: 'choices' must be a list of at least 2 strings, got {choices!r}")
    if not all(isinstance(c, str) and c.strip() for c in choices):
        raise ValueError(f"{where}: every choice must be a non-blank string, got {choices!r}")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise ValueError(f"{where}: 'label' must be an integer in [0, {len(choices) - 1}], got {label!r}")
    return {"context": context, "choices": list(choices), "label": label}


def read_json_lines(path: Path, text: str) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {number}: not valid JSON ({err.msg})") from None
        records.append(validate_record(record, f"{path} line {number}"))
    return records


def read_json_file(path: Path) -> list[dict[str, Any]]:
    """A .jsonl file, or a .json file holding either a JSON array of records or JSON Lines."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            parsed = None  # not one JSON document: JSON Lines, as `datasets`' json loader also accepts
        if isinstance(parsed, list):
            return [validate_record(r, f"{path} record {i}") for i, r in enumerate(parsed)]
    return read_json_lines(path, text)


def read_saved_dataset(path: Path) -> list[dict[str, Any]]:
    """A folder written by `datasets.Dataset.save_to_disk` (or a DatasetDict with one evaluation split)."""
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except FileNotFoundError:
        raise ValueError(f"tasks: folder {path} is not a `datasets` save_to_disk folder") from None
    if isinstance(data, DatasetDict):
        split = next((s for s in ("test", "validation") if s in data), None)
        if split is None and len(data) != 1:
            raise ValueError(f"tasks: {path} holds splits {list(data)}; expected 'test', 'validation' or just one")
        data = data[split or next(iter(data))]
    return [validate_record(row, f"{path} row {i}") for i, row in enumerate(data)]


def resolve_task(spec: str) -> tuple[str, Path]:
    """A `tasks` entry -> (task name, path). Raises ValueError naming what is allowed."""
    shipped = shipped_tasks()
    if spec in shipped:
        return spec, shipped[spec]
    path = Path(spec).expanduser()
    looks_like_path = path.suffix in JSON_SUFFIXES or "/" in spec or "\\" in spec
    if not looks_like_path and not path.exists():
        raise ValueError(f"tasks: unknown task {spec!r}; shipped tasks are {sorted(shipped)}, "
                         "or give a path to a .json/.jsonl file or a `datasets` save_to_disk folder")
    if not path.exists():
        raise ValueError(f"tasks: file {spec!r} does not exist")
    if path.is_file() and path.suffix not in JSON_SUFFIXES:
        raise ValueError(f"tasks: {spec!r} must be a .json or .jsonl file or a `datasets` save_to_disk folder")
    return path.stem if path.is_file() else path.name, path


def load_task(path: Path) -> list[dict[str, Any]]:
    return read_saved_dataset(path) if path.is_dir() else read_json_file(path)


# --- tokenization ----------------------------------------------------------------------------------

def start_ids(tokenizer: Any) -> list[int]:
    """[BOS] when the tokenizer adds BOS by default (the model was trained to see it first), else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    probe = tokenizer("a")["input_ids"]
    return [bos] if probe and probe[0] == bos else []


def split_continuation(context: str, choice: str) -> tuple[str, str]:
    """(context, continuation) such that context + continuation is the text the model reads.

    A separating space is added unless the context already ends with whitespace. Trailing whitespace
    moves into the continuation because BPE tokenizers glue a space to the following word (" Yes" is one
    token): splitting the joint encoding right after "Answer: " would otherwise cut inside a token.
    """
    stripped = context.rstrip()
    if stripped != context:
        return stripped, context[len(stripped):] + choice
    return context, (" " + choice if context else choice)


def encode_example(tokenizer: Any, record: dict[str, Any], task: str, prefix: Sequence[int]) -> dict[str, Any]:
    """Tokenize one record into the batch format (see `ZeroShotDataModule`)."""
    context = split_continuation(record["context"], "")[0]  # the context part is the same for every choice
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    choice_ids = []
    for choice in record["choices"]:
        continuation = split_continuation(record["context"], choice)[1]
        joint = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        tail = joint[len(context_ids):]
        if not tail:
            raise ValueError(f"task {task!r}: choice {choice!r} encodes to no tokens after its context")
        choice_ids.append(tail)
    context_ids = list(prefix) + context_ids
    if not context_ids:
        # The first choice token needs a position to be predicted from.
        if tokenizer.eos_token_id is None:
            raise ValueError(f"task {task!r}: empty context and the tokenizer has neither BOS nor EOS")
        context_ids = [tokenizer.eos_token_id]
    return {
        "task": task,
        "context_ids": context_ids,
        "choice_ids": choice_ids,
        "choice_chars": [len(c) for c in record["choices"]],
        "label": record["label"],
    }


# --- distribution ----------------------------------------------------------------------------------

def shard(items: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """This rank's share, `items[rank::world_size]`: every item on exactly one rank, none padded."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) with world_size >= 1, got rank={rank}, world_size={world_size}")
    return list(items[rank::world_size])


class ExampleStream(IterableDataset):
    """An already-sharded list of examples.

    Iterable on purpose: Lightning wraps the sampler of a map-style dataset in a DistributedSampler,
    which would shard a second time and pad with repeated examples; iterable datasets are left alone.
    """

    def __init__(self, examples: list[dict[str, Any]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self):
        worker = get_worker_info()
        if worker is None:
            return iter(self.examples)
        return iter(self.examples[worker.id::worker.num_workers])  # each worker yields a disjoint part


def collate_examples(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep examples as plain dicts: choices have ragged lengths, the module pads what it needs."""
    return list(batch)


# --- the data module -------------------------------------------------------------------------------

class ZeroShotDataModule(LightningDataModule):
    """Multiple-choice tasks scored zero-shot by log-likelihood of each choice.

    Args:
        tasks: shipped task names (see `shipped_tasks()`) or paths to local .json/.jsonl files or
            `datasets.Dataset.save_to_disk` folders, with records {"context", "choices", "label"}.
        tokenizer: path of a Hugging Face tokenizer folder; None takes the `tokenizer` attribute of the
            trainer's LightningModule at `setup()`.
        max_examples_per_task: keep only the first k examples of each task (deterministic).
        num_workers: DataLoader worker processes.

    Batches (val and test) are lists of dicts {"task", "context_ids", "choice_ids", "choice_chars",
    "label"}. Under DDP each rank gets `examples[rank::world_size]`, so no example is counted twice, topped up with
    uncounted copies so that every rank runs as many forward passes (FSDP gathers parameters in each).
    """

    def __init__(
        self,
        tasks: list[str],
        tokenizer: str | None = None,
        max_examples_per_task: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(tasks, str) or not tasks:
            raise ValueError(f"tasks: expected a non-empty list of task names or paths, got {tasks!r}; "
                             f"shipped tasks are {sorted(shipped_tasks())}")
        if max_examples_per_task is not None and max_examples_per_task < 1:
            raise ValueError(f"max_examples_per_task: must be None or >= 1, got {max_examples_per_task!r}")
        if num_workers < 0:
            raise ValueError(f"num_workers: must be >= 0, got {num_workers!r}")
        if tokenizer is not None and not Path(tokenizer).expanduser().is_dir():
            raise ValueError(f"tokenizer: {tokenizer!r} is not a folder; give a saved Hugging Face tokenizer "
                             "folder or None to use the LightningModule's tokenizer")
        self.save_hyperparameters()
        self.tokenizer_path = tokenizer
        self.max_examples_per_task = max_examples_per_task
        self.num_workers = num_workers
        self.records = self._load_records(tasks)
        self.examples: list[dict[str, Any]] | None = None
        self.local_examples: list[dict[str, Any]] = []

    def _load_records(self, tasks: list[str]) -> dict[str, list[dict[str, Any]]]:
        """Read and validate every task now, so a bad config fails before any model is loaded."""
        records: dict[str, list[dict[str, Any]]] = {}
        for spec in tasks:
            name, path = resolve_task(str(spec))
            if name in records:
                raise ValueError(f"tasks: two entries are named {name!r}; task names must be unique")
            rows = load_task(path)
            if not rows:
                raise ValueError(f"tasks: {spec!r} holds no examples")
            records[name] = rows[: self.max_examples_per_task]
        return records

    @property
    def task_names(self) -> list[str]:
        return list(self.records)

    def _tokenizer(self) -> Any:
        if self.tokenizer_path is not None:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(Path(self.tokenizer_path).expanduser()))
        module = self.trainer.lightning_module if self.trainer is not None else None
        if getattr(module, "tokenizer", None) is None:
            raise ValueError("tokenizer: is None, so the trainer's LightningModule must have a `tokenizer` "
                             "attribute; give a tokenizer folder path or attach the data module to a trainer")
        return module.tokenizer

    def _rank_and_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def setup(self, stage: str | None = None) -> None:
        if self.examples is None:  # tokenize once; setup runs again for each stage
            tokenizer = self._tokenizer()
            prefix = start_ids(tokenizer)
            self.examples = [encode_example(tokenizer, record, task, prefix)
                             for task, rows in self.records.items() for record in rows]
        rank, world = self._rank_and_world()
        self.local_examples = pad_shard(shard(self.examples, rank, world), self.examples, world)

    def _dataloader(self) -> DataLoader:
        if self.examples is None:
            raise RuntimeError("ZeroShotDataModule.setup() must run before asking for a dataloader")
        return DataLoader(ExampleStream(self.local_examples), batch_size=1, collate_fn=collate_examples,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._dataloader()

    def test_dataloader(self) -> DataLoader:
        return self._dataloader()
