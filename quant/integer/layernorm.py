"""Integer LayerNorm, with an integer square root.

The input is the integer operand of the LayerNorm's input quantizer. Under O-2SF that operand is
``(q − z_c) << e_c``: the outlier channels are aligned to the normal channels' grid by a left
shift before any sum (FQ-ViT's argument for power-of-two factors, and TSPTQ-ViT's for its
power-of-two ratio), so one scale s covers the row and the statistics are plain integer sums.

With C channels, D_c = C·X_c − ΣX (exact: no division for the mean), σ_D = ⌊√(ΣD²/C + ε_D)⌋ by
Newton's iteration on integers (I-BERT's: x ← ⌊(x + ⌊n/x⌋)/2⌋ while it decreases, from a power
of two above √n, so it ends at ⌊√n⌋ exactly) with ε_D = C²·ε/s², and the normalised value
n_c = D_c / σ_D at NORM_BITS fraction bits (round half away from zero, a division of
non-negative integers). The affine part is γ_c·n_c + β_c with γ and β as integers on a grid
fixed per LayerNorm (2^-(NORM_BITS+G)); the consumer requantizes that. When the worst case of
ΣD² would not fit int64, D is shifted right by a static ``pre_shift`` before squaring (decided
by the lowering from the input's bounds).
"""

from __future__ import annotations

import torch
from torch import Tensor

NORM_BITS = 14
GAMMA_BITS = 15  # |γ_c| at most 2^15 after scaling


def bit_length(n: Tensor) -> Tensor:
    """Number of bits of non-negative int64 ``n`` (0 for 0), by comparisons only."""
    out = torch.zeros_like(n)
    for k in range(63):
        out += (n >= (1 << k)).to(n.dtype)
    return out


def isqrt(n: Tensor) -> Tensor:
    """⌊√n⌋ for non-negative int64 ``n``, by Newton's iteration on integers."""
    n = n.to(torch.int64)
    x = torch.ones_like(n) << ((bit_length(n) + 1) >> 1)  # ≥ √n
    while True:
        y = (x + n // x.clamp_min(1)) >> 1
        smaller = y < x
        if not bool(smaller.any()):
            return x
        x = torch.where(smaller, y, x)


def int_layernorm(x: Tensor, gamma: Tensor, beta: Tensor, eps: Tensor,
                  pre_shift: int = 0) -> Tensor:
    """LayerNorm over the last axis of the integer operand ``x``. ``gamma`` (int64, per channel,
    at 2^-G), ``beta`` (int64 at 2^-(NORM_BITS+G)), ``eps`` (int64 ε_D, broadcastable to the
    rows: token 0 may have a scale of its own). Output int64 at step 2^-(NORM_BITS+G)."""
    x = x.to(torch.int64)
    c = x.shape[-1]
    d = c * x - x.sum(-1, keepdim=True)
    dv = d >> pre_shift if pre_shift else d
    var = (dv * dv).sum(-1, keepdim=True) // c + (eps >> (2 * pre_shift))
    sigma = (isqrt(var) << pre_shift).clamp_min(1)
    n = ((d.abs() << (NORM_BITS + 1)) + sigma) // (2 * sigma)
    n = torch.where(d < 0, -n, n)
    return n * gamma + beta
