"""Lowering: a calibrated quantized twin to its integer program (shared by every family).

Each step turns the real scales of the float twin into integer constants once: weights as their
integer codes, biases as int32 at the accumulator's scale s_x·s_w, every scale change as a dyadic
multiplier, LayerScale folded into the residual add's multiplier. ``Value`` carries, at lowering
time only, what the program does not need at run time: the real step of an integer tensor and
its worst-case magnitude, from which each accumulator's worst-case width is proved (``matmul``)
and each requantization's input is checked against int64 (``dyadic.MAX_INPUT_BITS``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..modules import QLayerNorm, QLinear, QuantModule, UnsupportedModelError
from ..quantizers import ChannelPow2Quantizer, Quantizer, UniformQuantizer
from .dyadic import MAX_INPUT_BITS, Dyadic, bits_of, dyadic
from .encoders import Encoder, Log2Encoder, UniformEncoder, V2SFEncoder, encoder_for
from .gelu import IN_BITS as GELU_BITS
from .layernorm import NORM_BITS, affine_constants, eps_constant
from .matmul import INT32_MAX, chunks_for
from .program import Op, Program
from .softmax import PROB_BITS

LOG2E = 1.4426950408889634


class AccumulatorOverflowError(OverflowError):
    """A requantization's input may not fit the int64 product of the dyadic rule."""


def f64(t) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64).detach().cpu()


@dataclass
class Value:
    """An integer tensor of the program: its name, real step and worst-case |value| (both
    scalars or per channel of the last axis). ``encoder``: set when the tensor holds codes."""

    name: str
    step: Tensor
    bound: Tensor
    encoder: Encoder | None = None
    first: Value | None = None  # token 0's step and bound, when it has a quantizer of its own


