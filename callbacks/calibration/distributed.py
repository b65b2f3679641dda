"""Distributed rules for callbacks that rewrite weights (pruning spec §7).

Under ``trainer.validate``/``test`` Lightning does not wrap the model in DDP, and under ``fit`` DDP syncs
gradients, not in-place weight edits, so replicas only stay identical if we make them: every rank computes
the same layer on the same data, then rank 0 broadcasts the result, one tensor per module in sorted-name
order so that every rank issues the same collectives in the same order.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import MisconfigurationException

# Strategies whose parameters are sharded outside forward: a weight edit there would touch only a shard.
_SHARDED_STRATEGIES = ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")


def refuse_sharded_strategy(strategy: object, callback_name: str) -> None:
    """Raise a clear error for strategies whose weights this callback cannot rewrite yet."""
    names = {cls.__name__ for cls in type(strategy).__mro__}
    refused = names.intersection(_SHARDED_STRATEGIES)
    if refused:
        raise MisconfigurationException(
            f"{callback_name} does not support the {sorted(refused)[0]} strategy yet (its weights are sharded, so "
            "masks and quantized weights cannot be written back safely). Use strategy='ddp' (or a single device) "
            "to compress, save_pretrained the result, and load it under the sharded strategy afterwards."
        )


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_from_rank0(tensors: list[torch.Tensor]) -> None:
    """Overwrite ``tensors`` on every rank with rank 0's values, in the given (deterministic) order."""
    if not is_distributed():
        return
    for tensor in tensors:
        # gloo cannot broadcast every dtype/device combination in place; go through a contiguous buffer.
        buffer = tensor.detach().contiguous().clone()
        dist.broadcast(buffer, src=0)
        tensor.data.copy_(buffer)


def checksum(tensors: list[torch.Tensor]) -> str:
    """SHA-256 of the raw bytes of ``tensors`` (in order), to compare replicas or runs."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def assert_identical_across_ranks(tensors: list[torch.Tensor], what: str) -> str:
    """All-gather a checksum of ``tensors`` and raise if any rank differs; return the checksum."""
    local = checksum(tensors)
    if not is_distributed():
        return local
    gathered: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    if len(set(gathered)) != 1:
        raise RuntimeError(f"{what} differ across ranks: {gathered}")
    return local
