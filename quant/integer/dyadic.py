"""Requantization by a dyadic multiplier: the only way a scale changes in the integer program.

A real ratio r (one per tensor, or one per channel of the last axis) becomes an integer
multiplier M and a right shift N with r ≈ M / 2^N, |M| < 2^MULT_BITS. Applied to an integer x:

    y = (x · M + 2^(N−1)) >> N        (N > 0; y = x · M when N = 0)

``>>`` is an arithmetic shift (floor), so the rule is *round half up* (towards +∞): −2.5 → −2,
2.5 → 3. The product is formed in int64, so |x| < 2^(63 − MULT_BITS) is required; the lowering
checks every requantization's input bound against ``MAX_INPUT_BITS`` (an error there, never a
wrap). MULT_BITS = 24 keeps the multiplier's relative error below 2^-24 (float32's own), and
leaves 39 bits for the input: an int32 accumulator, or the sum of a V-2SF fine and coarse one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

MULT_BITS = 24
MAX_INPUT_BITS = 63 - MULT_BITS


@dataclass(frozen=True)
class Dyadic:
    """``multiplier`` and ``shift``: int64 tensors of one shape (a scalar, or one per channel)."""

    multiplier: Tensor
    shift: Tensor

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        return {f"{prefix}.M": self.multiplier, f"{prefix}.N": self.shift}

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor], prefix: str) -> Dyadic:
        return cls(t[f"{prefix}.M"], t[f"{prefix}.N"])

    def describe(self) -> dict:
        m, n = self.multiplier.flatten(), self.shift.flatten()
        if m.numel() == 1:
            return {"multiplier": int(m), "shift": int(n)}
        return {"multiplier": [int(m.min()), int(m.max())], "shift": [int(n.min()), int(n.max())],
                "channels": m.numel()}

    def ratio(self) -> Tensor:
        """The real ratio it stands for (float64; for reports and tests only)."""
        return self.multiplier.double() * torch.pow(2.0, -self.shift.double())


def dyadic(ratio: float | Tensor) -> Dyadic:
    """The dyadic multiplier nearest ``ratio`` (any sign; zero gives M = 0)."""
    r = torch.as_tensor(ratio, dtype=torch.float64).detach().cpu()
    if not bool(torch.isfinite(r).all()):
        raise ValueError("cannot requantize by a non-finite ratio")
    if bool((r.abs() >= 2.0 ** (MULT_BITS - 1)).any()):
        raise ValueError(f"a requantization ratio of {float(r.abs().max()):.3g} is beyond the "
                         f"{MULT_BITS}-bit multiplier: the grids are too far apart")
    _, exp = torch.frexp(r)  # |r| = f · 2^exp, f in [0.5, 1): floor(log2 |r|) = exp − 1
    n = (MULT_BITS - exp).clamp_min(0).to(torch.int64)
    m = torch.round(r * torch.pow(2.0, n.double()))
    over = (m.abs() >= (1 << MULT_BITS)) & (n > 0)  # rounding reached the next power of two
    n = torch.where(over, n - 1, n)
    m = torch.round(r * torch.pow(2.0, n.double()))
    zero = r == 0
    return Dyadic(torch.where(zero, 0, m.to(torch.int64)), torch.where(zero, 0, n))


def requantize(x: Tensor, d: Dyadic) -> Tensor:
    """``x`` (any integer dtype) times M / 2^N, rounded half up; int64. Per-channel multipliers
    broadcast along the last axis."""
    prod = x.to(torch.int64) * d.multiplier
    half = torch.where(d.shift > 0, torch.ones_like(d.shift) << (d.shift - 1).clamp_min(0), 0)
    return (prod + half) >> d.shift


def rounding_shift(x: Tensor, n: int | Tensor) -> Tensor:
    """x / 2^n rounded half up (the dyadic rule with M = 1)."""
    n = torch.as_tensor(n, dtype=torch.int64, device=x.device)
    half = torch.where(n > 0, torch.ones_like(n) << (n - 1).clamp_min(0), 0)
    return (x.to(torch.int64) + half) >> n


def bits_of(bound: float) -> int:
    """Bits of a signed integer register that holds every value in [−bound, bound]."""
    return max(1, math.ceil(math.log2(bound + 1))) + 1
