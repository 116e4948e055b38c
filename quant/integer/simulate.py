"""The integer kernels as functions of real tensors, for calibration: a scale search scores its
candidates through the Softmax, GELU and LayerNorm that will run (their real errors), not
through the float functions. Each takes what the float twin has (dequantized candidates, FP
activations), computes on the kernel's integers, and returns the kernel's output in real units.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .dyadic import dyadic
from .gelu import IN_BITS, int_gelu
from .layernorm import NORM_BITS, affine_constants, eps_constant, int_layernorm
from .softmax import PROB_BITS, int_softmax


def layernorm(xq: Tensor, step: float, weight: Tensor | None, bias: Tensor | None,
              eps: float) -> Tensor:
    """The integer LayerNorm of a candidate ``xq`` whose values are integers times ``step``
    (every candidate of a LayerNorm-input quantizer is)."""
    c = xq.shape[-1]
    gamma, beta, g = affine_constants(weight, bias, c)
    x = torch.round(xq.double() / step).to(torch.int64)
    dev = xq.device
    y = int_layernorm(x, gamma.to(dev), beta.to(dev), eps_constant(eps, c, step).to(dev))
    return (y.double() * 2.0 ** -(NORM_BITS + g)).to(xq.dtype)


def gelu(h: Tensor) -> Tensor:
    """The integer GELU of real ``h`` on its working grid."""
    x = torch.round(h.double() * 2.0 ** IN_BITS).to(torch.int64)
    return (int_gelu(x).double() * 2.0 ** -IN_BITS).to(h.dtype)


def softmax(logits: Tensor, step: float, keep: Tensor | None = None) -> Tensor:
    """The integer Softmax of real ``logits`` on a grid of ``step`` (``keep``: the positions
    that take part)."""
    x = torch.round(logits.double() / step)
    if keep is not None:
        x = torch.where(keep, x, 0)
    p = int_softmax(x.to(torch.int64), dyadic(step * math.log2(math.e) * 2.0 ** PROB_BITS), keep)
    return (p.double() * 2.0 ** -PROB_BITS).to(logits.dtype)
