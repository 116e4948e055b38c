"""Integer 2^(−a): the exponential shared by the integer Softmax and GELU.

Chosen over I-BERT's i-exp (e^r = 0.3585·(r + 1.353)² + 0.344 on r ∈ (−ln 2, 0], a second-order
polynomial with a relative error near 4·10⁻³, larger than V-2SF's fine step for the small
post-Softmax values) and over I-ViT's Shiftmax (log2 e taken as 1 + 1/2 − 1/16 = 1.4375, 0.36 %
off, harmless only after retraining): the caller folds log2 e exactly into the dyadic
multiplier that brings its input to the fixed-point exponent a (FRAC_BITS fraction bits), the
integer part of a is a right shift, and 2^(−f) for the fraction f ∈ [0, 1) is a fourth-order
polynomial evaluated by Horner's rule in 30-bit fixed point (a Chebyshev fit: relative error
7·10⁻⁶, below the output's 2^-16 step). Every step is an integer multiply, add or shift.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dyadic import rounding_shift

FRAC_BITS = 16  # of the exponent a, and of the result
COEF_BITS = 30
# 2^f on f ∈ [−1, 0] ≈ Σ c_k f^k, c_k = COEFS[k] / 2^30 (degree-4 Chebyshev fit).
COEFS = (1073737660, 744134529, 257037730, 57108570, 7342532)
MAX_SHIFT = 48  # beyond it every result is 0 (the polynomial is below 2^30)


def exp2_neg(a: Tensor) -> Tensor:
    """2^(−a / 2^16) · 2^16, rounded half up, for integer a ≥ 0 (int64 in, int64 out)."""
    a = a.to(torch.int64)
    whole = (a >> FRAC_BITS).clamp_max(MAX_SHIFT)
    u = -(a & ((1 << FRAC_BITS) - 1))  # −f · 2^16, in (−2^16, 0]
    t = torch.full_like(u, COEFS[-1])
    for c in reversed(COEFS[:-1]):
        t = c + ((t * u) >> FRAC_BITS)  # floor: |error| < 2^-30 per step
    return rounding_shift(t, COEF_BITS - FRAC_BITS + whole)
