"""Loss-Hessian traces for the bit allocation, estimated by the empirical Fisher (``sensitivity="loss"``).

HAWQ's sensitivity ``Ω_l(b) = tr(H_l)/n_l · ‖W_l − Q_b(W_l)‖²`` takes the trace of the Hessian of the model's
*loss* with respect to module l's weights (arXiv 1911.03852). The per-layer Gauss–Newton Hessians that GPTQ
and APTQ solve with measure the error at the module's (or the attention block's) own output instead; their
traces ignore how much the rest of the network amplifies that error, and they grow with depth with the
residual stream, so an allocation built on them hands the lowest widths to the early layers. The empirical
Fisher ``E_n‖∂L_n/∂W_l‖²`` is the standard first-order estimate of the loss-Hessian trace at a trained model
(HAWQ-V2 and SqueezeLLM use the same kind of estimate); it costs one backward pass per calibration window.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn


def fisher_traces(model: nn.Module, windows: Tensor, modules: Mapping[str, nn.Module], progress: bool = False
                  ) -> dict[str, float]:
    """``(1/N) Σ_n ‖∂L_n/∂W‖²`` per module, ``L_n`` the mean next-token loss of calibration window n.

    Only the weights of ``modules`` get gradients (every other parameter is frozen for the pass and restored
    afterwards); the model runs in eval mode, one window at a time, on the device of its parameters.
    """
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"windows of shape {tuple(windows.shape)} are not allowed; allowed: [n >= 1, seqlen >= 2]")
    # The parameters themselves (weight_matrix gives a detached view); the squared norm is layout-independent.
    weights = {name: module.weight for name, module in modules.items()}
    params = list(model.parameters())
    saved = [p.requires_grad for p in params]
    was_training = model.training
    sums = {name: 0.0 for name in weights}
    device = next(iter(weights.values())).device if weights else windows.device
    try:
        for p in params:
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        model.eval()
        rows = windows
        if progress:
            from tqdm.auto import tqdm

            rows = tqdm(windows, desc="loss-Hessian traces", unit="window")
        with torch.enable_grad():
            for row in rows:
                ids = row.unsqueeze(0).to(device)
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                grads = torch.autograd.grad(loss, list(weights.values()))
                for name, grad in zip(weights, grads):
                    sums[name] += float(grad.double().square().sum())
    finally:
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)
        model.train(was_training)
    return {name: total / windows.shape[0] for name, total in sums.items()}
