"""Lightning's FSDPStrategy on CPU processes (gloo), so that the FSDP code paths run in tests without a GPU.

Lightning accepts ``strategy="fsdp"`` on GPUs only (its check compares the exact class, so a subclass passes), and
torch's FullyShardedDataParallel runs on CPU once it is given ``device_id=cpu`` explicitly (without one it looks for
an accelerator). Two differences from the parent, both about where tensors live, none about what is computed:

- a module nothing has wrapped yet is wrapped with ``device_id=cpu``;
- full state dicts are gathered without ``offload_to_cpu``: Lightning always asks for it, and torch 2.13 then
  crashes (segmentation fault while cloning the gathered tensors) when the parameters already live on the CPU.

Sharding, checkpoints and optimizer state are otherwise Lightning's and torch's own.
From YAML: ``strategy: {class_path: tests.fsdp_cpu.CPUFSDPStrategy}``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.fabric.strategies.fsdp as fabric_fsdp
import lightning.fabric.strategies.model_parallel as fabric_model_parallel
import lightning.pytorch.strategies.fsdp as pytorch_fsdp
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, FullyShardedDataParallel, StateDictType

from lit_modules.grpo.sharding import wrap_like

# Lightning modules that build the full-state-dict context under this name.
_CONTEXT_USERS = (pytorch_fsdp, fabric_fsdp, fabric_model_parallel)


def _full_state_dict_in_place(module: torch.nn.Module, world_size: int, rank0_only: bool = True):
    return FullyShardedDataParallel.state_dict_type(
        module, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only))  # fmt: skip


@contextmanager
def _without_cpu_offload() -> Iterator[None]:
    saved = [module._get_full_state_dict_context for module in _CONTEXT_USERS]
    for module in _CONTEXT_USERS:
        module._get_full_state_dict_context = _full_state_dict_in_place
    try:
        yield
    finally:
        for module, original in zip(_CONTEXT_USERS, saved):
            module._get_full_state_dict_context = original


class CPUFSDPStrategy(FSDPStrategy):
    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.root_device.type == "cpu" and not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            # What the parent does for a module nothing has wrapped yet, with the device torch needs on CPU.
            model = wrap_like(self, model)
        return super()._setup_model(model)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        with _without_cpu_offload():
            return super().lightning_module_state_dict()

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        with _without_cpu_offload():
            return super().optimizer_state(optimizer)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        with _without_cpu_offload():
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
