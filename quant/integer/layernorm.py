"""Integer LayerNorm, with an integer square root.

The input is the integer operand of the LayerNorm's input quantizer. Under O-2SF that operand is
``(q − z_c) << e_c``: the outlier channels are aligned to the normal channels' grid by a left
shift before any sum (FQ-ViT's argument for power-of-two factors, and TSPTQ-ViT's for its
power-of-two ratio), so one scale s covers the row and the statistics are plain integer sums.

With C channels, D_c = C·X_c − ΣX (exact: no division for the mean), σ_D = ⌊√(ΣD²/C + ε_D)⌋ by
Newton's iteration on integers (I-BERT's: x ← ⌊(x + ⌊n/x⌋)/2⌋ while it decreases, from a power
of two above √n, so it ends at ⌊√n⌋ exactly) with ε_D = C²·ε/s², and the normalised value
n_c = D_c / σ_D at NORM_BITS fraction bits (round half away from zero, a division of
non-negative integers), with σ_D itself carried at SIGMA_BITS fraction bits (the square root of
ΣD²/C · 4^SIGMA_BITS). The affine part is γ_c·n_c + β_c with γ and β as integers on a grid
fixed per LayerNorm (2^-(NORM_BITS+G)); the consumer requantizes that. A row whose ΣD² · 4^8
would not fit int64 has D shifted right first, by the fewest bits that make it fit (a shift
chosen per row from its largest |D|: a normalisation step, integer all the way).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NORM_BITS = 14
GAMMA_BITS = 15  # |γ_c| at most 2^15 after scaling
# Fraction bits of σ_D: an integer σ_D alone is off by up to 1/σ_D relative, and σ_D is a few
# units for a narrow row (the digits ViT's first LayerNorm: 7.5·10⁻³ of error from that alone).
SIGMA_BITS = 8


def bit_length(n: Tensor) -> Tensor:
    """Number of bits of non-negative int64 ``n`` (0 for 0): a binary search for the top bit
    by shifts and comparisons."""
    top = torch.zeros_like(n)
    for k in (32, 16, 8, 4, 2, 1):
        top += ((n >> (top + k)) > 0).to(n.dtype) * k
    return top + (n > 0).to(n.dtype)


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


def int_layernorm(x: Tensor, gamma: Tensor, beta: Tensor, eps: Tensor) -> Tensor:
    """LayerNorm over the last axis of the integer operand ``x``. ``gamma`` (int64, per channel,
    at 2^-G), ``beta`` (int64 at 2^-(NORM_BITS+G)), ``eps`` (int64 ε_D, broadcastable to the
    rows: token 0 may have a scale of its own). Output int64 at step 2^-(NORM_BITS+G)."""
    x = x.to(torch.int64)
    c = x.shape[-1]
    d = c * x - x.sum(-1, keepdim=True)
    # Per row, the right shift r that keeps ΣD² · 4^SIGMA_BITS within int64 (0 for most rows).
    spare = 62 - 2 * SIGMA_BITS - bit_length(torch.tensor(c)).item()
    top = bit_length(d.abs().amax(-1, keepdim=True))
    r = ((2 * top - spare + 1) >> 1).clamp_min(0)
    dv = d >> r
    var = (dv * dv).sum(-1, keepdim=True) // c + (eps >> (2 * r))
    sigma = isqrt(var << (2 * SIGMA_BITS)).clamp_min(1)  # σ_D · 2^(SIGMA_BITS − r)
    n = ((d.abs() << (NORM_BITS + SIGMA_BITS + 1 - r)) + sigma) // (2 * sigma)
    n = torch.where(d < 0, -n, n)
    return n * gamma + beta


def affine_constants(weight: Tensor | None, bias: Tensor | None,
                     channels: int) -> tuple[Tensor, Tensor, int]:
    """γ and β as integers (γ at 2^-G with |γ| < 2^GAMMA_BITS, β at 2^-(NORM_BITS+G)), and G."""
    w = torch.ones(channels) if weight is None else weight.detach().cpu()
    b = torch.zeros(channels) if bias is None else bias.detach().cpu()
    top = float(w.abs().max())
    g = GAMMA_BITS - (math.ceil(math.log2(top)) if top > 0 else 0)
    gamma = torch.round(w.double() * 2.0 ** g).to(torch.int64)
    beta = torch.round(b.double() * 2.0 ** (NORM_BITS + g)).to(torch.int64)
    return gamma, beta, g


def eps_constant(eps: float, channels: int, step: float) -> Tensor:
    """ε in the units of ΣD²/C for an input of real step ``step``: C²·ε/s²."""
    return torch.tensor(round(channels * channels * eps / step ** 2), dtype=torch.int64)
