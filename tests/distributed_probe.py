"""A test-only callback that records, per rank, what a distributed run did (used by ``test_distributed.py``).

The CLI loads it by ``class_path: tests.distributed_probe.RankProbe`` (the test puts the repository on
``PYTHONPATH``). Each rank writes ``rank<k>.json`` into ``out_dir``:

- checksums of the compressible weights and of their zero masks, computed independently of the callback
  under test, right before validation batches run (after every callback's ``on_validation_start``; under FSDP
  the full weights, gathered by torch);
- what the ``CompressionCallback`` under test reported on this rank (``report["weights_sha256"]``);
- a digest of every validation window this rank evaluated, to check the sharding has no padding;
- the synced validation metrics seen by this rank at the end.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel

from callbacks.calibration.callback import CompressionCallback, find_hf_model
from callbacks.calibration.distributed import checksum
from callbacks.calibration.layers import weight_matrix


class RankProbe(Callback):
    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.record: dict = {}

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Under FSDP each rank holds a shard: read the full weights, gathered by torch (not by the code under test).
        gathered = (FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False)
                    if isinstance(trainer.strategy, FSDPStrategy) else nullcontext())  # fmt: skip
        with gathered:
            model = find_hf_model(pl_module)
            weights = [weight_matrix(m).detach().clone() for m in CompressionCallback._compressed_modules(model)]
        reports = [cb.report for cb in trainer.callbacks if isinstance(cb, CompressionCallback)]
        self.record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "weights_sha256": checksum(weights),
            "mask_sha256": checksum([(w == 0).to(torch.uint8) for w in weights]),
            "zeros": int(sum(int((w == 0).sum()) for w in weights)),
            "report_sha256": [r["weights_sha256"] if r else None for r in reports],
            "windows": [],
        }

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        for row in batch["input_ids"][batch["counted"]]:  # padding rows (uneven shards) are run, not counted
            self.record["windows"].append(hashlib.sha256(row.cpu().to(torch.int64).numpy().tobytes()).hexdigest())

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.record["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()}
        out = Path(self.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record, indent=1))


class WeightsProbe(Callback):
    """Per rank, at the end of fit: a checksum of every parameter and the optimizer steps taken (GRPO under DDP)."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        params = [p.detach() for p in pl_module.parameters()]
        record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "global_step": trainer.global_step,
                  "weights_sha256": checksum(params), "metrics": {k: float(v) for k, v in
                                                                  trainer.callback_metrics.items()}}
        out = Path(self.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record, indent=1))


def state_checksum(state_dict: dict[str, torch.Tensor], prefix: str) -> str:
    """Checksum of the entries under ``prefix``, in key order (a Lightning checkpoint's or a gathered state dict)."""
    return checksum([state_dict[k] for k in sorted(state_dict) if k.startswith(prefix)])


class ShardProbe(Callback):
    """Per rank, when training starts (after any checkpoint is restored): how many of the policy's parameter values
    this rank holds, and (rank 0) a checksum of the full policy gathered by the strategy, as a checkpoint holds it;
    at the end of fit, the metrics this rank saw."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.record: dict = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        state = trainer.strategy.lightning_module_state_dict()  # a collective under FSDP: every rank calls it
        self.record = {"rank": trainer.global_rank,
                       "local_numel": sum(p.numel() for p in pl_module.model.parameters()),
                       "full_numel": sum(v.numel() for k, v in state.items() if k.startswith("model.")),
                       "policy_sha256": state_checksum(state, "model.") if trainer.is_global_zero else None}

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.record["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()}
        out = Path(self.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record, indent=1))