@dataclass
class Builder:
    ops: list[Op] = field(default_factory=list)
    counter: int = 0

    def emit(self, kind: str, inputs: list[Value | str], attrs: dict | None = None,
             tensors: dict[str, Tensor] | None = None, info: dict | None = None,
             name: str | None = None) -> str:
        self.counter += 1
        out = name or f"t{self.counter}"
        self.ops.append(Op(kind, [i if isinstance(i, str) else i.name for i in inputs], out,
                           attrs or {}, tensors or {}, info or {}))
        return out

    def program(self, inputs: list[str], outputs: list[str]) -> Program:
        return Program(self.ops, inputs, outputs)

    # -- shared steps --------------------------------------------------------------------------

    def check_requant_input(self, v: Value, where: str) -> None:
        bits = bits_of(float(v.bound.max()))
        if bits > MAX_INPUT_BITS:
            raise AccumulatorOverflowError(
                f"{where}: its input may reach {bits} bits, beyond the {MAX_INPUT_BITS} that "
                "requantization by a 24-bit multiplier takes in int64; lower the bit widths")

    @staticmethod
    def chunks(chunk_bound, worst: float, k: int, where: str) -> int:
        try:
            return chunks_for(chunk_bound, k)
        except OverflowError as e:
            raise AccumulatorOverflowError(
                f"{where}: {e} (worst case {bits_of(worst)} bits over {k} terms); lower its "
                "bit widths") from None

    def encode(self, v: Value, q: Quantizer, where: str, first_q: Quantizer | None = None,
               kind: str = "encode", extra: dict | None = None,
               extra_tensors: dict | None = None, in_step: Tensor | None = None) -> Value:
        """``v``'s integers to the codes of ``q`` (token 0 to ``first_q``'s, if given)."""
        self.check_requant_input(v, where)
        enc = encoder_for(q, v.step if in_step is None else in_step)
        attrs, tensors = {"enc": enc.attrs()}, prefixed(enc.tensors(), "enc")
        first = None
        if first_q is not None or (v.first is not None and in_step is None):
            # token 0: its own quantizer, or the same one from its own step
            fstep = (v.first or v).step if in_step is None else in_step
            fenc = encoder_for(first_q or q, fstep)
            attrs["enc0"] = fenc.attrs()
            tensors.update(prefixed(fenc.tensors(), "enc0"))
            if first_q is not None:
                first = Value("", f64(fenc.step), f64(0), fenc)
        extra_info = {k[:-2]: Dyadic.from_tensors(extra_tensors, k[:-2]).describe()
                      for k in (extra_tensors or {}) if k.endswith(".M")}
        name = self.emit(kind, [v], {**attrs, **(extra or {})},
                         {**tensors, **(extra_tensors or {})},
                         {"layer": where, **enc.describe(), **extra_info})
        return Value(name, f64(enc.step), f64(0), enc, first)

    def layernorm(self, m: QLayerNorm, x: Value, where: str) -> Value:
        """The integer LayerNorm of a stream value (its input quantizer's codes first)."""
        if not m.input_q.enabled:
            raise UnsupportedModelError(f"{where}: the integer setting quantizes every "
                                        "LayerNorm input")
        codes = self.encode(x, m.input_q, where + ".input_q", m.first_q)
        c = m.normalized_shape[0]
        gamma, beta, g = affine_constants(m.weight, m.bias, c)

        def eps_of(enc: Encoder) -> Tensor:
            return eps_constant(m.eps, c, float(enc.step))

        attrs = {"in": codes.encoder.attrs()}
        tensors = {**prefixed(codes.encoder.tensors(), "in"), "gamma": gamma, "beta": beta,
                   "eps": eps_of(codes.encoder)}
        if codes.first is not None:
            attrs["in0"] = codes.first.encoder.attrs()
            tensors.update(prefixed(codes.first.encoder.tensors(), "in0"))
            tensors["eps0"] = eps_of(codes.first.encoder)
        bound = math.sqrt(c) * 2.0 ** NORM_BITS * float(gamma.abs().max()) + float(beta.abs().max())
        name = self.emit("layernorm", [codes], attrs, tensors,
                         {"layer": where, "output_bits": bits_of(bound)})
        return Value(name, f64(2.0 ** -(NORM_BITS + g)), f64(bound))

    def linear(self, m: QLinear, x: Value, where: str, codes: Value | None = None) -> Value:
        """``m`` on ``x`` (integers, encoded to ``m.input_q``'s codes first) or on ``codes``
        already made by a kernel (Softmax, GELU)."""
        if not (m.weight_q.enabled and m.input_q.enabled):
            raise UnsupportedModelError(f"{where}: the integer setting quantizes every Linear")
        if codes is None:
            codes = self.encode(x, m.input_q, where + ".input_q", m.first_q)
        w_int, w_step = weight_integers(m.weight_q, m.weight.detach())
        return self.weighted("linear", m, codes, w_int, w_step, where)

    def weighted(self, kind: str, m: QuantModule, codes: Value, w_int: Tensor, w_step: Tensor,
                 where: str, attrs: dict | None = None) -> Value:
        """A weighted integer layer (Linear, patch convolution): int32 accumulators, bias at
        the accumulator's scale, worst case proved per output channel."""
        w2 = w_int.reshape(w_int.shape[0], -1)
        enc = codes.encoder
        encs = [enc] + ([codes.first.encoder] if codes.first is not None else [])
        part_bounds, total, steps = [], torch.zeros(w2.shape[0], dtype=torch.float64), []
        part_terms: list[Tensor] = []  # per part: |W[n,k]|·max|a_k|, for the chunk bounds
        bias = None if m.bias is None else f64(m.bias.detach())
        for e in encs:
            acc_step = f64(e.step) * w_step
            steps.append(acc_step)
            b_int = (torch.zeros_like(acc_step) if bias is None else torch.round(bias / acc_step))
            shifts = [s for _, s in e.operands(torch.zeros(1, dtype=torch.int64))]
            whole = b_int.abs()
            for ob, shift in zip(e.operand_bounds(), shifts, strict=True):
                per_k = ob if ob.numel() > 1 else ob.expand(w2.shape[1])
                if kind == "patch_conv" and per_k.numel() != w2.shape[1]:
                    per_k = ob.reshape(()).expand(w2.shape[1])
                terms = w2.abs().double() * per_k
                part_terms.append(terms)
                part = terms.sum(1)
                part_bounds.append(part)
                whole = whole + part * 2.0 ** shift
            total = torch.maximum(total, whole)
        # the bias starts the accumulator (int32 on a device), so it counts in its worst case
        b_top = 0.0 if bias is None else max(float(torch.round(bias / st).abs().max())
                                             for st in steps)
        worst = float(torch.stack(part_bounds).max()) + b_top
        chunks = self.chunks(lambda c: max(_chunk_sums(t, c) for t in part_terms) + b_top,
                             worst, w2.shape[1], where)
        b_main = (torch.zeros_like(steps[0]) if bias is None
                  else torch.round(bias / steps[0])).to(torch.int64)
        if b_main.abs().max() > INT32_MAX:
            raise AccumulatorOverflowError(f"{where}: its bias does not fit int32")
        tensors = {"weight": smallest_int(w2), "bias": b_main,
                   **prefixed(enc.tensors(), "in")}
        op_attrs = {"in": enc.attrs(), "chunks": chunks, **(attrs or {})}
        first = None
        if codes.first is not None:
            op_attrs["in0"] = codes.first.encoder.attrs()
            tensors.update(prefixed(codes.first.encoder.tensors(), "in0"))
            tensors["bias0"] = torch.round(bias / steps[1]).to(torch.int64) if bias is not None \
                else torch.zeros_like(b_main)
            first = Value("", steps[1], total)
        name = self.emit(kind, [codes], op_attrs, tensors, {
            "layer": where, "worst_case_bits": bits_of(worst), "chunks": chunks,
            "requant_input_bits": bits_of(float(total.max()))})
        return Value(name, steps[0], total, None, first)

    def matmul(self, a: Value, b: Value, k: int, where: str, transpose_b: bool,
               a_row_sum: float | None = None) -> Value:
        """An activation × activation matmul over a reduction axis of length ``k``.
        ``a_row_sum``: a bound on Σ_k |a_k| in real units (1 for Softmax probabilities), which
        bounds A·V far tighter than k·max|a|: each code rounds its value up by at most half a
        step (a factor √2 for log2), so Σ_k |operand_k| ≤ a_row_sum / step + k/2 per part."""
        bb = max(float(x.max()) for x in b.encoder.operand_bounds())
        parts = [float(x.max()) * bb * k for x in a.encoder.operand_bounds()]
        amax = [float(x.max()) for x in a.encoder.operand_bounds()]
        sums = [float("inf")] * len(amax)
        if a_row_sum is not None:
            sums = [self._row_sum_bound(a.encoder, i, a_row_sum, k) for i in range(len(amax))]
            parts = [min(p, s * bb) for p, s in zip(parts, sums, strict=True)]
        shifts = [s for _, s in a.encoder.operands(torch.zeros(1, dtype=torch.int64))]

        def chunk_bound(c: int) -> float:
            size = math.ceil(k / c)
            return max(min(size * am, sm) * bb for am, sm in zip(amax, sums, strict=True))

        chunks = self.chunks(chunk_bound, max(parts), k, where)
        total = sum(p * 2.0 ** s for p, s in zip(parts, shifts, strict=True))
        name = self.emit("matmul", [a, b], {"a": a.encoder.attrs(), "b": b.encoder.attrs(),
                                            "transpose_b": transpose_b, "chunks": chunks},
                         {**prefixed(a.encoder.tensors(), "a"),
                          **prefixed(b.encoder.tensors(), "b")},
                         {"layer": where, "worst_case_bits": bits_of(max(parts)),
                          "chunks": chunks, "requant_input_bits": bits_of(total)})
        return Value(name, f64(a.encoder.step) * f64(b.encoder.step), f64(total))

    @staticmethod
    def _row_sum_bound(enc: Encoder, part: int, row_sum: float, k: int) -> float:
        if isinstance(enc, Log2Encoder):
            return math.sqrt(2) * row_sum / float(enc.step)
        if isinstance(enc, V2SFEncoder):
            step = float(enc.scale) * (2 ** int(enc.shift) if part else 1)
            return row_sum / step + k / 2 + (int(enc.zero_point) * k if not part else 0)
        if isinstance(enc, UniformEncoder):
            return row_sum / float(enc.scale) + k * (0.5 + abs(int(enc.zero_point)))
        return float("inf")

    def softmax(self, logits: Value, a_q: Quantizer, where: str,
                mask: str | None = None) -> Value:
        """The integer Softmax straight to ``a_q``'s codes."""
        self.check_requant_input(logits, where)
        exp = dyadic(float(logits.step) * LOG2E * 2.0 ** 16)
        return self.encode(logits, a_q, where, kind="softmax", extra_tensors=exp.tensors("exp"),
                           in_step=f64(2.0 ** -PROB_BITS)) if mask is None else \
            self._masked_softmax(logits, a_q, where, mask, exp)

    def _masked_softmax(self, logits: Value, a_q: Quantizer, where: str, mask: str,
                        exp: Dyadic) -> Value:
        enc = encoder_for(a_q, f64(2.0 ** -PROB_BITS))
        name = self.emit("softmax", [logits, mask], {"enc": enc.attrs()},
                         {**prefixed(enc.tensors(), "enc"), **exp.tensors("exp")},
                         {"layer": where, **enc.describe(), "exp": exp.describe()})
        return Value(name, f64(enc.step), f64(0), enc)

    def gelu(self, acc: Value, q: Quantizer, where: str,
             first_q: Quantizer | None = None) -> Value:
        """Integer GELU of a Linear's accumulators, straight to ``q``'s codes (post-GELU)."""
        self.check_requant_input(acc, where)
        attrs, tensors = {}, dyadic(acc.step / 2.0 ** -GELU_BITS).tensors("rq")
        if acc.first is not None:
            attrs["rq0"] = True
            tensors.update(dyadic(acc.first.step / 2.0 ** -GELU_BITS).tensors("rq0"))
        return self.encode(Value(acc.name, acc.step, acc.bound), q, where, first_q, kind="gelu",
                           extra=attrs, extra_tensors=tensors, in_step=f64(2.0 ** -GELU_BITS))

    def requant(self, x: Value, step: float | Tensor, where: str,
                first_step: Tensor | None = None) -> Value:
        """``x`` to the grid ``step`` (token 0 to ``first_step``, when it has a grid of its own:
        then ``x`` may carry token 0's own step too)."""
        self.check_requant_input(x, where)
        attrs, tensors, info = self._row_dyadics("rq", x, 1.0, step, first_step)
        name = self.emit("requant", [x], attrs, tensors, {"layer": where, **info})
        ratio = max(float(self.ops[-1].dyadic(p).ratio().abs().max())
                    for p in ("rq", "rq0") if f"{p}.M" in self.ops[-1].tensors)
        return self._stream(name, step, first_step, x.bound * ratio + 1)

    def residual(self, x: Value, branch: Value, step: float | Tensor, where: str,
                 gamma: Tensor | None = None, first_step: Tensor | None = None) -> Value:
        """x + γ·branch on the grid ``step`` (the next LayerNorm's; token 0 on ``first_step``
        when that LayerNorm gives it a quantizer of its own): each term requantized by its own
        dyadic multiplier, LayerScale's γ folded into the branch's."""
        self.check_requant_input(x, where)
        self.check_requant_input(branch, where)
        g = torch.ones(()) if gamma is None else f64(gamma)
        a_attrs, a_t, a_info = self._row_dyadics("a", x, 1.0, step, first_step)
        b_attrs, b_t, b_info = self._row_dyadics("b", branch, g, step, first_step)
        name = self.emit("residual", [x, branch], {**a_attrs, **b_attrs}, {**a_t, **b_t},
                         {"layer": where, **a_info, **b_info})
        op = self.ops[-1]
        ra = max(float(op.dyadic(p).ratio().abs().max()) for p in ("a", "a0")
                 if f"{p}.M" in op.tensors)
        rb = max(float(op.dyadic(p).ratio().abs().max()) for p in ("b", "b0")
                 if f"{p}.M" in op.tensors)
        bound = float(x.bound.max()) * ra + float(branch.bound.max()) * rb + 2
        return self._stream(name, step, first_step, f64(bound))

    @staticmethod
    def _row_dyadics(prefix: str, x: Value, gain, step, first_step) -> tuple[dict, dict, dict]:
        """Dyadic multipliers from ``x``'s grid to ``step`` (and, for token 0, from its own
        grid to ``first_step``, when either differs for it)."""
        d = dyadic(x.step * gain / f64(step))
        attrs, tensors, info = {}, d.tensors(prefix), {prefix: d.describe()}
        if x.first is not None or first_step is not None:
            src = (x.first or x).step
            d0 = dyadic(src * gain / f64(step if first_step is None else first_step))
            attrs[prefix + "0"] = True
            tensors.update(d0.tensors(prefix + "0"))
            info[prefix + "0"] = d0.describe()
        return attrs, tensors, info

    @staticmethod
    def _stream(name: str, step, first_step, bound) -> Value:
        first = None if first_step is None else Value("", f64(first_step), f64(bound))
        return Value(name, f64(step), f64(bound).reshape(-1).max().reshape(()), None, first)


