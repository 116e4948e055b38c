"""The QDQ graph builder: nodes and initializers, and each tsptq quantizer as
QuantizeLinear/DequantizeLinear pairs that ONNX Runtime fuses into its int8 matmuls (one method
per quantizer scheme, one per layer kind). The families' graphs (``qdq_vit``, ``qdq_bert``) are
written with it; ``onnx_qdq`` says what the fast graph is and picks the family."""

from __future__ import annotations

import math

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from .kernels import ExportError

# The minimum of the erf GELU (−0.16997 at x = −0.7518), rounded down: a lower bound of every
# post-GELU value, which spares V-2SF's lower clip where its fine grid reaches below it.
GELU_MIN = -0.17


def _on(q) -> bool:
    return q is not None and bool(getattr(q, "enabled", True)) and bool(q.calibrated)


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def _exponent_groups(q, m, hint: str) -> list[tuple[int, np.ndarray]] | None:
    """O-2SF input ``q`` of the int8 Linear ``m``: (exponent, input rows) of each exponent
    group; None for other quantizers."""
    if not (_on(q) and q.scheme == "pow2" and _on(m.weight_q) and q.bits == 8):
        return None
    if q.scale.numel() != 1:
        raise ExportError(f"{hint}: O-2SF with per-channel base steps")
    e = _np(q.exponent.reshape(-1)).astype(np.int64)
    return [(int(exp), np.nonzero(e == exp)[0]) for exp in np.unique(e)]


def _steps(q) -> tuple[np.ndarray, np.ndarray]:
    """A per-channel power-of-two quantizer's (O-2SF, PTF) steps s·2^e_c and zero points z_c."""
    sc = _np((q.scale.float() * torch.pow(2.0, q.exponent.float())).reshape(-1))
    return sc, _np(q.zero_point.reshape(-1)).astype(np.float64)


def _pow2_bounds(q) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """O-2SF / PTF as float ops: steps sc_c and the code bounds −z_c, 2^b − 1 − z_c, so that
    x̂ = sc·min(max(round(x / sc), −z), top − z)."""
    sc, z = _steps(q)
    return (sc.astype(np.float32), (-z).astype(np.float32),
            ((1 << q.bits) - 1 - z).astype(np.float32))


OPERANDS = ("u8u8", "s8s8")
# Added to the channels an O-2SF operand leaves out: QuantizeLinear saturates them to the zero
# point's code −128, value 0 (its inputs are LayerNorm outputs, far from 10^30).
LEFT_OUT = -1e30
# An O-2SF input's largest exponent group is multiplied over every channel, the others' masked
# to 0, when those others hold at most this share of the channels: a pass fewer (no Gather over
# the tensor) for at most that share more multiplications in one matmul.
MASK_SHARE = 1 / 16


def _layout(groups: list[tuple[int, np.ndarray]], channels: int
            ) -> list[tuple[int, np.ndarray, bool]]:
    """(exponent, rows, masked) of each exponent group: ``masked`` for the largest one when the
    others are few (``MASK_SHARE``), read from the whole tensor and the whole weight; the others
    gathered, each with its weight rows."""
    big = max(range(len(groups)), key=lambda i: len(groups[i][1]))
    masked = channels - len(groups[big][1]) <= MASK_SHARE * channels
    return [(e, rows, masked and i == big) for i, (e, rows) in enumerate(groups)]


