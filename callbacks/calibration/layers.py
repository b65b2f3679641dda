"""Find the decoder layers of a Hugging Face causal LM and the linears inside them that can be compressed.

Pure PyTorch + transformers (no Lightning), so pruning and quantization share it and tests can call it
on a bare model. See specs/pruning.md §1.2.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

log = logging.getLogger(__name__)

#: Families checked by the test-suite and the path of their decoder layers (used in error messages).
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LLaMA / Mistral / Qwen2 / Gemma (and other `model.layers` models)": "model.layers",
    "OPT": "model.decoder.layers",
    "GPT-2": "transformer.h",
    "GPT-NeoX / Pythia": "gpt_neox.layers",
}

# Tried, in order, when the `_no_split_modules` rule does not single out one ModuleList.
_KNOWN_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers",
                "model.language_model.layers")

#: Module types whose weight is a 2-D matrix that a pruner or quantizer may rewrite.
COMPRESSIBLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)


class DecoderLayersNotFoundError(ValueError):
    """Raised when the decoder layers cannot be located; the message lists what was found."""


def describe_supported_architectures() -> str:
    """One line per supported family, `name -> layers path`, for error messages and docs."""
    return "\n".join(f"  - {family}: {path}" for family, path in SUPPORTED_ARCHITECTURES.items())


def _num_hidden_layers(hf_model: nn.Module) -> int | None:
    """Depth of the text decoder; multimodal configs keep it in their text config, GPT-2 aliases `n_layer`."""
    config = getattr(hf_model, "config", None)
    if config is None:
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "num_hidden_layers", None)


def _module_lists(hf_model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every ModuleList in the model with its qualified name (what the error message shows the user)."""
    return [(name, m) for name, m in hf_model.named_modules() if isinstance(m, nn.ModuleList)]


def _resolve_path(hf_model: nn.Module, path: str) -> nn.ModuleList:
    """The ModuleList at `path`, or a `DecoderLayersNotFoundError` saying what is there instead."""
    try:
        found = hf_model.get_submodule(path)
    except AttributeError as err:
        raise DecoderLayersNotFoundError(f"layers_path={path!r} does not exist in {type(hf_model).__name__}: {err}"
                                         ) from err
    if not isinstance(found, nn.ModuleList):
        raise DecoderLayersNotFoundError(
            f"layers_path={path!r} points to a {type(found).__name__}, expected an nn.ModuleList of decoder layers")
    return found


def find_decoder_layers(hf_model: nn.Module, layers_path: str | None = None) -> tuple[str, nn.ModuleList]:
    """Return `(qualified_name, layers)` for the decoder layers of a HF causal LM (or the text part of a VLM).

    Rule (spec §1.2): the single ModuleList whose length is the text config's `num_hidden_layers` and whose
    items are all classes named in `_no_split_modules`; otherwise the first known path that exists;
    otherwise a `DecoderLayersNotFoundError` listing the ModuleLists found and suggesting `layers_path`.
    """
    if layers_path:
        return layers_path, _resolve_path(hf_model, layers_path)

    block_names = set(getattr(hf_model, "_no_split_modules", None) or ())
    depth = _num_hidden_layers(hf_model)
    lists = _module_lists(hf_model)
    candidates = [
        (name, m) for name, m in lists
        if len(m) > 0 and (depth is None or len(m) == depth) and all(type(x).__name__ in block_names for x in m)
    ]
    if len(candidates) == 1:
        return candidates[0]

    for path in _KNOWN_PATHS:
        try:
            found = hf_model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            log.debug("decoder layers found at known path %s", path)
            return path, found

    listing = "\n".join(f"  - {name or '<root>'}: {len(m)} x {type(m[0]).__name__ if len(m) else '-'}"
                        for name, m in lists) or "  (none)"
    raise DecoderLayersNotFoundError(
        f"Could not locate the decoder layers of {type(hf_model).__name__} "
        f"(num_hidden_layers={depth}, _no_split_modules={sorted(block_names)}).\n"
        f"ModuleLists found:\n{listing}\n"
        f"Set layers_path to the right one, e.g. layers_path=\"model.layers\". Supported families:\n"
        f"{describe_supported_architectures()}")


def compressible_linears(layer: nn.Module) -> dict[str, nn.Module]:
    """`nn.Linear` and transformers `Conv1D` modules inside `layer`, keyed by qualified name, in sorted order.

    Sorted order matters: every rank visits modules identically, so collectives line up (spec §7.4).
    """
    found = {name: m for name, m in layer.named_modules() if isinstance(m, COMPRESSIBLE_TYPES)}
    return dict(sorted(found.items()))


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The module's weight as a `[d_out, d_in]` **view** (Conv1D stores `[d_in, d_out]`, so it is transposed).

    Being a view, in-place edits (e.g. `weight_matrix(m).mul_(keep)`) land in the module's parameter.
    """
    if isinstance(module, Conv1D):
        return module.weight.data.t()
    if isinstance(module, nn.Linear):
        return module.weight.data
    raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(module).__name__}")


def set_weight_matrix(module: nn.Module, matrix: torch.Tensor) -> None:
    """Write a `[d_out, d_in]` matrix into the module's weight in place (dtype/device of the parameter kept).

    In place, so optimizers, tied references and hooks bound to the parameter keep working.
    """
    target = weight_matrix(module)
    if tuple(matrix.shape) != tuple(target.shape):
        raise ValueError(f"weight shape mismatch: module has [d_out, d_in]={list(target.shape)}, "
                         f"got {list(matrix.shape)}")
    with torch.no_grad():
        target.copy_(matrix.to(device=target.device, dtype=target.dtype))
