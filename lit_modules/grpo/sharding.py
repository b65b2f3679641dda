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


def wrap_like(strategy, module: torch.nn.Module, **overrides) -> torch.nn.Module:
    """``module`` as an FSDP root configured like Lightning's FSDPStrategy ``strategy`` (sharding, mixed precision,
    CPU offload, its extra keyword arguments, ``overrides`` on top), on the strategy's device."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(module, cpu_offload=strategy.cpu_offload,
                                    mixed_precision=strategy.mixed_precision_config,
                                    sharding_strategy=strategy.sharding_strategy, device_id=strategy.root_device,
                                    **{**strategy.kwargs, **overrides})  # fmt: skip


def shard(model: torch.nn.Module, strategy) -> torch.nn.Module:
    """``model`` wrapped like the strategy wraps modules; one unit per transformer block unless the strategy names an
    ``auto_wrap_policy``."""
    if "auto_wrap_policy" in strategy.kwargs:
        return wrap_like(strategy, model)
    return wrap_like(strategy, model, auto_wrap_policy=decoder_layer_policy(model))


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

