"""Integer GELU whose output feeds the post-GELU quantizer (V-2SF under TSPTQ) directly.

GELU(x) = x·Φ(x) is computed in its tanh form, x·σ(2·√(2/π)·(x + 0.044715·x³)), which stays
within 4.7·10⁻⁴ of the exact (erf) GELU (6.2·10⁻⁴ with the integer arithmetic), and
σ(y) = 1 / (1 + 2^(−y·log2 e)) through the same
integer ``exp2_neg`` as the Softmax, then one non-negative integer division. Chosen over
I-BERT's i-GELU (a second-order polynomial for erf, up to 2·10⁻² from GELU) and I-ViT's
ShiftGELU (x·σ(1.702·x), 2·10⁻² as well, then retrained away): post-GELU V-2SF's fine step at 8
bits is near 10⁻², so those errors would cost as much as the quantization itself, and
calibration alone cannot absorb them.

Input: integers on the fixed working grid 2^-IN_BITS (the caller requantizes fc1's accumulator
there); output: GELU on the same grid, rounded half up.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dyadic import rounding_shift
from .exp2 import FRAC_BITS, exp2_neg

IN_BITS = 12  # the working grid: step 2^-12
CLIP = 8 << IN_BITS  # σ's argument saturates beyond |x| = 8 (σ within 10⁻²⁰ of 0 or 1)
SIG_BITS = 16
_CUBIC = round(0.044715 * (1 << 24))
# 2·√(2/π)·log2 e, so that the tanh form's σ argument is an exponent for exp2_neg.
_SLOPE = round(2 * 0.7978845608028654 * 1.4426950408889634 * (1 << 24))


def int_gelu(x: Tensor) -> Tensor:
    """GELU of int64 ``x`` (step 2^-12), on the same grid."""
    x = x.to(torch.int64)
    xc = x.clamp(-CLIP, CLIP)
    cube = rounding_shift(xc * xc, IN_BITS) * xc  # x³ at step 2^-24
    inner = xc + rounding_shift(cube * _CUBIC, 24 + IN_BITS)  # x + 0.044715 x³, step 2^-12
    a = rounding_shift(inner.abs() * _SLOPE, 24 + IN_BITS - FRAC_BITS)  # |y|·log2 e, 2^-16
    e = exp2_neg(a)  # 2^(−|y| log2 e) at step 2^-16
    one = 1 << FRAC_BITS
    num = torch.where(inner >= 0, torch.full_like(e, one), e)
    sig = ((num << (SIG_BITS + 1)) + one + e) // (2 * (one + e))  # σ(y) at step 2^-16
    return rounding_shift(x * sig, SIG_BITS)
