"""Reading text from local files or from a ``datasets`` dataset saved on disk (never from a hub)."""

from __future__ import annotations

from pathlib import Path

from datamodules.assets import CORPUS_SPLITS, EMBEDDED_CORPORA

# File suffix -> the `datasets` builder that reads it.
FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def check_text_source(source: str, split: str | None) -> str | None:
    """Validate ``source``/``split`` cheaply (no reading) and return the effective split."""
    if source in EMBEDDED_CORPORA:
        split = split or "evaluation"
        if split not in CORPUS_SPLITS:
            raise ValueError(f"split={split!r} is not a split of {source!r}; allowed: {list(CORPUS_SPLITS)}")
        return split
    path = Path(source).expanduser()
    if not path.exists():
        raise ValueError(
            f"source={source!r} does not exist; allowed: one of {list(EMBEDDED_CORPORA)}, a local file "
            f"({', '.join(sorted(FILE_BUILDERS))}) or a folder written by datasets.save_to_disk"
        )
    if path.is_file():
        if path.suffix not in FILE_BUILDERS:
            raise ValueError(f"source={source!r} has suffix {path.suffix!r}; allowed: {sorted(FILE_BUILDERS)}")
        if split is not None:
            raise ValueError(f"split={split!r} was given for the file {source!r}; allowed: None (files have no splits)")
    return split


def load_texts(source: str, split: str | None, text_field: str) -> list[str]:
    """All non-empty texts of a local file or saved dataset, in file order."""
    import datasets

    path = Path(source).expanduser()
    if path.is_file():
        data = datasets.load_dataset(FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
        if path.suffix == ".txt":
            # The text builder yields one row per line; a text file is read as one document.
            return [path.read_text(encoding="utf-8")]
    else:
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise ValueError(f"split={split!r} is not in the dataset at {source!r}; allowed: {sorted(data)}")
            data = data[split]
        elif split is not None:
            raise ValueError(f"split={split!r} was given but {source!r} holds a single Dataset; allowed: None")
    if text_field not in data.column_names:
        raise ValueError(f"text_field={text_field!r} is not a column of {source!r}; allowed: {data.column_names}")
    return [t for t in data[text_field] if isinstance(t, str) and t.strip()]
