"""Distributed rules for callbacks that rewrite weights (pruning spec §7).

Under ``trainer.validate``/``test`` Lightning does not wrap the model in DDP, and under ``fit`` DDP syncs
gradients, not in-place weight edits, so replicas only stay identical if we make them: every rank computes
the same layer on the same data, then rank 0 broadcasts the result, one tensor per module in sorted-name
order so that every rank issues the same collectives in the same order. Under FSDP the same happens on the full
weights, gathered on every rank for the duration of the callback and written back to the shards afterwards.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

# Strategies whose parameters are sharded outside forward and that litforge cannot gather yet (by class name:
# DeepSpeed's strategy cannot even be imported without DeepSpeed installed).
UNGATHERED_STRATEGIES = ("DeepSpeedStrategy", "ModelParallelStrategy")


def ungathered_strategy(strategy: object) -> str | None:
    """The name of the class in ``strategy``'s hierarchy that is one of ``UNGATHERED_STRATEGIES``, else None."""
    refused = sorted({cls.__name__ for cls in type(strategy).__mro__} & set(UNGATHERED_STRATEGIES))
    return refused[0] if refused else None


def is_fsdp(strategy: object) -> bool:
    """Whether ``strategy`` is Lightning's FSDPStrategy (or a subclass of it)."""
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(strategy, FSDPStrategy)


def refuse_unsupported_strategy(strategy: object, callback_name: str, offload: bool = False) -> None:
    """Raise a clear error for strategies whose weights this callback cannot rewrite (and for ``offload`` under
    FSDP: moving a layer between devices would detach it from the gathered parameters it must write back to)."""
    refused = ungathered_strategy(strategy)
    if refused:
        raise MisconfigurationException(
            f"{callback_name} does not support the {refused} strategy yet (its weights are sharded and "
            "only FSDP's can be gathered here). Use strategy='fsdp' or 'ddp' (or a single device) to compress, "
            "save_pretrained the result, and load it under the other strategy afterwards.")  # fmt: skip
    if offload and is_fsdp(strategy):
        raise MisconfigurationException(
            f"{callback_name}(offload=True) does not support the FSDPStrategy strategy: the weights are gathered on "
            "every device for compression, and offloading layers would move them out of that gathered copy. "
            "Use offload=False under FSDP, or strategy='ddp' with offload=True.")


@contextmanager
def full_weights(strategy: object, module: nn.Module) -> Iterator[None]:
    """Under FSDP: every parameter of ``module`` gathered, and edits written back to each rank's shard on exit.

    Nested FSDP units (an ``auto_wrap_policy``) are swapped for the modules they wrap for the duration, so that the
    layers, names and ``save_pretrained`` keys the callbacks see are those of the single-device model. The gathered
    copy needs the full model's memory on each device while the callback runs (as under ddp); gathering one block
    at a time is not implemented. Other strategies: nothing to do."""
    if not is_fsdp(strategy):
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(strategy.model, writeback=True):
        wrapped = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
                   if isinstance(child, FullyShardedDataParallel)]  # fmt: skip
        for parent, name, child in wrapped:
            setattr(parent, name, child.module)
        try:
            yield
        finally:
            for parent, name, child in wrapped:
                setattr(parent, name, child)


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
        # A copy: numpy() on a CPU tensor shares its storage and pins its size, and FSDP must free the storage of
        # the parameters it gathered (full_weights) once the callback is done.
        digest.update(tensor.detach().to("cpu", copy=True).contiguous().view(torch.uint8).numpy().tobytes())
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
