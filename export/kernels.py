"""The integer kernels of ``quant.integer`` as ONNX subgraphs, step for step.

Encoders (``encoders.py``: encode to codes, codes to matmul operands), the int32-accumulating
matmuls (``matmul.py``), the exponential (``exp2.py``), Softmax, GELU, and LayerNorm with its
integer square root: each function below mirrors the torch function of the same name, on int64
tensors, with the constants read from the program.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from quant.integer.encoders import (
    Encoder,
    Log2Encoder,
    Pow2Encoder,
    UniformEncoder,
    V2SFEncoder,
)
from quant.integer.exp2 import COEF_BITS, COEFS, FRAC_BITS, MAX_SHIFT
from quant.integer.gelu import _CUBIC, _SLOPE, CLIP, IN_BITS, SIG_BITS
from quant.integer.layernorm import NORM_BITS, SIGMA_BITS
from quant.integer.matmul import INT32_MAX
from quant.integer.softmax import PROB_BITS

from .graph import (
    I64,
    U8,
    Graph,
    clamp,
    is_const,
    npi,
    pow2,
    requantize,
    rounding_shift,
    shl,
    shr,
    total,
)


class ExportError(ValueError):
    """The program (or one of its operators) has no ONNX form."""


def _top(enc: Encoder) -> int:
    return (1 << enc.bits) - 1


# -- encoders ----------------------------------------------------------------------------------
def encode(g: Graph, enc: Encoder, v: str) -> str:
    """``Encoder.encode``: integers on the encoder's input grid to b-bit codes (int64)."""
    top = _top(enc)
    if isinstance(enc, UniformEncoder | Pow2Encoder):
        q = requantize(g, v, enc.rescale.multiplier, enc.rescale.shift)
        return clamp(g, g("Add", q, npi(enc.zero_point)), 0, top)
    if isinstance(enc, V2SFEncoder):
        if enc.sign_rule:
            flag = g("GreaterOrEqual", v, 0)
        else:
            half = requantize(g, v, enc.half.multiplier, enc.half.shift)
            flag = g("GreaterOrEqual", half, npi(enc.threshold))
        f, z, c = npi(enc.fine_codes), npi(enc.zero_point), npi(enc.coarse_start)
        fine = clamp(g, g("Add", requantize(g, v, enc.fine.multiplier, enc.fine.shift), z),
                     0, f - 1)
        coarse = requantize(g, v, enc.coarse.multiplier, enc.coarse.shift)
        coarse = g("Add", clamp(g, g("Sub", coarse, c), 0, top - f), f)
        return g("Where", flag, coarse, fine)
    if isinstance(enc, Log2Encoder):
        below = g("Less", g("Unsqueeze", v, np.array([-1], np.int64)), npi(enc.thresholds))
        q = g("ReduceSum", g.cast(below, I64), np.array([-1], np.int64), keepdims=0)
        return g("Where", g("Greater", q, enc.exp_max), top, q)
    raise ExportError(f"no ONNX form for the {enc.scheme!r} encoder")


@dataclass
class Part:
    """One matmul operand part: ``value = (base − offset) << exps`` (int64), left-shifted by
    ``shift`` in the sum of parts; every value lies in [lo, hi]. ``base`` is a tensor name or a
    constant; ``offset`` is an int, or (with ``exps``, a pow2 operand) one zero point and one
    exponent per channel of the last axis, where ``base`` holds the codes, in [0, base_max]."""

    base: str | np.ndarray
    offset: int | np.ndarray
    shift: int
    lo: int
    hi: int
    exps: np.ndarray | None = None
    base_max: int = 0

    @property
    def per_channel(self) -> bool:
        return self.exps is not None

    def value(self, g: Graph):
        if is_const(self.base):
            v = self.base - self.offset
            return v if self.exps is None else v << self.exps
        v = g("Sub", self.base, self.offset) if np.any(self.offset) else self.base
        return v if self.exps is None else shl(g, v, self.exps)

    def plain(self, g: Graph) -> Part:
        """The same values with one scalar offset (the per-channel operand materialised)."""
        if not self.per_channel:
            return self
        return Part(self.value(g), 0, self.shift, self.lo, self.hi)

    def zero_point(self) -> int | None:
        """The uint8 zero point that puts every value in [0, 255], or None."""
        if self.per_channel:
            return None
        off = int(self.offset)
        if 0 <= off <= 255 and self.lo + off >= 0 and self.hi + off <= 255:
            return off  # base itself is the uint8 code
        zp = max(0, -self.lo)
        return zp if zp <= 255 and self.hi + zp <= 255 else None

    def u8(self, g: Graph, zp: int) -> str:
        """The uint8 tensor u with ``u − zp == value``."""
        add = zp - int(self.offset)
        if is_const(self.base):
            return g.const((self.base + add).astype(np.uint8))
        return g.cast(g("Add", self.base, add) if add else self.base, U8)


