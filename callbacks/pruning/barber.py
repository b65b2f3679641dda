"""LLM-Barber (arXiv 2408.10631) mask rebuild as pure tensor functions (spec ``pruning.md`` §3).

For one block (attention or MLP) of a decoder layer the caller:

1. builds a :class:`GradSquareAccumulator` on an fp32 copy of the **dense** block and feeds it, sample
   by sample or in batches, the block input ``x_n`` and the **sparse** block output ``y_n``; it keeps
   ``A = mean_n G_n²`` with ``G_n = ∂ mean_{T×H}(y_n − D(x_n))² / ∂W`` at the dense weights;
2. per linear: ``M0 = mask_from_weight(W_sparse)``, ``W = reset_weights(W_dense, W_sparse, M0)``,
   ``S = barber_scores(W, A)``, ``M = rebuild_mask(S, M0, τ, granularity)`` (or
   :func:`rebuild_block_masks` / :func:`rebuild_mask_nm`), then writes ``apply_mask(W, M)`` back.

Which module is the block, how its inputs are captured and how it is called are the caller's business:
this file only sees a module, tensors, keyword arguments and an optional ``forward`` callable.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from callbacks.pruning.barber_swap import SwapStats, rebuild_block_masks, rebuild_mask, rebuild_mask_nm

__all__ = [
    "GradSquareAccumulator",
    "SwapStats",
    "accumulate_grad_squares",
    "apply_mask",
    "barber_scores",
    "default_block_forward",
    "mask_from_weight",
    "rebuild_block_masks",
    "rebuild_mask",
    "rebuild_mask_nm",
    "reset_weights",
    "slice_batch",
]

Metric = Literal["WD", "W", "D"]
BlockForward = Callable[[nn.Module, Tensor, Mapping[str, Any]], Tensor]
KwargsSlicer = Callable[[Mapping[str, Any], int, int], Mapping[str, Any]]


def default_block_forward(block: nn.Module, hidden_states: Tensor, kwargs: Mapping[str, Any]) -> Tensor:
    """Call ``block(hidden_states, **kwargs)``; HF attention returns a tuple whose first item is the output."""
    out = block(hidden_states, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def slice_batch(obj: Any, index: int, batch_size: int) -> Any:
    """Take sample ``index`` (keeping a batch dim of 1) from every batched tensor inside ``obj``.

    A tensor counts as batched when it has at least 2 dims and ``shape[0] == batch_size``; 1-D tensors
    (e.g. ``cache_position``) and size-1 leading dims (broadcast masks) pass through unchanged.
    Containers (dict, list, tuple) are walked; other objects pass through.
    """
    if isinstance(obj, Tensor):
        if batch_size > 1 and obj.dim() >= 2 and obj.shape[0] == batch_size:
            return obj[index : index + 1]
        return obj
    if isinstance(obj, Mapping):
        return {key: slice_batch(value, index, batch_size) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(slice_batch(value, index, batch_size) for value in obj)
    return obj


def _autograd_ready(obj: Any, dtype: torch.dtype) -> Any:
    """Clone inference tensors (autograd cannot save them) and cast floating tensors to the block dtype.

    The cast matches the reference, which feeds fp16 masks/rotary tables to an fp32 block and lets
    type promotion upcast them; doing it up front also satisfies kernels that demand equal dtypes.
    """
    if isinstance(obj, Tensor):
        tensor = obj.clone() if obj.is_inference() else obj
        return tensor.to(dtype) if tensor.is_floating_point() else tensor
    if isinstance(obj, Mapping):
        return {key: _autograd_ready(value, dtype) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_autograd_ready(value, dtype) for value in obj)
    return obj


def _drop_inference_tensors(module: nn.Module) -> None:
    """Replace parameters/buffers created under ``inference_mode`` by normal copies (call outside it)."""
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            if param.is_inference():
                setattr(sub, name, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))
        for name, buf in list(sub.named_buffers(recurse=False)):
            if buf.is_inference():
                setattr(sub, name, buf.clone())


class GradSquareAccumulator:
    """Running mean over samples of the squared per-sample gradients of a dense block's weights.

    ``L_n = mean_{T×H}(y_n − D(x_n))²`` with ``y_n`` the detached sparse block output and ``D`` the dense
    block; ``G_n = ∂L_n/∂W`` for each tracked weight; ``A ← A·(n−1)/n + G_n²/n`` (spec §3.2.3). The
    gradient is always taken per sample (micro-batch 1, §3.6.4): a batched loss would square a
    batch-mean gradient, so A would depend on the DataModule's batch size.

    The block is modified in place: every parameter except the tracked weights stops requiring grad,
    and parameters/buffers created under ``inference_mode`` are replaced by normal tensors. Pass a
    disposable fp32 copy of the dense block. Works when called under ``no_grad``/``inference_mode``.

    Args:
        dense_block: the dense block, fp32 (its dtype is the compute dtype).
        weight_names: qualified names of the submodules whose ``.weight`` is tracked; default every
            ``nn.Linear`` in the block. Keys of :attr:`grad_sq_mean` are these names.
        forward: ``forward(block, x, kwargs) -> output``; default :func:`default_block_forward`.
        slice_kwargs: ``slice_kwargs(kwargs, index, batch_size)`` extracts one sample's kwargs;
            default :func:`slice_batch`.
    """

    def __init__(
        self,
        dense_block: nn.Module,
        weight_names: Sequence[str] | None = None,
        forward: BlockForward = default_block_forward,
        slice_kwargs: KwargsSlicer = slice_batch,
    ) -> None:
        with torch.inference_mode(False):
            _drop_inference_tensors(dense_block)
        if weight_names is None:
            weight_names = [name for name, sub in dense_block.named_modules() if isinstance(sub, nn.Linear)]
        if not weight_names:
            raise ValueError("dense_block has no nn.Linear and no weight_names were given: nothing to score")
        self.block = dense_block
        self.weights: dict[str, nn.Parameter] = {
            name: dense_block.get_submodule(name).weight for name in weight_names
        }
        # Only the tracked weights need gradients; skipping the rest saves backward work.
        dense_block.requires_grad_(False)
        for weight in self.weights.values():
            weight.requires_grad_(True)
        self.dtype = next(iter(self.weights.values())).dtype
        self.forward = forward
        self.slice_kwargs = slice_kwargs
        with torch.inference_mode(False):
            self.grad_sq_mean: dict[str, Tensor] = {
                name: torch.zeros_like(w, dtype=torch.float32) for name, w in self.weights.items()
            }
        self.num_samples = 0
        self.loss_sum = 0.0

    @property
    def mean_loss(self) -> float:
        """Mean over samples of L_n: the block error of the sparse block against the dense one."""
        return self.loss_sum / max(self.num_samples, 1)

    def update(self, block_input: Tensor, sparse_output: Tensor, block_kwargs: Mapping[str, Any] | None = None) -> None:
        """Add the samples of one batch (dim 0 is the batch) to the running mean, one sample at a time."""
        if block_input.shape[0] != sparse_output.shape[0]:
            raise ValueError(
                f"block_input has batch {block_input.shape[0]} but sparse_output has batch {sparse_output.shape[0]}"
            )
        batch_size = block_input.shape[0]
        kwargs = block_kwargs or {}
        with torch.inference_mode(False), torch.enable_grad():
            for index in range(batch_size):
                self._add_sample(
                    block_input[index : index + 1],
                    sparse_output[index : index + 1],
                    self.slice_kwargs(kwargs, index, batch_size),
                )

    def _add_sample(self, x: Tensor, y: Tensor, kwargs: Mapping[str, Any]) -> None:
        x = _autograd_ready(x.detach(), self.dtype)
        target = _autograd_ready(y.detach(), torch.float32)
        output = self.forward(self.block, x, _autograd_ready(kwargs, self.dtype))
        loss = F.mse_loss(output.float(), target)  # mean over all T×H elements, as nn.MSELoss
        grads = torch.autograd.grad(loss, list(self.weights.values()))
        self.num_samples += 1
        n = self.num_samples
        for acc, grad in zip(self.grad_sq_mean.values(), grads):
            # Same update order as the reference, so A matches it to rounding.
            acc.mul_((n - 1) / n).add_(grad.float().square().div_(n))
        self.loss_sum += float(loss.detach())


def accumulate_grad_squares(
    dense_block: nn.Module | GradSquareAccumulator,
    block_inputs: Iterable[Tensor],
    sparse_outputs: Iterable[Tensor],
    block_kwargs: Mapping[str, Any] | None = None,
    **accumulator_options: Any,
) -> GradSquareAccumulator:
    """Feed paired batches of block inputs and sparse outputs to an accumulator and return it.

    ``dense_block`` may be an existing accumulator (to continue a running mean) or a module, for which
    one is built with ``accumulator_options`` (see :class:`GradSquareAccumulator`).
    """
    state = (
        dense_block
        if isinstance(dense_block, GradSquareAccumulator)
        else GradSquareAccumulator(dense_block, **accumulator_options)
    )
    for block_input, sparse_output in zip(block_inputs, sparse_outputs, strict=True):
        state.update(block_input, sparse_output, block_kwargs)
    return state


def barber_scores(weight: Tensor, grad_sq_mean: Tensor, metric: Metric = "WD") -> Tensor:
    """Barber metric in fp32: ``WD`` = |W|·sqrt(A) (default), ``W`` = |W|, ``D`` = sqrt(A).

    ``weight`` is the reset weight (:func:`reset_weights`); sqrt(A) is the RMS of the per-sample
    gradients, not the magnitude of their mean.
    """
    if metric not in ("WD", "W", "D"):
        raise ValueError(f"metric must be one of ('WD', 'W', 'D'), got {metric!r}")
    if weight.shape != grad_sq_mean.shape:
        raise ValueError(f"weight shape {tuple(weight.shape)} != grad_sq_mean shape {tuple(grad_sq_mean.shape)}")
    magnitude = weight.float().abs()
    if metric == "W":
        return magnitude
    rms_grad = grad_sq_mean.float().sqrt()
    return rms_grad if metric == "D" else magnitude * rms_grad


def mask_from_weight(sparse_weight: Tensor) -> Tensor:
    """Initial mask M0 = (W_sparse == 0), ``True`` = pruned; weights already zero count as pruned."""
    return sparse_weight == 0


def reset_weights(
    dense_weight: Tensor, sparse_weight: Tensor, init_mask: Tensor, retain_reconstruction: bool = False
) -> Tensor:
    """Weights the rebuild starts from (spec §3.3), as a new tensor in ``sparse_weight``'s dtype/device.

    Default: the dense weights, dropping any update the init pruner made (e.g. SparseGPT's). With
    ``retain_reconstruction``: dense weights where ``init_mask`` pruned, the init pruner's elsewhere.
    """
    if not dense_weight.shape == sparse_weight.shape == init_mask.shape:
        raise ValueError(
            f"shape mismatch: dense {tuple(dense_weight.shape)}, sparse {tuple(sparse_weight.shape)}, "
            f"mask {tuple(init_mask.shape)}"
        )
    dense = dense_weight.to(device=sparse_weight.device, dtype=sparse_weight.dtype)
    if not retain_reconstruction:
        return dense.clone()
    return torch.where(init_mask, dense, sparse_weight)


def apply_mask(weight: Tensor, mask: Tensor) -> Tensor:
    """``W ⊙ (1 − M)`` as a new tensor: zero the entries where ``mask`` is ``True``."""
    return weight.masked_fill(mask, 0)