class QdqGraph:
    """Nodes and initializers, with fresh names; ``operands``: how the int8 grids are stored
    (see ``qdq``)."""

    def __init__(self, per_channel_qdq: bool = False, operands: str = "u8u8") -> None:
        if operands not in OPERANDS:
            raise ValueError(f"unknown operands {operands!r} (one of {OPERANDS})")
        self.per_channel_qdq = per_channel_qdq
        # u8u8: int8 codes stored + 128 as uint8 (zero points + 128), the same values
        self.shift, self.code_type = (128, np.uint8) if operands == "u8u8" else (0, np.int8)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0
        self.small: dict[tuple, str] = {}
        self.weights: dict[tuple, str] = {}
        self._row_index: str | None = None
        # Operands by (what, tensor, quantizer, ...): the column blocks of one Linear (qkv's q,
        # k and v) read one quantized input.
        self._operands: dict[tuple, object] = {}

    def fresh(self, hint: str) -> str:
        self.n += 1
        return f"{hint}_{self.n}"

    def const(self, value, hint: str = "c", dtype=np.float32) -> str:
        """An initializer; small ones (scalars, shapes) are written once per value."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes()) if arr.size <= 16 else None
        if key is not None and key in self.small:
            return self.small[key]
        name = self.fresh(hint)
        self.inits.append(numpy_helper.from_array(arr, name))
        if key is not None:
            self.small[key] = name
        return name

    def op(self, kind: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        out = self.fresh(hint or kind.lower())
        self.nodes.append(helper.make_node(kind, inputs, [out], name=out, **attrs))
        return out

    # -- quantizers ----------------------------------------------------------------------------
    def qdq(self, x: str, scale, zero, axis: int | None = None, hint: str = "q") -> str:
        """QuantizeLinear then DequantizeLinear, scale(s) and zero point(s) given on the int8
        grid. ``u8u8`` (the default) stores it as uint8 with the zero point shifted by 128 (the
        same values); with the weights' codes shifted the same way (``weight_dq``), every matmul
        ONNX Runtime fuses is uint8 × uint8, which it computes exactly on every x86 CPU. Its
        uint8 × int8 kernels (which also run int8 × int8, ``s8s8``) are exact and faster where
        the CPU has VNNI (and on ARM), but on x86 without VNNI (AVX2, AVX-512 before VNNI) they
        add pairs of products in saturating int16, as ONNX Runtime's quantization docs say: on
        an AVX2 EPYC the digits s8s8 graph's top-1 agreement with the integer engine fell to
        99.44%."""
        s = self.const(np.asarray(scale, np.float32), hint + "_s")
        z = self.const(np.asarray(zero).astype(np.int16) + self.shift, hint + "_z",
                       self.code_type)
        kw = {} if axis is None else {"axis": axis}
        q = self.op("QuantizeLinear", [x, s, z], hint + "_q", **kw)
        return self.op("DequantizeLinear", [q, s, z], hint + "_dq", **kw)

    def quantize(self, x: str, q, hint: str, floor: float = -math.inf) -> list[str]:
        """The dequantized operand(s) of quantizer ``q``: one, or V-2SF's fine and coarse parts
        (whose sum is the fake-quantized value). ``floor``: a lower bound of ``x`` (0 after a
        Softmax, GELU's minimum after a GELU), which can spare a clip. A matmul reads
        ``operands`` instead, which spares a pass more."""
        parts, offset = self.operands(x, q, hint, floor)
        if offset:
            parts[-1] = self.op("Sub", [parts[-1], self.const(np.float32(offset))], hint + "_off")
        return parts

    def once(self, key: tuple, build):
        """``build()``, written once per ``key`` (see ``_operands``)."""
        if key not in self._operands:
            self._operands[key] = build()
        return self._operands[key]

    def operands(self, x: str, q, hint: str, floor: float = -math.inf
                 ) -> tuple[list[str], float]:
        """``(parts, offset)``: the fake-quantized value is ``sum(parts) − offset``; a matmul
        takes the offset off its product (``offset · column sums``: a bias for a weight)."""
        parts, offset = self.once(("operands", x, id(q), floor),
                                  lambda: self._operands_of(x, q, hint, floor))
        return list(parts), offset

    def _operands_of(self, x: str, q, hint: str, floor: float) -> tuple[list[str], float]:
        if not _on(q):
            return [x], 0.0
        scheme = q.scheme
        if scheme == "uniform":
            if q.scale.numel() != 1:
                raise ExportError(f"{hint}: per-channel activation quantizer")
            return [self.qdq(x, float(q.scale), int(q.zero_point) - 128, hint=hint)], 0.0
        if scheme == "pow2":
            return [self._pow2(x, q, hint)], 0.0
        if scheme == "v2sf":
            return self._v2sf(x, q, hint, floor)
        if scheme == "log2":
            return [self._log2(x, q, hint)], 0.0
        raise ExportError(f"{hint}: no QDQ form for the {scheme} quantizer")

    def clip(self, x: str, lo: float | None, hi: float | None, hint: str) -> str:
        """Clip with scalar bounds (ONNX Runtime runs it ~2× faster than Min or Max, or than a
        Sub or Add of a scalar)."""
        bounds = ["" if v is None else self.const(np.float32(v), hint + "_b") for v in (lo, hi)]
        return self.op("Clip", [x, *bounds], hint)

    def _v2sf(self, x: str, q, hint: str, floor: float = -math.inf
              ) -> tuple[list[str], float]:
        """V-2SF as a fine and a coarse int8 operand and an offset: x̂ = fine + coarse − offset.

        With s the fine step, S = 2^m·s the coarse one, A = s·t the fine top (t = F − 1 − z),
        B = S·k0 the first coarse point above it (k0 = ⌊t/2^m⌋ + 1) and τ = (A + B)/2:
        x̂ = s·clip(round(x/s), −z, t) below τ and S·clip(round(x/S), k0, h) from τ up (h: the
        top coarse point in steps S; round(x/S) ≥ k0 there). Every Q/DQ pair shares its zero
        point (ONNX Runtime fuses only those into its 8-bit kernels), and the clips are
        QuantizeLinear's own saturation where they can be:

        * coarse = Q(clip(x, B, ·)) = S·min(max(round(x/S), k0), h): B below τ, x̂ from τ up;
          its upper clip is the saturation of zero point 127 − h. One pass;
        * fine: x̂ below τ and B from τ up, so that fine + coarse − B = x̂ everywhere. Where
          t + 1 = 2^m·k0 (post-Softmax: z = 0, t = 127 at 8 bits) the rounding itself lands A,
          τ and B right: fine = Q(x) with zero point 127 − (t + 1), which saturates at B, and
          its lower clip at −z·s is a saturation too where ``floor`` ≥ −z·s (post-Softmax,
          post-GELU): no pass. Where t = 2^m·(k0 − 1), A is itself a coarse point and τ the
          coarse grid's rounding edge A + S/2: fine = Q(x) saturating at A (zero point
          127 − t), coarse = Q(clip(x, A, ·)), offset A (A below τ, x̂ from τ up): no pass for
          the fine operand either. Else clip(x, −zs, A) + clip(x·K − τ⁻·K, 0, B − A) with K = 2^64
          (a step at τ without Where, which ONNX Runtime runs ~8× slower than Clip): five
          passes.

        Where a float subtraction meets a rounding tie the result can differ from the twin's
        by one step (ties have measure zero). Needs B and the coarse top on int8 grids: the
        value rule at ≤ 8 bits; else ExportError. The sign rule (PTQ4ViT's twin uniform, τ = 0)
        is clip(x, ·, 0) and relu(x), each clipped by saturation, offset 0."""
        s, m, z = float(q.scale), int(q.shift), int(q.zero_point)
        if q.region_rule == "sign":  # the twin: negatives fine, the rest coarse (c = 0)
            fine = self.qdq(self.clip(x, None, 0.0, hint + "_fclip"), s, z - 128, hint=hint + "_f")
            coarse = self.op("Relu", [x], hint + "_c")
            return [fine, self.qdq(coarse, s * (1 << m), 127 - q.coarse_max, hint=hint + "_c")], 0.0
        c = q._coarse_start(m, z)
        t = q.payload_max - z
        k0 = (t >> m) + 1
        h = c + q.coarse_max if c else q.coarse_max
        big = s * (1 << m)
        if (k0 << m) + z > 255 or h > 255 or h < k0:
            raise ExportError(f"{hint}: V-2SF grid beyond int8 (bits {q.bits}, m {m}, z {z})")
        b = float(np.float32(big) * np.float32(k0))  # what DequantizeLinear makes of code k0

        def coarse_from(edge: float) -> str:  # S·min(max(round(x/S), edge/S), h)
            return self.qdq(self.clip(x, edge, None, hint + "_cclip"), big, 127 - h,
                            hint=hint + "_c")

        floor_free = floor >= -z * s  # the lower clip never bites
        lo = None if floor_free else -z * s
        if t + 1 == k0 << m:
            u = x if lo is None else self.clip(x, lo, None, hint + "_fclip")
            return [self.qdq(u, s, 127 - (t + 1), hint=hint + "_f"), coarse_from(b)], b
        if t == (k0 - 1) << m:  # A = S·(k0 − 1) is a coarse point, τ = A + S/2 its rounding edge
            a = float(np.float32(big) * np.float32(k0 - 1))
            u = x if lo is None else self.clip(x, lo, None, hint + "_fclip")
            return [self.qdq(u, s, 127 - t, hint=hint + "_f"), coarse_from(a)], a
        k = np.float32(2.0 ** 64)
        tau = np.nextafter(np.float32(q._threshold()), np.float32(-np.inf))
        low = self.clip(x, lo, s * t, hint + "_fclip")
        step = self.op("Add", [self.op("Mul", [x, self.const(k)]), self.const(-tau * k)])
        step = self.clip(step, 0.0, b - s * t, hint + "_step")
        fine = self.op("Add", [low, step], hint + "_fine")
        return [self.qdq(fine, s, z - 128, hint=hint + "_f"), coarse_from(b)], b

    def _pow2(self, x: str, q, hint: str) -> str:
        """O-2SF / PTF: per channel, s·2^e_c·(clip(round(x / (s·2^e_c)) + z_c, 0, 2^b − 1) − z_c).

        The LayerNorm that reads it is float, so no int8 tensor is needed here: the same values
        by float ops (Div, Round, Max, Min, Mul; Round is half-to-even like torch's), as
        ``per_channel_qdq=True`` writes them with a per-channel QuantizeLinear/DequantizeLinear
        pair (int8, zero points z_c − 128), which ONNX Runtime 1.32 runs ~10× slower."""
        sc, z = _steps(q)
        z = z.astype(np.int64)
        if self.per_channel_qdq:
            if q.bits != 8:
                raise ExportError(f"{hint}: {q.bits}-bit activations (int8 only)")
            return self.qdq(x, sc, (z - 128).astype(np.int8), axis=-1, hint=hint)
        return self._pow2_ops(x, [self.const(c, hint + "_s") for c in _pow2_bounds(q)], hint)

    def _pow2_ops(self, x: str, consts: list[str], hint: str) -> str:
        sc, lo, hi = consts
        k = self.op("Round", [self.op("Div", [x, sc])])
        return self.op("Mul", [self.op("Min", [self.op("Max", [k, lo]), hi]), sc], hint + "_dq")

    def _pow2_rows(self, x: str, first, rest, hint: str) -> str:
        """Token 0 under O-2SF ``first`` and the other tokens under ``rest``, in one pass each:
        the constants (L, C), row 0 ``first``'s and the others ``rest``'s, gathered from a
        (2, C) table by each token's row (no Slice and Concat of the tensor)."""
        rows = self.row_index(x)
        consts = [self.op("Gather", [self.const(np.stack([a, b]), hint + "_rows"), rows],
                          hint + "_rc", axis=0)
                  for a, b in zip(_pow2_bounds(first), _pow2_bounds(rest), strict=True)]
        return self._pow2_ops(x, consts, hint)

    def _log2(self, x: str, q, hint: str) -> str:
        e = int(q.exp_max)
        xc = self.op("Max", [x, self.const(2.0 ** (-e - 1))])
        k = self.op("Round", [self.op("Neg", [self.op("Div", [
            self.op("Log", [xc]), self.const(math.log(2.0))])])])
        k = self.op("Max", [k, self.const(0.0)])
        val = self.op("Pow", [self.const(2.0), self.op("Neg", [k])])
        dead = self.op("Greater", [k, self.const(float(e))])
        return self.op("Where", [dead, self.const(0.0), val], hint + "_log2")

    # -- layers --------------------------------------------------------------------------------
    def weight_codes(self, w: torch.Tensor, wq, hint: str) -> tuple[np.ndarray, np.ndarray]:
        """(in, out) int8 codes and the per-output-channel scales of a quantized weight."""
        if wq.bits > 8 or not wq.symmetric:
            raise ExportError(f"{hint}: weights must be symmetric, at most 8 bits")
        w = w.detach().float().reshape(w.shape[0], -1)
        ints = wq.integer(wq.codes(w)).to(torch.int8)
        return _np(ints.t().contiguous()), _np(wq.scale.float().reshape(-1))

    def weight(self, w: torch.Tensor, wq, hint: str, rows: np.ndarray | None = None,
               cols: slice = slice(None)) -> str:
        """(in, out) MatMul weight: int8 codes (stored as ``qdq`` says) and per-output-channel
        scales (``rows``: those input rows only; ``cols``: those outputs), or float.
        Written once per weight, rows and columns (token 0's product and the others' share
        it)."""
        key = (id(w), None if rows is None else rows.tobytes(), cols.start, cols.stop)
        if key not in self.weights:
            self.weights[key] = self._weight(w, wq, hint, rows, cols)
        return self.weights[key]

    def _weight(self, w: torch.Tensor, wq, hint: str, rows: np.ndarray | None,
                cols: slice) -> str:
        if not _on(wq):
            wt = _np(w.detach().float().reshape(w.shape[0], -1).t())[:, cols]
            return self.const(wt if rows is None else wt[rows], hint + "_w")
        ints, scales = self.weight_codes(w, wq, hint)
        ints, scales = ints[:, cols], scales[cols]
        return self.weight_dq(ints if rows is None else ints[rows], scales, hint, axis=1)

    def weight_dq(self, ints: np.ndarray, scales: np.ndarray, hint: str, axis: int) -> str:
        """DequantizeLinear of int8 weight codes with per-channel scales on ``axis``: zero point
        0, or (``u8u8``) the codes stored + 128 as uint8 with zero point 128 (see ``qdq``)."""
        wi = self.const(ints.astype(np.int16) + self.shift, hint + "_wq", self.code_type)
        ws = self.const(scales, hint + "_ws")
        wz = self.const(np.full(len(scales), self.shift), hint + "_wz", self.code_type)
        return self.op("DequantizeLinear", [wi, ws, wz], hint + "_wdq", axis=axis)

    def matmuls(self, parts: list[str], rhs: str, hint: str) -> str:
        return self.total([self.op("MatMul", [p, rhs], hint + "_mm") for p in parts], hint)

    def total(self, outs: list[str], hint: str) -> str:
        """The sum of ``outs`` (products of one output), Add by Add."""
        out = outs[0]
        for o in outs[1:]:
            out = self.op("Add", [out, o], hint + "_sum")
        return out

    def rows(self, x: str) -> tuple[str, str]:
        """Token 0 and the other tokens of (N, L, C): ``first_q``'s rows and ``input_q``'s."""
        return self.once(("rows", x), lambda: self._rows(x))

    def _rows(self, x: str) -> tuple[str, str]:
        one = self.const(np.asarray([1]), "i", np.int64)
        head = self.op("Slice", [x, self.const(np.asarray([0]), "i", np.int64), one, one])
        tail = self.op("Slice", [x, one, self.const(np.asarray([1 << 62]), "i", np.int64), one])
        return head, tail

    def row_index(self, x: str) -> str:
        """(L,) int64 of (N, L, C): 0 for token 0, 1 for the others (written once per graph:
        every tensor it is asked for has the sequence's L)."""
        if self._row_index is None:
            length = self.op("Gather", [self.op("Shape", [x]),
                                        self.const(np.asarray(1), "idx", np.int64)])
            tokens = self.op("Range", [self.const(np.asarray(0), "i", np.int64), length,
                                       self.const(np.asarray(1), "i", np.int64)])
            self._row_index = self.op("Min", [tokens, self.const(np.asarray(1), "i", np.int64)],
                                      "row_index")
        return self._row_index

    def product(self, x: str, q, m, hint: str, floor: float = -math.inf,
                cols: slice = slice(None)) -> tuple[str, np.ndarray | None]:
        """x̂·W for the quantizer ``q`` of ``x`` and the Linear ``m``'s weight, and a constant to
        add to it (or None).

        O-2SF (per-channel steps s·2^e_c and zero points z_c, BERT's qkv and fc1 inputs) has no
        per-tensor Q/DQ pair, but x̂_c = s·2^e_c·(p_c − z_c) with p_c ∈ [0, 2^b) its code: the
        channels of one exponent e share the step s·2^e, their codes p_c are
        QuantizeLinear(x_c + z_c·s·2^e) (the zero point moved into the input, a per-channel
        Add), so x̂·W = Σ_e s·2^e·(p_e·W_e) − Σ_c s·2^e_c·z_c·W_c: one int8 matmul per exponent
        over that exponent's rows (as many multiplications as one matmul in all), and a
        constant. At 8 bits only (the codes span the int8 range)."""
        groups = _exponent_groups(q, m, hint)
        if groups is not None:
            sc, z = _steps(q)
            zs = (z * sc).astype(np.float32)
            outs = []
            for exp, rows, masked in _layout(groups, len(sc)):
                if masked:  # every channel, the other groups' left out (value 0)
                    xg, shift = x, np.full(len(sc), LEFT_OUT, np.float32)
                    shift[rows] = zs[rows]
                else:
                    xg, shift = self.gathered(x, rows, hint + f"_e{exp}"), zs[rows]
                xg = self.o2sf_operand(("o2sf", x, id(q), exp), xg, shift, float(sc[rows[0]]),
                                       hint + f"_e{exp}")
                w = self.weight(m.weight, m.weight_q, hint, None if masked else rows, cols)
                outs.append(self.op("MatMul", [xg, w], hint + "_mm"))
            const = -((z * sc)[:, None] * self.weight_values(m, hint, cols)).sum(0)
            return self.total(outs, hint), const
        parts, offset = self.operands(x, q, hint + "_in", floor)
        w = self.weight(m.weight, m.weight_q, hint, cols=cols)
        if not offset:
            return self.matmuls(parts, w, hint), None
        return self.matmuls(parts, w, hint), -offset * self.weight_values(m, hint, cols).sum(0)

    def rows_product(self, x: str, q, m, hint: str, tail_q, floor: float = -math.inf,
                     cols: slice = slice(None)) -> tuple[str, np.ndarray | None]:
        """``product`` for a few rows (token 0 under its own quantizer ``q``) that reads the
        int8 weight rows of the other rows' product (under ``tail_q``): grouped by the other
        rows' O-2SF exponents (``_layout``), a second copy grouped by ``q``'s own would store
        qkv's and fc1's weights twice (5.9 MiB of MiniLM's file). Within one of those groups the
        channels of each of ``q``'s exponents are one int8 operand, the others left out (value
        0: code −128, zero point −128): one small int8 matmul per (group, exponent), exact as
        ``product``."""
        groups, own = _exponent_groups(tail_q, m, hint), _exponent_groups(q, m, hint)
        if groups is None or own is None:
            return self.product(x, q, m, hint, floor, cols)
        sc, z = _steps(q)
        zs = (z * sc).astype(np.float32)
        e = _np(q.exponent.reshape(-1)).astype(np.int64)
        outs = []
        for g, (_, rows, masked) in enumerate(_layout(groups, len(sc))):
            channels = np.arange(len(sc)) if masked else rows
            inside = np.isin(channels, rows)
            w = self.weight(m.weight, m.weight_q, hint, None if masked else rows, cols)
            xg = x if masked else self.gathered(x, rows, hint + f"_g{g}")
            for exp in np.unique(e[rows]):
                keep = inside & (e[channels] == exp)
                shift = np.where(keep, zs[channels], np.float32(LEFT_OUT)).astype(np.float32)
                xe = self.o2sf_operand(("o2sf_rows", x, id(q), g, exp), xg, shift,
                                       float(q.scale) * 2.0 ** int(exp), hint + f"_e{exp}")
                outs.append(self.op("MatMul", [xe, w], hint + "_mm"))
        const = -((z * sc)[:, None] * self.weight_values(m, hint, cols)).sum(0)
        return self.total(outs, hint), const

    def gathered(self, x: str, rows: np.ndarray, hint: str) -> str:
        """Channels ``rows`` of ``x`` (written once per tensor and rows)."""
        return self.once(("gather", x, rows.tobytes()), lambda: self.op(
            "Gather", [x, self.const(rows, hint + "_ch", np.int64)], hint, axis=-1))

    def o2sf_operand(self, key: tuple, x: str, shift: np.ndarray, step: float, hint: str) -> str:
        """One exponent's int8 operand of an O-2SF input: ``x + shift`` (its channels' zero
        points moved into the input, ``LEFT_OUT`` for the channels it leaves out) on the grid of
        ``step``, zero point −128; written once per ``key``."""
        return self.once(key, lambda: self.qdq(self.op("Add", [x, self.const(shift)]), step,
                                               -128, hint=hint))

    def weight_values(self, m, hint: str, cols: slice = slice(None)) -> np.ndarray:
        """(in, out) float64 values of the weight the graph multiplies by (for bias constants)."""
        if not _on(m.weight_q):
            return _np(m.weight.detach().double().reshape(m.weight.shape[0], -1).t())[:, cols]
        ints, scales = self.weight_codes(m.weight, m.weight_q, hint)
        return (ints.astype(np.float64) * scales.astype(np.float64))[:, cols]

    def linear(self, m, x: str, hint: str, floor: float = -math.inf,
               cols: slice = slice(None)) -> str:
        """A Linear (``cols``: those of its outputs): its input's quantized operand(s) times the
        int8 weight, then the bias. With a first-token quantizer, token 0 and the rest are two
        products, concatenated."""
        bias = np.zeros(m.weight.shape[0]) if m.bias is None else _np(m.bias.float())
        bias = bias.astype(np.float64)[cols]
        out_ch = len(bias)
        if _on(getattr(m, "first_q", None)):
            head, tail = self.rows(x)
            h, hc = self.rows_product(head, m.first_q, m, hint + "_0", m.input_q, floor, cols)
            t, tc = self.product(tail, m.input_q, m, hint, floor, cols)
            hc = np.zeros(out_ch) if hc is None else hc
            tc = np.zeros(out_ch) if tc is None else tc
            if np.any(hc != tc):  # the bias below carries the tail's constant
                h = self.op("Add", [h, self.const((hc - tc).astype(np.float32))], hint + "_0c")
            # Slices and a Concat: a Where of token 0's product into the full product's row
            # (one pass instead of two) ran ~1.3× slower than both in ONNX Runtime 1.32.
            out = self.op("Concat", [h, t], hint + "_rows", axis=1)
            bias = bias + tc
        else:
            out, const = self.product(x, m.input_q, m, hint, floor, cols)
            if const is not None:
                bias = bias + const
        if m.bias is not None or np.any(bias != 0):
            out = self.op("Add", [out, self.const(bias.astype(np.float32), hint + "_b")],
                          hint + "_ab")
        return out

    def attention_heads(self, m, x: str, hint: str, logit_bias: str | None = None) -> str:
        """A fused-qkv self-attention (timm's Attention, tsptq's QSelfAttention) up to its heads
        concatenated, (N, L, C); ``logit_bias`` (broadcast to the logits) added before Softmax."""
        heads = m.num_heads
        c = m.qkv.weight.shape[0] // 3
        d = c // heads
        # Kᵀ before its quantizer: Q → DQ → MatMul, the pattern ONNX Runtime fuses (a Transpose
        # between DQ and MatMul breaks it).
        if self.shift:
            # u8u8: q, k and v as three products of the one quantized input (qkv's weight in
            # three column blocks: the same int8 sums), each transposed to its heads: no
            # (N, L, 3C) transpose and split. DeiT-Small's qkv section alone ran ~10% faster in
            # ONNX Runtime 1.32, its whole graph within noise (−2% to +2%), MiniLM's ~4% (bit
            # for bit). Not for s8s8: ONNX Runtime then fuses none of the three into an int8
            # kernel (an int8 activation read by several MatMuls).
            q, k, v = (self.op("Transpose", [self.shape(self.linear(
                m.qkv, x, hint + "_qkv", cols=slice(j * c, (j + 1) * c)), [0, -1, heads, d])],
                perm=perm) for j, perm in enumerate(([0, 2, 1, 3], [0, 2, 3, 1], [0, 2, 1, 3])))
        else:
            qkv = self.op("Transpose", [self.shape(self.linear(m.qkv, x, hint + "_qkv"),
                                                   [0, -1, 3, heads, d])], perm=[2, 0, 3, 1, 4])
            q, k, v = (self.op("Gather", [qkv, self.const(np.asarray(j), "idx", np.int64)],
                               axis=0) for j in range(3))
            k = self.op("Transpose", [k], perm=[0, 1, 3, 2])
        q = self.op("Mul", [q, self.const(float(m.scale))])
        (qd,) = self.quantize(q, m.q_q, hint + "_q")
        (kt,) = self.quantize(k, m.k_q, hint + "_k")
        logits = self.op("MatMul", [qd, kt], hint + "_qk")
        if logit_bias is not None:
            logits = self.op("Add", [logits, logit_bias], hint + "_mask")
        a = self.op("Softmax", [logits], axis=-1)
        (vd,) = self.quantize(v, m.v_q, hint + "_v")
        parts, offset = self.operands(a, m.a_q, hint + "_a", floor=0.0)
        out = self.matmuls(parts, vd, hint + "_av")
        if offset:  # (Â + offset)·V − offset·(column sums of V)
            sums = self.op("ReduceSum", [vd, self.const(np.asarray([2]), "axes", np.int64)],
                           hint + "_vsum", keepdims=1)
            out = self.op("Sub", [out, self.op("Mul", [sums, self.const(np.float32(offset))])],
                          hint + "_av_off")
        return self.shape(self.op("Transpose", [out], perm=[0, 2, 1, 3]), [0, 0, c])

    def layernorm(self, m, x: str, hint: str) -> str:
        first = getattr(m, "first_q", None)
        if not _on(first):
            (xq,) = self.quantize(x, m.input_q, hint + "_in")
        elif (_on(m.input_q) and first.scheme == m.input_q.scheme == "pow2"
              and not self.per_channel_qdq):
            xq = self._pow2_rows(x, first, m.input_q, hint + "_in")
        else:
            head, tail = self.rows(x)
            (h,) = self.quantize(head, first, hint + "_in0")
            (t,) = self.quantize(tail, m.input_q, hint + "_in")
            xq = self.op("Concat", [h, t], hint + "_rows", axis=1)
        c = m.normalized_shape[0]
        w = np.ones(c) if m.weight is None else _np(m.weight.float())
        b = np.zeros(c) if m.bias is None else _np(m.bias.float())
        return self.op("LayerNormalization", [xq, self.const(w), self.const(b)], hint,
                       axis=-1, epsilon=float(m.eps))

    def gelu(self, x: str) -> str:
        e = self.op("Erf", [self.op("Div", [x, self.const(math.sqrt(2.0))])])
        half = self.op("Mul", [x, self.const(0.5)])
        return self.op("Mul", [half, self.op("Add", [e, self.const(1.0)])], "gelu")

    def shape(self, x: str, dims: list[int]) -> str:
        return self.op("Reshape", [x, self.const(np.asarray(dims), "shape", np.int64)])