def operands(g: Graph, enc: Encoder, codes: str) -> list[Part]:
    """``Encoder.operands``: codes (int64 in [0, 2^b − 1]) to the parts of the integer operand."""
    top = _top(enc)
    if isinstance(enc, UniformEncoder):
        z = int(enc.zero_point)
        return [Part(codes, z, 0, -z, top - z)]
    if isinstance(enc, Pow2Encoder):
        z, e = npi(enc.zero_point), npi(enc.exponent)
        scale = pow2(e)
        return [Part(codes, z, 0, int((-z * scale).min()), int(((top - z) * scale).max()), e,
                     top)]
    if isinstance(enc, V2SFEncoder):
        z, f, c = int(enc.zero_point), int(enc.fine_codes), int(enc.coarse_start)
        flag = g("GreaterOrEqual", codes, f)
        fine = g("Where", flag, z, codes)  # − z: where(flag, 0, codes − z)
        coarse = g("Where", flag, g("Add", codes, c - f), 0)
        return [Part(fine, z, 0, min(0, -z), max(0, f - 1 - z)),
                Part(coarse, 0, int(enc.shift), min(0, c), max(0, top - f + c))]
    if isinstance(enc, Log2Encoder):
        zero = g("GreaterOrEqual", codes, top)
        shifted = shl(g, 1, g("Sub", enc.exp_max, g("Min", codes, enc.exp_max)))
        return [Part(g("Where", zero, 0, shifted), 0, 0, 0, 1 << enc.exp_max)]
    raise ExportError(f"no ONNX form for the {enc.scheme!r} encoder")


def operand(g: Graph, enc: Encoder, codes: str) -> str:
    """``Encoder.operand``: the parts' shifted sum, one int64 tensor."""
    return total(g, [shl(g, p.value(g), p.shift) for p in operands(g, enc, codes)])


def const_parts(w: np.ndarray) -> list[Part]:
    """A constant matmul operand (the integer weights, (K, N)) as one part."""
    w = npi(w)
    return [Part(w, 0, 0, int(w.min()), int(w.max()))]


# -- matmuls -----------------------------------------------------------------------------------
def _slice_k(g: Graph, p: Part, start, stop, axis: int) -> Part:
    """Part of the reduction axis (``axis``: −1 for the left operand, −2 for the right);
    ``start`` and ``stop`` are ints, or 1-element tensors when the length is known at run time
    only (then ``p`` is not per channel)."""
    if is_const(p.base):
        base = p.base[start:stop] if axis == -2 else p.base[..., start:stop]
    elif isinstance(start, int):
        base = g.slice(p.base, start, stop, axis)
    else:
        base = g("Slice", p.base, start, stop, np.array([axis], np.int64))
    if not p.per_channel:
        return Part(base, p.offset, p.shift, p.lo, p.hi)
    return Part(base, p.offset[start:stop], p.shift, p.lo, p.hi, p.exps[start:stop], p.base_max)


def _mm_integer(g: Graph, a: str, b: str, za: int, zb: int) -> str:
    return g.cast(g("MatMulInteger", a, b, g.const(np.array(za, np.uint8)),
                    g.const(np.array(zb, np.uint8))), I64)


def _mm_per_channel(g: Graph, a: Part, w: np.ndarray) -> str:
    """A pow2 operand ``(q − z_k) << e_k`` times constant weights w (K, N): per exponent e, the
    channels of that exponent as uint8 codes times their weights, minus the constant z·w, then
    << e. An 8-bit matmul for each group when its codes·w accumulator provably fits int32
    (2^b − 1 times the largest column sum of |w|); else an int64 matmul."""
    terms = []
    for e in np.unique(a.exps):
        idx = np.flatnonzero(a.exps == e)
        wg = w[idx]
        codes = a.base if idx.size == a.exps.size else g("Gather", a.base, idx, axis=-1)
        if a.base_max <= 255 and a.base_max * int(np.abs(wg).sum(0).max()) <= INT32_MAX:
            fits = int(wg.min()) >= -128 and int(wg.max()) <= 127
            zb = 128 if fits else max(0, -int(wg.min()))
            acc = _mm_integer(g, g.cast(codes, U8), g.const((wg + zb).astype(np.uint8)), 0, zb)
        else:
            acc = g("MatMul", codes, wg)
        terms.append(shl(g, g("Sub", acc, npi(a.offset[idx]) @ wg), int(e)))
    return total(g, terms)


