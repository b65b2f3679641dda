"""Text windows for perplexity evaluation and for calibrating compression callbacks.

One ``TextDataModule`` stands for one text source and split. It yields

- **evaluation windows**: the texts joined with ``"\\n\\n"``, tokenised once, cut into ``floor(len / seqlen)``
  non-overlapping windows (the remainder is dropped; windows carry no context) — the WikiText protocol of
  the pruning/quantization literature;
- **calibration windows**: ``nsamples`` windows of ``seqlen`` tokens at random offsets in the joined text,
  drawn with a private ``random.Random(seed)`` so every rank and every run draws the same ones.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.assets import EMBEDDED_CORPORA, WIKI_LEADS, resolve_model, wiki_leads
from datamodules.text_sources import check_text_source, load_texts

JOIN = "\n\n"


class WindowDataset(Dataset):
    """Rows of a ``[num_windows, seqlen]`` token tensor as ``{"input_ids": LongTensor[seqlen]}``."""

    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[index]}


class EvenShardSampler(DistributedSampler):
    """Rank ``r`` of ``w`` takes indices ``r, r+w, ...``; shorter shards are topped up with *padding indices*
    (``>= len(dataset)``), so every rank runs ``ceil(n / w)`` items.

    Every rank must run the same number of forward passes under FSDP (each one gathers parameters collectively), and
    an evaluation metric must count every item once. ``DistributedSampler`` pads with repeated real items, which a
    perplexity would count twice; here ``CountedItems`` turns a padding index into a copy of an item marked
    ``counted=False``, which modules run but do not count. Subclassing DistributedSampler tells Lightning not to
    inject its own sampler.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)

    def __iter__(self):
        size = len(self.dataset)
        own = list(range(self.rank, size, self.num_replicas))
        return iter(own + list(range(size, size + len(self) - len(own))))

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.num_replicas)


class CountedItems(Dataset):
    """Items of ``data`` (dicts) with a ``counted`` flag: ``True`` for a real index, ``False`` for a padding index
    from ``EvenShardSampler`` (which then returns a copy of a real item)."""

    def __init__(self, data, padding: int = 0):
        self.data, self.padding = data, padding

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.data) + self.padding:
            raise IndexError(f"index {index} outside the {len(self.data)} items and {self.padding} padding indices")
        return {**self.data[index % len(self.data)], "counted": index < len(self.data)}


def even_shards(data, world: int, rank: int) -> tuple[Dataset, EvenShardSampler | None]:
    """``(dataset, sampler)`` of an evaluation loader: this rank's items plus padding, each with ``counted``."""
    return CountedItems(data, padding=world - 1), (EvenShardSampler(data, world, rank) if world > 1 else None)


