"""The two blocks LLM-Barber rebuilds in every decoder layer — attention, then MLP — found generically.

A block is what Barber copies densely and compares against the sparse layer: a module to call, the module
whose input is the block input (a forward pre-hook, so the attention block gets the layer's own masks and
rotary tables), and the module whose output is the block output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from callbacks.calibration.layers import compressible_linears

ATTENTION_NAMES = ("self_attn", "attn", "attention")


class FeedForward(nn.Module):
    """OPT keeps fc1/activation/fc2 on the layer itself; this groups them into a callable MLP block."""

    def __init__(self, fc1: nn.Module, activation: Any, fc2: nn.Module):
        super().__init__()
        self.fc1, self.fc2, self.activation = fc1, fc2, activation

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(hidden_states)))


@dataclass
class Block:
    """One rebuild unit of a decoder layer.

    ``linears`` maps the layer-relative names of the block's compressible modules (``"self_attn.q_proj"``)
    to the block-relative names inside ``module`` (``"q_proj"``).
    """

    kind: str
    module: nn.Module
    entry: nn.Module
    exit: nn.Module
    linears: dict[str, str] = field(default_factory=dict)


def _relative(prefix: str, names: list[str]) -> dict[str, str]:
    return {name: name[len(prefix) + 1 :] for name in names if name.startswith(prefix + ".")}


def layer_blocks(layer: nn.Module) -> list[Block]:
    """Attention and MLP blocks of ``layer``; every compressible linear must belong to exactly one."""
    names = list(compressible_linears(layer))
    blocks = []
    for attr in ATTENTION_NAMES:
        module = getattr(layer, attr, None)
        if isinstance(module, nn.Module):
            blocks.append(Block("attention", module, module, module, _relative(attr, names)))
            break
    mlp = getattr(layer, "mlp", None)
    if isinstance(mlp, nn.Module):
        blocks.append(Block("mlp", mlp, mlp, mlp, _relative("mlp", names)))
    elif all(isinstance(getattr(layer, a, None), nn.Module) for a in ("fc1", "fc2")):
        block = FeedForward(layer.fc1, layer.activation_fn, layer.fc2)
        blocks.append(Block("mlp", block, layer.fc1, layer.fc2, {"fc1": "fc1", "fc2": "fc2"}))
    covered = [name for block in blocks for name in block.linears]
    missing = sorted(set(names) - set(covered))
    if missing or len(blocks) != 2:
        raise ValueError(
            f"cannot split {type(layer).__name__} into an attention block ({'/'.join(ATTENTION_NAMES)}) and an "
            f"MLP block (mlp or fc1/fc2) for LLM-Barber; modules outside both: {missing}"
        )
    return blocks


class BlockRecorder:
    """Hooks that hand every (block input, block kwargs, block output) of a layer pass to ``on_sample``."""

    def __init__(self, block: Block, on_sample):
        self.block, self.on_sample = block, on_sample
        self._pending: list[tuple[torch.Tensor, dict[str, Any], bool]] = []
        self._handles = []

    def __enter__(self) -> BlockRecorder:
        self._handles = [
            self.block.entry.register_forward_pre_hook(self._on_input, with_kwargs=True),
            self.block.exit.register_forward_hook(self._on_output),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._pending.clear()

    def _on_input(self, module, args, kwargs):
        if len(args) > 1:
            raise ValueError(f"{type(module).__name__} takes {len(args)} positional inputs; LLM-Barber expects the "
                             "hidden states as the only positional argument")
        as_kwarg = not args
        hidden = kwargs["hidden_states"] if as_kwarg else args[0]
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        self._pending.append((hidden.detach(), rest, as_kwarg))

    def _on_output(self, module, args, output):
        hidden, kwargs, as_kwarg = self._pending.pop()
        out = output[0] if isinstance(output, (tuple, list)) else output
        self.on_sample(hidden, kwargs, as_kwarg, out.detach())


def call_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], as_kwarg: bool) -> torch.Tensor:
    """Call a (dense copy of a) block the way the layer called the original; unwrap tuple outputs."""
    out = block(hidden_states=hidden, **kwargs) if as_kwarg else block(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out
