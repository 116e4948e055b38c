"""A small ONNX graph builder, and the exact integer arithmetic of the integer program on it.

Every integer of the program is an int64 tensor in the graph (uint8 only on the way into
``MatMulInteger``, bool for masks and flags), so each ONNX operator computes what the engine's
torch operator computes on int64. Two of the engine's operations have no direct ONNX twin:

* ``x >> s`` on signed int64 (an arithmetic shift, ``floor(x / 2^s)``): ONNX's BitShift takes
  unsigned types only and its integer Div truncates towards zero. With a constant shift s ≤ 62
  it is ``(x − Mod(x, 2^s)) / 2^s``: ONNX's integer Mod (fmod = 0) takes the divisor's sign, so
  the remainder is in [0, 2^s) and the division is exact. With a shift computed in the graph
  (LayerNorm's per-row shift, the exponential's integer part) it is a logical shift of ``x`` or
  of ``~x = −1 − x`` (both non-negative, as uint64), ``~`` undone afterwards: exact for every
  int64 and every shift in [0, 63].
* ``x << s`` is ``x · 2^s`` (int64 products wrap as torch's do) for constant shifts, and a uint64
  BitShift for shifts computed in the graph.

Integer Div is only ever applied to non-negative operands (where truncation is the floor the
engine's ``//`` computes).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

I64, U64, U8, BOOL = TensorProto.INT64, TensorProto.UINT64, TensorProto.UINT8, TensorProto.BOOL
F32, F64 = TensorProto.FLOAT, TensorProto.DOUBLE
INT64_END = np.iinfo(np.int64).max  # Slice's "to the end"


class Graph:
    """Nodes and initializers; ``g("Add", a, b)`` adds a node and returns its output's name.
    Inputs may be names, numpy arrays or Python ints (int64 scalars), made initializers."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.initializers: list = []
        self.scope = "g"
        self._count = 0
        self._small: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{self.scope}/{hint}_{self._count}"

    def const(self, value, dtype=None) -> str:
        if dtype is None and isinstance(value, int):
            dtype = np.int64
        arr = np.asarray(value, dtype=dtype)
        key = None
        if arr.size <= 16:
            key = (arr.dtype.str, arr.shape, arr.tobytes())
            if key in self._small:
                return self._small[key]
        name = f"c{len(self.initializers)}"
        self.initializers.append(numpy_helper.from_array(arr.copy(order="C"), name))
        if key is not None:
            self._small[key] = name
        return name

    def name_of(self, v) -> str:
        if v is None:
            return ""
        if isinstance(v, str):
            return v
        return self.const(v)

    def __call__(self, op_type: str, *inputs, outputs: int = 1, **attrs):
        names = [self.fresh(op_type) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, [self.name_of(i) for i in inputs], names,
                                           name=names[0], **attrs))
        return names[0] if outputs == 1 else names

    # -- shapes --------------------------------------------------------------------------------
    def dim(self, x: str, axis: int) -> str:
        """x.shape[axis] as a 1-element int64 tensor."""
        end = axis + 1
        return self("Shape", x, start=axis, end=end) if end != 0 else self("Shape", x,
                                                                             start=axis)

    def shape(self, *parts) -> str:
        """A shape from 1-element tensors (``dim``) and Python ints."""
        items = [p if isinstance(p, str) else np.array([p], dtype=np.int64) for p in parts]
        return self("Concat", *items, axis=0)

    def reshape(self, x: str, *parts) -> str:
        if all(isinstance(p, int) for p in parts):
            return self("Reshape", x, np.array(parts, dtype=np.int64))
        return self("Reshape", x, self.shape(*parts))

    def slice(self, x: str, start: int, end: int, axis: int) -> str:
        return self("Slice", x, np.array([start], np.int64), np.array([end], np.int64),
                    np.array([axis], np.int64))

    def cast(self, x: str, to: int) -> str:
        return self("Cast", x, to=to)


# -- exact integer arithmetic ------------------------------------------------------------------
def is_const(v) -> bool:
    return not isinstance(v, str)


def npi(v) -> np.ndarray:
    """A torch tensor or number as an int64 numpy array."""
    if hasattr(v, "detach"):
        v = v.detach().cpu().numpy()
    return np.asarray(v, dtype=np.int64)


def pow2(s: np.ndarray) -> np.ndarray:
    s = npi(s)
    if s.size and (s.min() < 0 or s.max() > 62):
        raise ValueError(f"shift out of [0, 62]: {s.min()}..{s.max()}")
    return np.left_shift(np.ones_like(s), s)


