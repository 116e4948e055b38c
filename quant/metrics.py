"""Calibration metrics: how far a candidate's consumer output is from the floating-point one.

``hessian`` is PTQ4ViT's Hessian-guided metric in its diagonal (Fisher) form: the output error is
weighted by the gradient of the task loss at that output. The task loss is the cross-entropy to
the FP model's own top-1 prediction (its KL divergence to the FP prediction has zero gradient at
the FP model, so the gradient of the pseudo-label cross-entropy stands in for it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def output_loss(metric: str, consumer: Callable[[Tensor], Tensor], target: Tensor,
                grad: Tensor | None = None) -> Callable[[Tensor], Tensor]:
    """Loss of a dequantized candidate, measured on ``consumer(candidate)`` against ``target``."""
    if metric == "cosine":
        def loss(xq: Tensor) -> Tensor:
            out = consumer(xq).reshape(-1, target.shape[-1])
            return -F.cosine_similarity(out, target.reshape(-1, target.shape[-1]), dim=-1).mean()
    elif metric == "hessian" and grad is not None:
        def loss(xq: Tensor) -> Tensor:  # in place after the first op: the same values
            return (consumer(xq) - target).mul_(grad).square_().mean()
    else:
        def loss(xq: Tensor) -> Tensor:
            return (consumer(xq) - target).square_().mean()
    return loss


def channel_output_loss(metric: str, error_output: Callable[[Tensor], Tensor],
                        grad: Tensor | None = None) -> Callable[[Tensor], Tensor]:
    """Per-output-channel loss for weights: ``error_output(Ŵ)`` is the output error caused by the
    weight error alone, with output channels on dimension 1. Cosine is not separable per channel,
    so weights use MSE under it."""
    def loss(wq: Tensor) -> Tensor:
        err = error_output(wq)
        if metric == "hessian" and grad is not None:
            err = err * grad
        dims = [d for d in range(err.dim()) if d != 1]
        return (err ** 2).sum(dim=dims)
    return loss


def sqnr_db(signal: float, noise: float) -> float:
    if noise <= 0:
        return float("inf")
    return 10.0 * torch.log10(torch.tensor(signal / noise)).item()