def _chunk_sums(terms: Tensor, chunks: int) -> float:
    """The largest sum of ``terms`` (out, k) over one of ``chunks`` equal runs of k."""
    out, k = terms.shape
    size = math.ceil(k / chunks)
    padded = torch.nn.functional.pad(terms, (0, size * chunks - k))
    return float(padded.reshape(out, chunks, size).sum(-1).max())


def prefixed(t: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {f"{prefix}.{k}": v for k, v in t.items()}


def smallest_int(t: Tensor) -> Tensor:
    for dt in (torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dt)
        if int(t.min()) >= info.min and int(t.max()) <= info.max:
            return t.to(dt)
    return t.to(torch.int64)


def weight_integers(q: UniformQuantizer, w: Tensor) -> tuple[Tensor, Tensor]:
    """A weight's integer codes as signed integers, and its per-output-channel step."""
    ints = q.integer(q.codes(w.float())).to(torch.int64).cpu()
    return ints, f64(q.scale).reshape(-1)


# Fraction bits the residual stream carries beyond the codes of the LayerNorm that reads it. On
# the codes' own grid each residual add would round the branch to a LayerNorm-input step, and
# the error would add up block after block (a random-init ViT, whose branches are small against
# the stream, lost its logits' cosine to FP32 from 0.99 to 0.90 that way); 8 more bits keep
# the stream within int32 (a 16-to-24-bit integer) and make its rounding negligible.
STREAM_EXTRA_BITS = 8


def stream_step(m: QLayerNorm) -> Tensor:
    """The grid of the residual stream that ``m`` reads: its input quantizer's base scale (O-2SF's
    normal channels; the outlier channels are then a shift away), STREAM_EXTRA_BITS finer. The
    LayerNorm's input codes are then a rounding right shift of the stream per channel."""
    q = m.input_q
    if isinstance(q, (ChannelPow2Quantizer, UniformQuantizer)) and q.scale.numel() == 1:
        return f64(q.scale).reshape(()) / 2.0 ** STREAM_EXTRA_BITS
    raise UnsupportedModelError(f"no residual grid for a {type(q).__name__} LayerNorm input")


def first_stream_step(m: QLayerNorm) -> Tensor | None:
    """Token 0's grid of that stream, when ``m`` gives token 0 a quantizer of its own."""
    if m.first_q is None:
        return None
    return f64(m.first_q.scale).reshape(()) / 2.0 ** STREAM_EXTRA_BITS


def image_codes(b: Builder, q: UniformQuantizer, input_name: str) -> Value:
    """The program's entry: images to the patch embedding's input codes (the one float op on
    the way in, as ONNX's QuantizeLinear)."""
    if not q.enabled or q.scale.numel() != 1:
        raise UnsupportedModelError("the integer setting quantizes the image input per tensor")
    enc = encoder_for(q, f64(1.0))
    name = b.emit("quantize_image", [input_name], {"bits": q.bits},
                  {"scale": q.scale.detach().cpu().float().reshape(()),
                   "z": q.zero_point.detach().cpu().to(torch.int64).reshape(())},
                  {"layer": "image", "scale": float(q.scale)})
    return Value(name, f64(q.scale).reshape(()), f64(0), enc)


def logits_out(b: Builder, acc: Value, name: str = "logits") -> str:
    return b.emit("dequantize", [acc], {}, {"scale": acc.step.float()},
                  {"layer": "output", "worst_case_bits": bits_of(float(acc.bound.max()))},
                  name=name)