def floor_div_pow2(g: Graph, x: str, d) -> str:
    """floor(x / d) for d a power of two (constant or tensor, > 0): exact on negative x."""
    return g("Div", g("Sub", x, g("Mod", x, d)), d)


def _logical(g: Graph, x: str, s, direction: str) -> str:
    """BitShift of int64 x (taken as uint64) by s (int64 constant or tensor), back to int64."""
    su = g.const(npi(s).astype(np.uint64)) if is_const(s) else g.cast(s, U64)
    return g.cast(g("BitShift", g.cast(x, U64), su, direction=direction), I64)


def shr(g: Graph, x: str, s, nonneg: bool = False) -> str:
    """torch's ``x >> s`` on int64 (arithmetic: floor(x / 2^s)), s in [0, 63]."""
    if is_const(s):
        s = npi(s)
        if not s.any():
            return x
        if s.max() <= 62:
            d = pow2(s)
            return g("Div", x, d) if nonneg else floor_div_pow2(g, x, d)
    if nonneg:
        return _logical(g, x, s, "RIGHT")
    neg = g("Less", x, 0)
    inv = g("Where", neg, g("Sub", -1, x), x)  # ~x = −1 − x is non-negative where x < 0
    r = _logical(g, inv, s, "RIGHT")
    return g("Where", neg, g("Sub", -1, r), r)


def shl(g: Graph, x, s) -> str:
    """torch's ``x << s`` on int64 (two's complement, as the engine's)."""
    if is_const(s):
        s = npi(s)
        if not s.any():
            return g.name_of(x)
        if s.max() <= 62:
            return g("Mul", x, pow2(s))
    return _logical(g, g.name_of(x), s, "LEFT")


def half_of(s) -> np.ndarray:
    """``2^(s−1)`` where s > 0, else 0: the rounding term of a right shift by s."""
    s = npi(s)
    return np.where(s > 0, np.left_shift(np.ones_like(s), np.maximum(s - 1, 0)), 0)


def requantize(g: Graph, x: str, m, n) -> str:
    """``(x·M + 2^(N−1)) >> N`` (``quant.integer.dyadic.requantize``) with constant M, N."""
    m, n = npi(m), npi(n)
    prod = g("Mul", x, m)
    if half_of(n).any():
        prod = g("Add", prod, half_of(n))
    return shr(g, prod, n)


def rounding_shift(g: Graph, x: str, n) -> str:
    """x / 2^n rounded half up (``dyadic.rounding_shift``); n constant or a tensor."""
    if is_const(n):
        return shr(g, g("Add", x, half_of(n)) if half_of(n).any() else x, n)
    half = g("Where", g("Greater", n, 0), shl(g, 1, g("Max", g("Sub", n, 1), 0)), 0)
    return shr(g, g("Add", x, half), n)


def clamp(g: Graph, x: str, lo=None, hi=None) -> str:
    """torch's ``clamp(lo, hi)``: max with lo, then min with hi (each may be per channel)."""
    if lo is not None:
        x = g("Max", x, lo)
    if hi is not None:
        x = g("Min", x, hi)
    return x


def total(g: Graph, parts: Sequence[str]) -> str:
    out = parts[0]
    for p in parts[1:]:
        out = g("Add", out, p)
    return out


OPSET = 18  # BitwiseAnd, ReduceMax with axes as an input
IR_VERSION = 8  # opset 18's: loadable by ONNX Runtime >= 1.14


def unused_nodes(graph: onnx.GraphProto) -> list[str]:
    """Nodes no graph output depends on: work a runtime may still do (ONNX Runtime 1.32 ran
    DequantizeLinear nodes whose results nothing read)."""
    needed = {o.name for o in graph.output}
    unused = []
    for n in reversed(graph.node):  # nodes are in topological order
        if any(o in needed for o in n.output):
            needed.update(n.input)
        else:
            unused.append(n.name)
    return unused


def finish_model(graph: onnx.GraphProto, doc: str) -> onnx.ModelProto:
    """A checked model of ``graph`` at this package's opset and IR version, every node of which
    some output needs."""
    unused = unused_nodes(graph)
    if unused:  # a builder's bug, not the checkpoint's
        raise AssertionError(f"nodes no output needs: {unused[:5]}")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="tsptq", doc_string=doc)
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model