def pad_shard(local: list[dict], items: list[dict], world: int) -> list[dict]:
    """A shard of ``items`` topped up to ``ceil(len(items) / world)`` with uncounted copies (see EvenShardSampler)."""
    padding = [{**items[0], "counted": False}] * (-(-len(items) // world) - len(local)) if items else []
    return [{**item, "counted": True} for item in local] + padding


def eval_windows(token_ids: list[int], seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping ``[w, seqlen]`` windows, ``w = floor(len / seqlen)`` (capped at ``max_windows``)."""
    count = len(token_ids) // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    return torch.tensor(token_ids[: count * seqlen], dtype=torch.long).view(count, seqlen)


def calibration_windows(token_ids: list[int], seqlen: int, nsamples: int, seed: int) -> torch.Tensor:
    """``[nsamples, seqlen]`` windows starting at uniform random offsets of the joined token stream."""
    rng = random.Random(seed)
    last_start = len(token_ids) - seqlen
    starts = [rng.randint(0, last_start) for _ in range(nsamples)]
    return torch.tensor([token_ids[s : s + seqlen] for s in starts], dtype=torch.long)


def tokens_digest(windows: torch.Tensor) -> str:
    """SHA-256 of the window tokens, recorded in reports so a calibration set can be identified later."""
    return hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()


class TextDataModule(LightningDataModule):
    """Perplexity windows (val/test/predict) and calibration windows (train, ``calibration_windows()``).

    Args:
        source: ``"wiki-leads"`` (embedded Wikipedia lead sections) or a local ``.txt`` / ``.json`` /
            ``.jsonl`` / ``.csv`` / ``.parquet`` file or a folder written by ``datasets.save_to_disk``.
        split: for ``wiki-leads``: ``"evaluation"`` (default) or ``"calibration"``; for a saved
            ``DatasetDict``: one of its splits; files have no splits.
        text_field: column holding the text in JSON/CSV/Parquet/``datasets`` sources.
        tokenizer: embedded model name or local HF folder; default: the model of the LightningModule.
        seqlen: tokens per window.
        max_windows: cap on evaluation windows (the first ones, in corpus order); ``None`` = all.
        nsamples: number of calibration windows.
        seed: seed of the calibration draw.
        batch_size: windows per batch.
        zeroshot: an optional ``ZeroShotDataModule`` whose tasks are evaluated alongside perplexity.
    """

    def __init__(
        self,
        source: str = WIKI_LEADS,
        split: str | None = None,
        text_field: str = "text",
        tokenizer: str | None = None,
        seqlen: int = 512,
        max_windows: int | None = None,
        nsamples: int = 128,
        seed: int = 0,
        batch_size: int = 1,
        num_workers: int = 0,
        zeroshot: LightningDataModule | None = None,
    ):
        super().__init__()
        _require_positive(seqlen=seqlen, nsamples=nsamples, batch_size=batch_size)
        if max_windows is not None:
            _require_positive(max_windows=max_windows)
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} is negative; allowed: an integer >= 0")
        self.split = check_text_source(source, split)
        self.source, self.text_field, self.tokenizer_source = source, text_field, tokenizer
        self.seqlen, self.max_windows, self.nsamples, self.seed = seqlen, max_windows, nsamples, seed
        self.batch_size, self.num_workers, self.zeroshot = batch_size, num_workers, zeroshot
        self._token_ids: list[int] | None = None
        self._tokenizer = None

    # -- data ------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.zeroshot is not None:
            self.zeroshot.trainer = self.trainer
            self.zeroshot.setup(stage)
        self.token_ids()

    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            folder = resolve_model(self._tokenizer_name(), option="tokenizer")
            self._tokenizer = AutoTokenizer.from_pretrained(folder)
            self._check_context(folder)
        return self._tokenizer

    def token_ids(self) -> list[int]:
        """The whole source text, joined and tokenised once."""
        if self._token_ids is None:
            texts = self._texts()
            ids = self.tokenizer()(JOIN.join(texts))["input_ids"]
            if len(ids) < self.seqlen + 1:
                raise ValueError(
                    f"seqlen={self.seqlen} is longer than the text of source={self.source!r} "
                    f"({len(ids)} tokens); allowed: seqlen < {len(ids)}"
                )
            self._token_ids = ids
        return self._token_ids

    def eval_windows(self) -> torch.Tensor:
        return eval_windows(self.token_ids(), self.seqlen, self.max_windows)

    def calibration_windows(self) -> torch.Tensor:
        ids = self.token_ids()
        # Random offsets may overlap, but a text shorter than nsamples disjoint windows would make the
        # calibration set mostly repeats of itself.
        if len(ids) < self.nsamples * self.seqlen:
            raise ValueError(
                f"nsamples={self.nsamples} windows of seqlen={self.seqlen} need {self.nsamples * self.seqlen} tokens "
                f"but source={self.source!r} has {len(ids)}; allowed: nsamples <= {len(ids) // self.seqlen}"
            )
        return calibration_windows(ids, self.seqlen, self.nsamples, self.seed)

    # -- loaders ---------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        data = WindowDataset(self.calibration_windows())
        return DataLoader(data, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self):
        loaders = [self._eval_loader()]
        if self.zeroshot is not None:
            loaders.append(self.zeroshot.val_dataloader())
        return loaders[0] if len(loaders) == 1 else loaders

    def test_dataloader(self):
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def _eval_loader(self) -> DataLoader:
        data, sampler = even_shards(WindowDataset(self.eval_windows()), *self._world())
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    # -- helpers ---------------------------------------------------------------------------------
    def _texts(self) -> list[str]:
        if self.source in EMBEDDED_CORPORA:
            return wiki_leads(self.split)
        return load_texts(self.source, self.split, self.text_field)

    def _tokenizer_name(self) -> str:
        if self.tokenizer_source is not None:
            return self.tokenizer_source
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        name = getattr(module, "model_name_or_path", None)
        if name is None:
            raise ValueError(
                "tokenizer=None needs a LightningModule with `model_name_or_path` attached through a Trainer; "
                "allowed: pass tokenizer='<embedded model name or local HF folder>'"
            )
        return name

    def _check_context(self, folder: Path) -> None:
        from transformers import AutoConfig

        if not (Path(folder) / "config.json").is_file():
            return
        config = AutoConfig.from_pretrained(folder).get_text_config()
        context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if context is not None and self.seqlen > context:
            raise ValueError(
                f"seqlen={self.seqlen} exceeds the model's context of {context} tokens; allowed: 1..{context}"
            )

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank


def _require_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is not allowed; allowed: an integer >= 1")