def _mm(g: Graph, a: Part, b: Part) -> str:
    """a @ b exactly, int64 out. Where both operands fit 8 bits (given their zero points),
    MatMulInteger on uint8 operands with int32 accumulation: the lowering proved that no chunk's
    accumulator leaves int32. uint8 × uint8 (signed weights shifted by 128, b_zero_point 128)
    rather than uint8 × int8, whose x86 kernels without VNNI add pairs of products in saturating
    int16. A pow2 operand (a zero point and an exponent per reduction channel, which
    MatMulInteger's zero points cannot express) is split by exponent (``_mm_per_channel``).
    Otherwise (log2 operands of more than 7 bits, codes wider than 8 bits) an int64 MatMul:
    exact, as the engine's own int64 matmul."""
    if a.per_channel and is_const(b.base) and not b.per_channel:
        return _mm_per_channel(g, a, npi(b.value(g)))
    a, b = a.plain(g), b.plain(g)
    za, zb = a.zero_point(), b.zero_point()
    if za is not None and zb is not None:
        return _mm_integer(g, a.u8(g, za), b.u8(g, zb), za, zb)
    return g("MatMul", g.name_of(a.value(g)), g.name_of(b.value(g)))


def int_matmul(g: Graph, a: Part, b: Part, k: int | None, chunks: int) -> str:
    """``matmul.int_matmul``: the reduction axis (length k; None: read at run time) cut into
    chunks of ⌈k / chunks⌉, each an int32 accumulator, the chunks summed in int64."""
    if chunks <= 1:
        return _mm(g, a, b)
    if k is not None:
        size = math.ceil(k / chunks)
        return total(g, [_mm(g, _slice_k(g, a, s, s + size, -1),
                             _slice_k(g, b, s, s + size, -2)) for s in range(0, k, size)])
    # ⌈k / size⌉ ≤ chunks chunks; any past the end are empty and add 0.
    a, b = a.plain(g), b.plain(g)
    size = g("Div", g("Add", g.dim(g.name_of(a.base), -1), chunks - 1), chunks)
    bounds = [g("Mul", size, i) for i in range(chunks + 1)]
    return total(g, [_mm(g, _slice_k(g, a, bounds[i], bounds[i + 1], -1),
                         _slice_k(g, b, bounds[i], bounds[i + 1], -2)) for i in range(chunks)])


def shifted_matmul(g: Graph, a_parts: list[Part], b_parts: list[Part], k: int | None,
                   chunks: int) -> str:
    """``matmul.shifted_matmul``: Σ (a_i @ b_j) << (shift_i + shift_j). The engine multiplies
    each a part by b's whole operand; b's parts (a V-2SF operand on the right) are split here
    too, which changes no value: each element of b is in exactly one part, so every partial
    accumulator is bounded by the whole one."""
    terms = []
    for pa in a_parts:
        for pb in b_parts:
            terms.append(shl(g, int_matmul(g, pa, pb, k, chunks), pa.shift + pb.shift))
    return total(g, terms)


# -- exponential, Softmax, GELU ---------------------------------------------------------------
def exp2_neg(g: Graph, a: str) -> str:
    """``exp2.exp2_neg``: 2^(−a / 2^16) · 2^16 for int64 a ≥ 0."""
    whole = g("Min", shr(g, a, FRAC_BITS), MAX_SHIFT)
    u = g("Neg", g("BitwiseAnd", a, (1 << FRAC_BITS) - 1))
    t = None
    for c in reversed(COEFS[:-1]):
        prod = g("Mul", u, COEFS[-1]) if t is None else g("Mul", t, u)
        t = g("Add", shr(g, prod, FRAC_BITS), c)
    return rounding_shift(g, t, g("Add", whole, COEF_BITS - FRAC_BITS))


