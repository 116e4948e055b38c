"""Integer Softmax whose output feeds the post-Softmax quantizer (V-2SF under TSPTQ) directly.

Input: the integer logits of Q·Kᵀ (plus Swin's integer position bias and masks), all on one grid
of step s_l. The dyadic multiplier ``to_exponent`` (s_l · log2 e · 2^16) brings them to base-2
fixed-point exponents, so e^(x − max) = 2^(−(max − a)) is ``exp2_neg`` (see there for the choice
over I-BERT's i-exp and I-ViT's Shiftmax). Masked positions (padding keys) get exactly 0. The
division by the row sum is one non-negative integer division, rounded half up, to a probability
with PROB_BITS fraction bits; the consumer's quantizer (``encoders``) then turns it into its codes
by a dyadic requantization: V-2SF's flag, fine and coarse payloads all come from that one
integer, so the kernel "produces the codes" with no float in between.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dyadic import Dyadic, requantize
from .exp2 import exp2_neg

PROB_BITS = 16  # the output's step is 2^-16


def int_softmax(logits: Tensor, to_exponent: Dyadic, keep: Tensor | None = None) -> Tensor:
    """Softmax over the last axis of integer ``logits``; ``keep`` (broadcastable bool): the
    positions that take part (None: all). Returns int64 probabilities at step 2^-PROB_BITS."""
    a = requantize(logits, to_exponent)
    if keep is not None:
        a = torch.where(keep, a, torch.iinfo(torch.int64).min // 4)
    top = a.amax(-1, keepdim=True)
    e = exp2_neg(top - a)
    if keep is not None:
        e = torch.where(keep, e, 0)
    total = e.sum(-1, keepdim=True)
    p = ((e << (PROB_BITS + 1)) + total) // (2 * total).clamp_min(1)
    return torch.where(total > 0, p, 0)
