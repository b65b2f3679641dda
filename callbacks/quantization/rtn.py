"""Round-to-nearest (RTN) baseline (quantization spec §2) and the RTN errors that feed the sensitivity Ω (§4).

RTN fits each grid on the original weight and rounds every weight independently: no calibration data.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from torch import Tensor

from callbacks.quantization.quantizer import QuantConfig, QuantizedWeight, compute_dtype, quantize_weight


def rtn_quantize(weight: Tensor, config: QuantConfig, paper: bool = False) -> QuantizedWeight:
    """Quantize ``weight`` ``[r, c]`` by round-to-nearest with ``config``'s grid; ``weight`` is not modified.

    ``paper=True`` is preset ``rtn_paper``: IST-DASLab/gptq ``--nearest`` is always per-channel and asymmetric
    without MSE clipping, whatever the run's group size / symmetry, so only ``bits`` and ``scale_dtype`` are kept.
    """
    return quantize_weight(weight, rtn_paper_config(config) if paper else config)


def rtn_paper_config(config: QuantConfig) -> QuantConfig:
    """``config`` reduced to what the reference ``--nearest`` honours: bits (and the scale storage dtype)."""
    return replace(config, group_size=-1, sym=False, mse=False)


def rtn_squared_error(weight: Tensor, config: QuantConfig) -> float:
    """``‖W − Q(W)‖²_F`` for RTN with ``config`` (computed in fp32, or fp64 for fp64 weights)."""
    w = weight.detach().to(compute_dtype(weight))
    return float((w - rtn_quantize(w, config).dequantize()).square().sum())


def rtn_squared_errors(weight: Tensor, config: QuantConfig, palette: Iterable[int]) -> dict[int, float]:
    """``{b: ‖W − Q_b(W)‖²_F}`` for every width ``b`` of ``palette``, other grid options as in ``config``."""
    return {int(b): rtn_squared_error(weight, replace(config, bits=int(b))) for b in palette}
