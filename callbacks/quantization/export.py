"""Export a fake-quantized model to the compressed-tensors ``pack-quantized`` format (quantization spec §5).

The in-memory model runs plain ``nn.Linear`` layers whose weights were overwritten with ``Ŵ = s·(c − z)``;
the :class:`QuantizedWeight` records hold the integer grid behind them. This module turns the records into
compressed-tensors' conventions (signed codes, config groups) and lets the installed compressed-tensors
``pack-quantized`` compressor do the packing — never a hand-rolled packer — so what transformers reloads
is exactly what the compressor's own decompressor produces. The model itself is not modified.

Reload status with transformers 5.25 + compressed-tensors 0.20.1 (CPU), checked by tests/test_quant_export.py:
symmetric checkpoints reload bitwise through the default path, mixed precision included; a single config
group also reloads with ``CompressedTensorsConfig(dequantize=True)``. Two upstream loader bugs remain:
asymmetric checkpoints fail the default path (the meta-device branch of ``PackedQuantizationCompressor.compress``
leaves ``weight_zero_point`` unpacked, so the packed checkpoint tensor mismatches), and ``dequantize=True``
decompresses every module with the *first* config group's scheme (``get_dense_scheme`` in
``transformers/integrations/compressed_tensors.py``), which corrupts mixed precision. The files themselves are
correct: compressed-tensors' decompressor restores every module bitwise from them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from compressed_tensors.compressors import BaseCompressor, ModelCompressor
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
)
from compressed_tensors.utils import match_name
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from callbacks.quantization.quantizer import QuantizedWeight

FORMAT = CompressionFormat.pack_quantized.value
#: ``actorder`` values this format still stores (compressed-tensors ≥ 0.20 removed ``"group"``/``g_idx``).
ActOrder = Literal["weight"] | None
ALLOWED_ACTORDER: tuple[ActOrder, ...] = (None, "weight")


@dataclass(frozen=True)
class _GroupKey:
    """What a config group fixes: every module in one group shares these grid options."""

    bits: int
    sym: bool
    group_size: int


def export_compressed_tensors(
    model: PreTrainedModel,
    quantized: Mapping[str, QuantizedWeight],
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    ignore: Iterable[str] = ("lm_head",),
    actorder: ActOrder = None,
) -> Path:
    """Save ``model`` to ``out_dir`` with the linears named in ``quantized`` stored ``pack-quantized``.

    ``quantized`` maps qualified module names to the records whose dequantized weight the module currently
    holds (fake-quant). One config group is written per ``(bits, sym, group_size)`` — i.e. per bit width
    for a uniform grid — with the exact module names as targets; ``ignore`` goes to the config's ignore list.
    ``actorder`` labels how GPTQ ordered columns: ``None`` (no act-order) or ``"weight"`` (act-order with
    static groups); it does not change the tensors. Act-order with dynamic groups needs ``g_idx``, which
    compressed-tensors ≥ 0.20 no longer stores, so such records are refused.

    Raises ``ValueError`` for anything the format cannot hold, and when a module's weight is not bitwise the
    record's dequantized weight (the export would not reload as the evaluated model). Returns ``out_dir``.
    """
    if actorder not in ALLOWED_ACTORDER:
        raise ValueError(f"actorder={actorder!r} is not allowed; allowed: {list(ALLOWED_ACTORDER)}.")
    ignore = list(ignore)
    if not quantized:
        raise ValueError("quantized is empty; allowed: a mapping of at least one module name to its QuantizedWeight.")
    modules = {name: _check_module(model, name, record, ignore) for name, record in quantized.items()}
    config = build_quantization_config(quantized, ignore, actorder)
    schemes = {name: scheme for scheme in config.config_groups.values() for name in scheme.targets}
    state_dict = model.state_dict()
    for name, record in quantized.items():
        compressed = compress_record(name, record, schemes[name], modules[name].weight)
        del state_dict[f"{name}.weight"]
        state_dict.update({f"{name}.{key}": value for key, value in compressed.items()})
    out = Path(out_dir)
    model.save_pretrained(out, state_dict=state_dict)
    # compressed-tensors' own writer adds `quantization_config` (with its version) to config.json.
    ModelCompressor(quantization_config=config).update_config(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def build_quantization_config(
    quantized: Mapping[str, QuantizedWeight], ignore: Iterable[str] = ("lm_head",), actorder: ActOrder = None
) -> QuantizationConfig:
    """The ``quantization_config``: one ``pack-quantized`` group per grid, exact names as targets (spec §5)."""
    groups: dict[_GroupKey, list[str]] = {}
    for name, record in quantized.items():
        cfg = record.config
        groups.setdefault(_GroupKey(cfg.bits, cfg.sym, cfg.group_size), []).append(name)
    # Widest first, so the group names are stable whatever order the records came in.
    ordered = sorted(groups.items(), key=lambda item: (-item[0].bits, item[0].sym, item[0].group_size))
    config_groups = {
        f"group_{i}": QuantizationScheme(targets=sorted(names), weights=_weight_args(key, actorder), format=FORMAT)
        for i, (key, names) in enumerate(ordered)
    }
    return QuantizationConfig(
        config_groups=config_groups,
        format=FORMAT,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=list(ignore),
    )


def _weight_args(key: _GroupKey, actorder: ActOrder) -> QuantizationArgs:
    """compressed-tensors' description of one grid (group_size −1 is its ``channel`` strategy)."""
    if key.group_size == -1:
        return QuantizationArgs(num_bits=key.bits, type="int", symmetric=key.sym, strategy="channel",
                                actorder=actorder)
    return QuantizationArgs(num_bits=key.bits, type="int", symmetric=key.sym, strategy="group",
                            group_size=key.group_size, actorder=actorder)


