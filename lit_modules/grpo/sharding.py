"""GRPOModule under Lightning's FSDPStrategy: the policy is sharded as an FSDP root of its own, gathered to sample.

Lightning wraps the whole LightningModule when nothing inside it is wrapped yet, and then runs ``training_step``
inside that root's forward, where parameters cannot be gathered for ``generate``. Wrapping the policy (and the
reference copy) in ``configure_model`` instead leaves the LightningModule unwrapped: every log-prob pass goes
through the policy's own FSDP root, and between passes its parameters can be gathered for sampling.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def is_fsdp(strategy: object) -> bool:
    """Whether ``strategy`` is Lightning's FSDPStrategy (or a subclass of it)."""
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(strategy, FSDPStrategy)


def decoder_layer_policy(model: torch.nn.Module):
    """Auto-wrap policy making each transformer block one FSDP unit: the classes transformers itself refuses to split
    across devices (``_no_split_modules``, e.g. LlamaDecoderLayer, Qwen2VLVisionBlock), as found in ``model``."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    names = set(getattr(model, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ValueError(f"{type(model).__name__} names no transformer block class (_no_split_modules) to shard by; "
                         "allowed: pass FSDPStrategy(auto_wrap_policy=...) explicitly")  # fmt: skip
    return ModuleWrapPolicy(classes)


def shard(model: torch.nn.Module, strategy) -> torch.nn.Module:
    """``model`` as an FSDP root configured like the strategy (sharding, mixed precision, CPU offload, its extra
    keyword arguments); one unit per transformer block unless the strategy names an ``auto_wrap_policy``."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    kwargs = dict(strategy.kwargs)
    kwargs.setdefault("auto_wrap_policy", decoder_layer_policy(model))
    return FullyShardedDataParallel(model, cpu_offload=strategy.cpu_offload,
                                    mixed_precision=strategy.mixed_precision_config,
                                    sharding_strategy=strategy.sharding_strategy, device_id=strategy.root_device,
                                    **kwargs)  # fmt: skip


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel)


@contextmanager
def gathered(model: torch.nn.Module, whole_model: bool) -> Iterator[bool]:
    """Context for sampling from a (possibly sharded) policy; yields whether ranks must decode in lockstep.

    ``whole_model=True`` gathers every parameter once for the whole rollout (fast; needs the full model's memory on
    each device). ``False`` gathers only the root's own parameters (embeddings, head, final norm): each block
    gathers itself at every decoding step, so all ranks must decode in lockstep (``synced_gpus``) even when their
    completions end early."""
    if not is_sharded(model):
        yield False
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(model, writeback=False, recurse=whole_model):
        yield not whole_model


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip by the global norm over every rank's shard (torch's plain clip_grad_norm_ would see only local shards)."""
    return model.clip_grad_norm_(max_norm)
