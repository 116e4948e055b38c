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


def error_loss(metric: str, error: Callable[[Tensor], Tensor],
               grad: Tensor | None = None) -> Callable[[Tensor], Tensor]:
    """``output_loss`` (MSE or Hessian) from ``error(x̂) = consumer(x̂) − target``, which the
    caller computes inside the consumer's own matmul (``linear_error``, ``matmul_error``: the
    GEMM adds −target as it accumulates), and the mean square is one dot product: per
    candidate, two output-sized passes and one fresh output-sized tensor fewer than
    ``output_loss``. Cosine compares outputs, not errors, and keeps ``output_loss``."""
    if metric == "cosine":
        raise ValueError("error_loss scores MSE or Hessian; cosine needs output_loss")
    weight = grad if metric == "hessian" else None

    def loss(xq: Tensor) -> Tensor:
        e = error(xq)
        if weight is not None:
            e.mul_(weight)
        e = e.reshape(-1)
        return torch.dot(e, e) / e.numel()
    return loss


def linear_error(weight: Tensor, target: Tensor) -> Callable[[Tensor], Tensor]:
    """x̂ ↦ x̂·Wᵀ − target in one ``addmm`` (``target``: the FP output without the bias, which
    both sides share)."""
    neg = target.reshape(-1, target.shape[-1]).neg()
    wt = weight.t()
    return lambda xq: torch.addmm(neg, xq.reshape(-1, wt.shape[0]), wt).view(target.shape)


def matmul_error(target: Tensor, left: Tensor | None = None, right: Tensor | None = None,
                 transposed: bool = False) -> Callable[[Tensor], Tensor]:
    """x̂ ↦ left·x̂ − target, or x̂·right − target, over the leading (batch, head) dimensions:
    one ``bmm`` with the fixed operand made contiguous once, then the target subtracted in
    place. ``baddbmm`` with −target, one call, is slower on the CPU for these many small
    matrices (one thread, deit_tiny's Q·Kᵀ: 14.5 ms against 10 ms); an ``addmm`` is not
    (``linear_error``). ``transposed``: x̂ enters as x̂ᵀ (the keys of Q·Kᵀ)."""
    tgt = target.reshape(-1, *target.shape[-2:])

    def batched(t: Tensor) -> Tensor:
        t = t.transpose(-2, -1) if transposed else t
        return t.reshape(-1, *t.shape[-2:])

    if left is not None:
        lhs = left.reshape(-1, *left.shape[-2:]).contiguous()
        return lambda xq: torch.bmm(lhs, batched(xq)).sub_(tgt).view(target.shape)
    rhs = right.reshape(-1, *right.shape[-2:]).contiguous()
    return lambda xq: torch.bmm(batched(xq), rhs).sub_(tgt).view(target.shape)


def channel_output_loss(metric: str, error_output: Callable[[Tensor], Tensor],
                        grad: Tensor | None = None) -> Callable[[Tensor], Tensor]:
    """Per-output-channel loss for weights: ``error_output(Ŵ)`` is the output error caused by the
    weight error alone, with output channels on dimension 1. Cosine is not separable per channel,
    so weights use MSE under it."""
    def loss(wq: Tensor) -> Tensor:  # in place on the fresh error: the same values
        err = error_output(wq)
        if metric == "hessian" and grad is not None:
            err.mul_(grad)
        dims = [d for d in range(err.dim()) if d != 1]
        return err.square_().sum(dim=dims)
    return loss


def sqnr_db(signal: float, noise: float) -> float:
    if noise <= 0:
        return float("inf")
    return 10.0 * torch.log10(torch.tensor(signal / noise)).item()