def compress_record(
    name: str, record: QuantizedWeight, scheme: QuantizationScheme, weight: Tensor
) -> dict[str, Tensor]:
    """Compressed tensors of module ``name`` (``weight_packed``, ``weight_scale``, ``weight_shape`` [+ zero point]).

    The compressor re-derives the codes from a weight, the scale and the zero point, so it is given the
    record's dequantized weight in the scales' compute dtype (``x̂/s`` lands on an integer up to ULPs, where
    a bf16 weight could round an 8-bit code the wrong way). Its own decompressor must then reproduce the
    module's weight bitwise — the same call transformers makes at load time.
    """
    compressor = BaseCompressor.get_value_from_registry(FORMAT)
    if not compressor.can_compress(nn.Linear, scheme):
        raise ValueError(f"bits={scheme.weights.num_bits} of {name!r} is not allowed by compressed-tensors {FORMAT}; "
                         "allowed: int weights of 1..8 bits.")
    scale, zero_point = signed_qparams(name, record, weight.dtype)
    local = {"weight": record.dequantize().cpu(), "weight_scale": scale}
    if not record.config.sym:
        local["weight_zero_point"] = zero_point
    compressed = compressor.compress(local, scheme)
    restored = compressor.decompress(compressed, scheme)["weight"].to(weight.dtype)
    if not torch.equal(restored, weight.detach().cpu()):
        raise ValueError(
            f"the weight of {name!r} is not what its record decompresses to (max |Δ| = "
            f"{(restored - weight.detach().cpu()).abs().max().item():.3g}); allowed: a model holding "
            "record.dequantize(weight.dtype) for every quantized module (fake-quant), with the records that made it."
        )
    return compressed


def signed_qparams(name: str, record: QuantizedWeight, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``weight_scale`` in ``dtype`` and the signed zero point ``z − 2^(b−1)`` (int8), both ``[r, n_groups]``.

    compressed-tensors stores signed codes ``c − 2^(b−1)``; shifting code and zero point alike keeps
    ``(c_s − z_s)·s = x̂``. A symmetric grid's zero point ``2^(b−1)`` becomes 0, so it is dropped.
    """
    scales = record.scales.detach().cpu()
    stored = scales.to(dtype)
    if not torch.equal(stored.to(scales.dtype), scales):
        raise ValueError(
            f"scales of {name!r} are not exactly representable in the model dtype {dtype}; allowed: scales rounded "
            f"to it — quantize with QuantConfig(scale_dtype={dtype}) (quantization spec §1, scale dtype)."
        )
    zero = record.zeros.detach().cpu().to(torch.int16) - 2 ** (record.config.bits - 1)
    return stored, zero.to(torch.int8)


def _check_module(model: nn.Module, name: str, record: QuantizedWeight, ignore: list[str]) -> nn.Linear:
    """The ``nn.Linear`` called ``name``, after checking that its record fits the format."""
    try:
        module = model.get_submodule(name)
    except AttributeError as err:
        raise ValueError(f"quantized names module {name!r}, which does not exist in the model.") from err
    if not isinstance(module, nn.Linear):
        raise ValueError(f"module {name!r} is a {type(module).__name__}; allowed: torch.nn.Linear "
                         "(compressed-tensors packs Linear weights only).")
    if any(match_name(name, pattern) for pattern in ignore):
        raise ValueError(f"module {name!r} is both quantized and in ignore={ignore}; allowed: one or the other.")
    rows, cols = module.weight.shape
    cfg = record.config
    if tuple(record.codes.shape) != (rows, cols):
        raise ValueError(f"record codes of {name!r} have shape {tuple(record.codes.shape)}; expected ({rows}, {cols}).")
    if cfg.group_size != -1 and cols % cfg.group_size != 0:
        raise ValueError(f"group_size={cfg.group_size} of {name!r} does not divide in_features={cols}; allowed: -1 "
                         f"or a divisor of {cols} (compressed-tensors group quantization rejects a partial group).")
    width = cols if cfg.group_size == -1 else cfg.group_size
    if not torch.equal(record.g_idx.cpu(), torch.arange(cols) // width):
        raise ValueError(
            f"g_idx of {name!r} is permuted (act-order with dynamic groups); allowed: natural group order — "
            "compressed-tensors >= 0.20 removed actorder='group' and weight_g_idx. Quantize with "
            "static_groups=True (actorder='weight') or act_order=False."
        )
    if cfg.sym and not bool((record.zeros == 2 ** (cfg.bits - 1)).all()):
        raise ValueError(f"symmetric record {name!r} has zero points other than {2 ** (cfg.bits - 1)}.")
    return module
