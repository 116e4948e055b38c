"""Integer twins of the quantizers: integers on one grid in, codes out (``encode``), and codes
in, integer matmul operands out (``operands``).

Each encoder is built from a calibrated float quantizer (``quant.quantizers``) and the step of
the integers it will be given (a scalar, or one per channel of the last axis), so every scale
change is a dyadic multiplier (``dyadic``) computed once. The codes are the ones a device stores
between layers: b bits each, whatever the scheme.

Operands: a uniform code gives ``q − z``; a pow2 code ``(q − z_c) << e_c`` (one wider integer: the
LayerNorm's sums see the outlier channels aligned by that shift); V-2SF gives *two* operands, the
fine part (``p − z`` where the flag is 0, else 0) and the coarse part (``p + c`` where the flag is
1, else 0), each within b−1 bits (plus sign), and the consumer computes fine·W + (coarse·W << m).
Two b-bit matmuls rather than one on the (b−1+m)-bit operand ``p << (m·flag)``: the int8 units of
CPUs and NPUs (VNNI, AMX, ONNX's MatMulInteger) take 8-bit operands only, and m reaches 6 or 7.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from ..quantizers import (
    ChannelPow2Quantizer,
    Log2Quantizer,
    Quantizer,
    TwoScaleValueQuantizer,
    UniformQuantizer,
)
from .dyadic import Dyadic, dyadic, requantize


def _f64(t: float | Tensor) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64).detach().cpu()


def _i64(v) -> Tensor:
    return torch.as_tensor(v, dtype=torch.int64).detach().cpu()


class Encoder(ABC):
    """Base: ``encode`` integers (step ``in_step``) to codes, ``operands`` of codes."""

    scheme: str
    bits: int

    @abstractmethod
    def encode(self, v: Tensor) -> Tensor:
        """Integers of step ``in_step`` to codes."""

    @abstractmethod
    def operands(self, codes: Tensor) -> list[tuple[Tensor, int]]:
        """(operand, left shift) pairs whose shifted sum is the integer operand."""

    def operand(self, codes: Tensor) -> Tensor:
        """The integer operand as one (wider) integer."""
        return sum(o.to(torch.int64) << s for o, s in self.operands(codes))

    @abstractmethod
    def operand_bounds(self) -> list[Tensor]:
        """Per operand part: the largest |value| (a scalar, or per channel)."""

    @property
    @abstractmethod
    def step(self) -> Tensor:
        """The real step of the integer operand (float64: lowering only)."""

    @abstractmethod
    def tensors(self) -> dict[str, Tensor]:
        """The integer constants, by name (what ``encoder_from`` reads)."""

    def attrs(self) -> dict:
        return {"scheme": self.scheme, "bits": self.bits}

    def describe(self) -> dict:
        return {**self.attrs(), **{k: v.describe() for k, v in vars(self).items()
                                   if isinstance(v, Dyadic)}}


@dataclass
class UniformEncoder(Encoder):
    bits: int
    zero_point: Tensor  # scalar int64
    rescale: Dyadic
    scale: Tensor  # float64, lowering only
    scheme: str = "uniform"

    @classmethod
    def make(cls, q: UniformQuantizer, in_step: Tensor) -> UniformEncoder:
        if q.scale.numel() != 1:
            raise ValueError("per-channel activation quantizers have no integer encoder")
        s = _f64(q.scale).reshape(())
        return cls(q.bits, _i64(q.zero_point).reshape(()), dyadic(_f64(in_step) / s), s)

    def encode(self, v: Tensor) -> Tensor:
        return (requantize(v, self.rescale) + self.zero_point).clamp(0, (1 << self.bits) - 1)

    def operands(self, codes: Tensor) -> list[tuple[Tensor, int]]:
        return [(codes - self.zero_point, 0)]

    def operand_bounds(self) -> list[Tensor]:
        z = int(self.zero_point)
        return [_f64(max(z, (1 << self.bits) - 1 - z))]

    @property
    def step(self) -> Tensor:
        return self.scale

    def tensors(self) -> dict[str, Tensor]:
        return {"z": self.zero_point, **self.rescale.tensors("rq")}


@dataclass
class V2SFEncoder(Encoder):
    """V-2SF (and PTQ4ViT's twin uniform, ``sign_rule``) from integers."""

    bits: int
    zero_point: Tensor
    shift: Tensor  # m
    fine_codes: Tensor  # F: codes below F are fine payloads
    coarse_start: Tensor  # c
    fine: Dyadic  # to the fine grid s
    coarse: Dyadic  # to the coarse grid 2^m·s
    half: Dyadic  # to half fine steps, for the region threshold
    threshold: Tensor  # in half fine steps: flag = value ≥ threshold
    sign_rule: bool
    scale: Tensor
    scheme: str = "v2sf"

    @classmethod
    def make(cls, q: TwoScaleValueQuantizer, in_step: Tensor) -> V2SFEncoder:
        s, m, z = _f64(q.scale).reshape(()), int(q.shift), int(q.zero_point)
        fine_top = q.payload_max - z
        coarse_next = ((fine_top >> m) + 1) << m
        st = _f64(in_step)
        return cls(q.bits, _i64(z), _i64(m), _i64(int(q.fine_codes)),
                   _i64(q._coarse_start(m, z)), dyadic(st / s), dyadic(st / (s * 2.0 ** m)),
                   dyadic(2 * st / s), _i64(fine_top + coarse_next), q.region_rule == "sign", s)

    def encode(self, v: Tensor) -> Tensor:
        top = (1 << self.bits) - 1
        flag = v >= 0 if self.sign_rule else requantize(v, self.half) >= self.threshold
        fine = (requantize(v, self.fine) + self.zero_point).clamp(0, self.fine_codes - 1)
        coarse = (requantize(v, self.coarse) - self.coarse_start).clamp(
            0, top - self.fine_codes) + self.fine_codes
        return torch.where(flag, coarse, fine)

    def operands(self, codes: Tensor) -> list[tuple[Tensor, int]]:
        flag = codes >= self.fine_codes
        fine = torch.where(flag, 0, codes - self.zero_point)
        coarse = torch.where(flag, codes - self.fine_codes + self.coarse_start, 0)
        return [(fine, 0), (coarse, int(self.shift))]

    def operand_bounds(self) -> list[Tensor]:
        z, f = int(self.zero_point), int(self.fine_codes)
        top = (1 << self.bits) - 1
        return [_f64(max(z, f - 1 - z)), _f64(top - f + int(self.coarse_start))]

    @property
    def step(self) -> Tensor:
        return self.scale

    def attrs(self) -> dict:
        return {**super().attrs(), "sign_rule": self.sign_rule}

    def tensors(self) -> dict[str, Tensor]:
        return {"z": self.zero_point, "m": self.shift, "F": self.fine_codes,
                "c": self.coarse_start, "t": self.threshold, **self.fine.tensors("fine"),
                **self.coarse.tensors("coarse"), **self.half.tensors("half")}


@dataclass
class Pow2Encoder(Encoder):
    """O-2SF and PTF: one scale, a power-of-two exponent and a zero point per channel."""

    bits: int
    zero_point: Tensor  # (C,)
    exponent: Tensor  # (C,)
    rescale: Dyadic  # per channel, to 2^e_c · s
    scale: Tensor
    scheme: str = "pow2"

    @classmethod
    def make(cls, q: ChannelPow2Quantizer, in_step: Tensor) -> Pow2Encoder:
        s = _f64(q.scale).reshape(())
        e = _i64(q.exponent)
        return cls(q.bits, _i64(q.zero_point), e,
                   dyadic(_f64(in_step) / (s * torch.pow(2.0, e.double()))), s)

    def encode(self, v: Tensor) -> Tensor:
        return (requantize(v, self.rescale) + self.zero_point).clamp(0, (1 << self.bits) - 1)

    def operands(self, codes: Tensor) -> list[tuple[Tensor, int]]:
        return [((codes - self.zero_point) << self.exponent, 0)]

    def operand_bounds(self) -> list[Tensor]:
        top = (1 << self.bits) - 1
        z = self.zero_point.double()
        return [torch.maximum(z, top - z) * torch.pow(2.0, self.exponent.double())]

    @property
    def step(self) -> Tensor:
        return self.scale

    def tensors(self) -> dict[str, Tensor]:
        return {"z": self.zero_point, "e": self.exponent, **self.rescale.tensors("rq")}


@dataclass
class Log2Encoder(Encoder):
    """FQ-ViT's log2 quantizer for post-Softmax values: q = round(−log2 x) by comparisons with
    integer thresholds (q ≥ k exactly when x < 2^(0.5−k)); the operand is ``1 << (Q − q)``."""

    bits: int
    exp_max: int
    thresholds: Tensor  # (exp_max + 1,): x·step < 2^(0.5 − k), k = 1..exp_max+1
    scheme: str = "log2"

    @classmethod
    def make(cls, q: Log2Quantizer, in_step: Tensor) -> Log2Encoder:
        st = float(_f64(in_step))
        ks = torch.arange(1, q.exp_max + 2, dtype=torch.float64)
        return cls(q.bits, q.exp_max, torch.ceil(torch.pow(2.0, 0.5 - ks) / st).to(torch.int64))

    def encode(self, v: Tensor) -> Tensor:
        q = (v.unsqueeze(-1) < self.thresholds).sum(-1)
        return torch.where(q > self.exp_max, (1 << self.bits) - 1, q)

    def operands(self, codes: Tensor) -> list[tuple[Tensor, int]]:
        zero = codes >= (1 << self.bits) - 1
        shifted = torch.ones_like(codes) << (self.exp_max - codes.clamp_max(self.exp_max))
        return [(torch.where(zero, 0, shifted), 0)]

    def operand_bounds(self) -> list[Tensor]:
        return [_f64(2.0 ** self.exp_max)]

    @property
    def step(self) -> Tensor:
        return _f64(2.0 ** -self.exp_max)

    def attrs(self) -> dict:
        return {**super().attrs(), "exp_max": self.exp_max}

    def tensors(self) -> dict[str, Tensor]:
        return {"t": self.thresholds}


def encoder_for(q: Quantizer, in_step: float | Tensor) -> Encoder:
    """The integer encoder of calibrated ``q`` for integers of step ``in_step``."""
    step = _f64(in_step)
    if isinstance(q, TwoScaleValueQuantizer):
        return V2SFEncoder.make(q, step)
    if isinstance(q, ChannelPow2Quantizer):
        return Pow2Encoder.make(q, step)
    if isinstance(q, Log2Quantizer):
        return Log2Encoder.make(q, step)
    if isinstance(q, UniformQuantizer):
        return UniformEncoder.make(q, step)
    raise TypeError(f"no integer encoder for {type(q).__name__}")


def encoder_from(attrs: dict, t: dict[str, Tensor]) -> Encoder:
    """Rebuild an encoder from its ``attrs()`` and ``tensors()`` (the engine: no quantizer)."""
    scheme, bits = attrs["scheme"], int(attrs["bits"])
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    if scheme == "uniform":
        return UniformEncoder(bits, t["z"], Dyadic.from_tensors(t, "rq"), nan)
    if scheme == "v2sf":
        return V2SFEncoder(bits, t["z"], t["m"], t["F"], t["c"], Dyadic.from_tensors(t, "fine"),
                           Dyadic.from_tensors(t, "coarse"), Dyadic.from_tensors(t, "half"),
                           t["t"], bool(attrs["sign_rule"]), nan)
    if scheme == "pow2":
        return Pow2Encoder(bits, t["z"], t["e"], Dyadic.from_tensors(t, "rq"), nan)
    if scheme == "log2":
        return Log2Encoder(bits, int(attrs["exp_max"]), t["t"])
    raise ValueError(f"unknown encoder scheme {scheme!r}")