def int_softmax(g: Graph, logits: str, m, n, keep: str | None) -> str:
    """``softmax.int_softmax``: int64 probabilities at step 2^-16 over the last axis."""
    a = requantize(g, logits, m, n)
    if keep is not None:
        a = g("Where", keep, a, np.iinfo(np.int64).min // 4)
    last = np.array([-1], np.int64)
    top = g("ReduceMax", a, last, keepdims=1)
    e = exp2_neg(g, g("Sub", top, a))
    if keep is not None:
        e = g("Where", keep, e, 0)
    tot = g("ReduceSum", e, last, keepdims=1)
    num = g("Add", shl(g, e, PROB_BITS + 1), tot)
    p = g("Div", num, g("Max", g("Mul", tot, 2), 1))  # non-negative: truncation is the floor
    return g("Where", g("Greater", tot, 0), p, 0)


def int_gelu(g: Graph, x: str) -> str:
    """``gelu.int_gelu`` of int64 x at step 2^-12, on the same grid."""
    xc = clamp(g, x, -CLIP, CLIP)
    cube = g("Mul", rounding_shift(g, g("Mul", xc, xc), IN_BITS), xc)
    inner = g("Add", xc, rounding_shift(g, g("Mul", cube, _CUBIC), 24 + IN_BITS))
    a = rounding_shift(g, g("Mul", g("Abs", inner), _SLOPE), 24 + IN_BITS - FRAC_BITS)
    e = exp2_neg(g, a)
    one = 1 << FRAC_BITS
    num = g("Where", g("GreaterOrEqual", inner, 0), one, e)
    ope = g("Add", e, one)
    sig = g("Div", g("Add", shl(g, num, SIG_BITS + 1), ope), g("Mul", ope, 2))
    return rounding_shift(g, g("Mul", x, sig), SIG_BITS)


# -- LayerNorm ---------------------------------------------------------------------------------
# ``layernorm.isqrt`` iterates x ← min(x, ⌊(x + ⌊n/x⌋)/2⌋) until nothing changes, from
# x₀ = 2^⌈bits(n)/2⌉ ∈ [√n, 2√n]. An element at its fixed point stays there, so a fixed number
# of steps that brings every int64 n to its fixed point gives the loop's result exactly. Six are
# enough: each step is at most the real Newton step from above (⌊(x + ⌊n/x⌋)/2⌋ = ⌊(x + n/x)/2⌋
# and that map increases on [√n, ∞)), whose relative error e → e²/(2(1 + e)) goes from e₀ ≤ 1 to
# 1/4, 2.5·10⁻², 3.1·10⁻⁴, 4.7·10⁻⁸, 1.1·10⁻¹⁵; with √n < 2^31.5 the fifth iterate is below
# √n + 10⁻⁵, so it is ⌊√n⌋ or ⌊√n⌋ + 1, and from ⌊√n⌋ + 1 = s + 1 (n < (s+1)²) the next step
# gives ⌊(s + 1 + ⌊n/(s+1)⌋)/2⌋ ≤ s, never below ⌊√n⌋ (AM-GM): the sixth is ⌊√n⌋. (n = 0 takes
# one step.) tests/test_export_onnx.py checks the count against the loop on edge values.
ISQRT_STEPS = 6


def bit_length(g: Graph, n: str) -> str:
    """``layernorm.bit_length`` of non-negative int64 n."""
    top = None
    for k in (32, 16, 8, 4, 2, 1):
        shifted = shr(g, n, k if top is None else g("Add", top, k), nonneg=True)
        step = g("Mul", g.cast(g("Greater", shifted, 0), I64), k)
        top = step if top is None else g("Add", top, step)
    return g("Add", top, g.cast(g("Greater", n, 0), I64))


def isqrt(g: Graph, n: str) -> str:
    """``layernorm.isqrt``: ⌊√n⌋ for non-negative int64 n (``ISQRT_STEPS`` Newton steps)."""
    x = shl(g, 1, g("Div", g("Add", bit_length(g, n), 1), 2))
    for _ in range(ISQRT_STEPS):
        y = g("Div", g("Add", x, g("Div", n, g("Max", x, 1))), 2)
        x = g("Min", x, y)  # where(y < x, y, x)
    return x


def int_layernorm(g: Graph, x: str, gamma, beta, eps, channels: int) -> str:
    """``layernorm.int_layernorm`` over the last axis of the int64 operand x; ``eps`` a
    constant or a tensor broadcastable to the rows."""
    last = np.array([-1], np.int64)
    d = g("Sub", g("Mul", x, channels), g("ReduceSum", x, last, keepdims=1))
    spare = 62 - 2 * SIGMA_BITS - channels.bit_length()
    top = bit_length(g, g("ReduceMax", g("Abs", d), last, keepdims=1))
    r = g("Max", shr(g, g("Add", g("Mul", top, 2), 1 - spare), 1), 0)
    dv = shr(g, d, r)
    var = g("Div", g("ReduceSum", g("Mul", dv, dv), last, keepdims=1), channels)
    var = g("Add", var, shr(g, g.name_of(eps), g("Mul", r, 2)))
    sigma = g("Max", isqrt(g, shl(g, var, 2 * SIGMA_BITS)), 1)
    num = g("Add", shl(g, g("Abs", d), g("Sub", NORM_BITS + SIGMA_BITS + 1, r)), sigma)
    nrm = g("Div", num, g("Mul", sigma, 2))
    nrm = g("Where", g("Less", d, 0), g("Neg", nrm), nrm)
    return g("Add", g("Mul", nrm, npi(gamma)), npi(beta))
