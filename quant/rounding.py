"""Error-compensating weight rounding: GPTQ (Frantar et al., ICLR 2023, "OPTQ").

Rounding every weight to its nearest code ignores that the errors of one output row add up on
the same inputs. GPTQ rounds a row's weights one input column at a time and spreads each
rounding error over the columns not rounded yet, through the inverse of the layer's input
Hessian H = XᵀX, so that the row's output error ‖(W − Ŵ)X‖² (the layer's own loss) stays small.

Why GPTQ rather than AdaRound: GPTQ is closed form (one Cholesky factorisation per layer, one
pass over the columns), deterministic, and costs seconds where AdaRound learns a rounding
variable per weight by gradient descent (10-20k iterations per layer in its paper): that would
multiply calibration time many times over, against the issue's 2x bound, and needs a seed-
stable optimiser for calibration to stay deterministic. AdaRound's gain over GPTQ at 4-bit
weights is small in both papers' comparisons (BRECQ/QDrop-style block reconstruction is what
beats both, at far higher cost).

What is kept of the paper: dampening (λ = ``damp`` · mean diag H on the diagonal), dead inputs
(diag H = 0) zeroed, the upper Cholesky factor of H⁻¹ for the column updates, and its
"act-order" (columns rounded in decreasing diag H, so the columns that matter most are rounded
while the most columns are left to absorb their error). Blocks of columns ("lazy batch
updates") are a speed device with the same result and are used too.

Departures: the scales (one per output row, symmetric) are not GPTQ's min-max ones but the
searched grid and a few clippings of each row's range; rows are independent under GPTQ (the
same H serves every row), so each row keeps the candidate, or its nearest rounding, of lowest
(w − ŵ) H (w − ŵ)ᵀ (``QWeighted._gptq_weight``). Error compensation needs data: XᵀX of a
1536-wide layer from ~600 tokens over-fits them (MiniLM with 32 texts; BENCHMARKS.md).
H comes from the FP model's inputs of the layer (the statistics pass), not from a model
quantized up to that layer: every module is calibrated on the FP statistics alone, which keeps
a search's (re)calibrations exact and independent of their order (``quant.model.Calibrator``).
"""

from __future__ import annotations

import torch
from torch import Tensor

# GPTQ's defaults: 1% of the mean diagonal, 128-column blocks.
DAMP = 0.01
BLOCK = 128


def inverse_hessian_factor(h: Tensor, damp: float = DAMP) -> tuple[Tensor, Tensor, Tensor]:
    """(upper Cholesky factor of the damped H⁻¹ in act order, the order, the dead inputs).

    ``h``: (C, C) sum of xᵀx over the layer's calibration inputs."""
    h = h.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    h = h[order][:, order]
    h += damp * torch.diagonal(h).mean() * torch.eye(len(h), dtype=h.dtype)
    for extra in (0.0, 0.1, 1.0, 10.0):  # more dampening for a numerically singular H
        hd = h + extra * torch.diagonal(h).mean() * torch.eye(len(h), dtype=h.dtype)
        factor, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            break
    else:
        raise ValueError("the layer's input Hessian is not positive definite")
    inv = torch.cholesky_inverse(factor)
    return torch.linalg.cholesky(inv, upper=True).float(), order, dead


def gptq_round(w: Tensor, factor: tuple[Tensor, Tensor, Tensor], scale: Tensor,
               zero_point: Tensor, bits: int, block: int = BLOCK) -> Tensor:
    """``w`` (R, C) rounded by GPTQ on the grid ``scale``·(code − ``zero_point``), one scale
    and zero point per row (R,), codes in [0, 2^bits − 1]: the dequantized weights, each exactly
    a grid point, so ``round(Ŵ / scale)`` gives GPTQ's codes back."""
    u, order, dead = factor
    w = w.float().clone()
    w[:, dead] = 0.0
    w = w[:, order]
    s = scale.float().reshape(-1, 1).expand(len(w), 1)
    z = zero_point.float().reshape(-1, 1).expand(len(w), 1)
    top = float((1 << bits) - 1)
    out = torch.empty_like(w)
    n = w.shape[1]
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1 = w[:, i1:i2].clone()
        err1 = torch.empty_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i:i + 1]
            q = ((torch.round(col / s) + z).clamp_(0.0, top) - z) * s
            out[:, i1 + i:i1 + i + 1] = q
            e = (col - q) / u1[i, i]
            w1[:, i:] -= e @ u1[i:i + 1, i:]
            err1[:, i:i + 1] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    result = torch.empty_like(out)
    result[:, order] = out
    return result
