"""One ONNX builder per integer operator kind (``quant.integer.program.RUNNERS``' twins).

``HANDLERS[kind](g, op, *inputs) -> Value``: each reads the operator's attributes and constants
and adds the nodes that compute what its runner computes; ``Value`` carries a tensor's name and
rank (the index shuffles need the rank; every other size is read from the graph at run time, so
the batch, the image size and the sequence length stay dynamic).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from quant.integer.program import Op

from .graph import (
    BOOL,
    F32,
    F64,
    I64,
    INT64_END,
    Graph,
    floor_div_pow2,
    half_of,
    npi,
    pow2,
    requantize,
    total,
)
from .kernels import (
    const_parts,
    encode,
    int_gelu,
    int_layernorm,
    int_softmax,
    operand,
    operands,
    shifted_matmul,
)


class Value(NamedTuple):
    name: str
    rank: int


Handler = Callable[..., Value]
HANDLERS: dict[str, Handler] = {}


def handler(kind: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        HANDLERS[kind] = fn
        return fn
    return register


def first_row(g: Graph, op: Op, x: Value, prefix: str,
              fn: Callable[[str, str], str]) -> str:
    """``Op.first_row``: ``fn`` over x, token 0 with the ``prefix + "0"`` constants when the op
    has them and x has at least two tokens (a condition on the run-time length: both are
    computed for row 0 and one is chosen), the other rows with ``prefix``'s."""
    if prefix + "0" not in op.attrs or x.rank < 2:
        return fn(x.name, prefix)
    rest = fn(x.name, prefix)
    head = fn(g.slice(x.name, 0, 1, 1), prefix + "0")
    many = g("Greater", g.dim(x.name, 1), 1)
    first = g("Where", many, head, g.slice(rest, 0, 1, 1))
    return g("Concat", first, g.slice(rest, 1, INT64_END, 1), axis=1)


def _dyadic(op: Op, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    d = op.dyadic(prefix)
    return npi(d.multiplier), npi(d.shift)


# -- the two ends ------------------------------------------------------------------------------
@handler("quantize_image")
def _quantize_image(g: Graph, op: Op, x: Value) -> Value:
    """round(x / s) + z, clamped, as torch does it in float32 (Round: half to even, as
    torch.round), then int64."""
    s = op.tensors["scale"].detach().cpu().numpy().astype(np.float32)
    z = np.asarray(op.tensors["z"].detach().cpu().numpy(), dtype=np.float32)
    q = g("Add", g("Round", g("Div", x.name, s)), z)
    q = g("Clip", q, np.array(0, np.float32), np.array((1 << op.attrs["bits"]) - 1, np.float32))
    return Value(g.cast(q, I64), x.rank)


@handler("dequantize")
def _dequantize(g: Graph, op: Op, x: Value) -> Value:
    scale = op.tensors["scale"].detach().cpu().numpy().astype(np.float64)
    return Value(g.cast(g("Mul", g.cast(x.name, F64), scale), F32), x.rank)


# -- matmuls -----------------------------------------------------------------------------------
@handler("patch_conv")
def _patch_conv(g: Graph, op: Op, codes: Value) -> Value:
    """Patches gathered by reshapes (stride = kernel), then one integer matmul per operand part;
    (N, C, H, W) codes to (N, tokens, out) accumulators."""
    ph, pw = op.attrs["patch"]
    w = npi(op.tensors["weight"])
    k = w.shape[1]
    x = codes.name
    n, h, wd = g.dim(x, 0), g.dim(x, 2), g.dim(x, 3)
    c = k // (ph * pw)
    parts = [p.plain(g) for p in operands(g, op.encoder("in"), x)]
    for p in parts:
        t = g.reshape(p.base, n, c, g("Div", h, ph), ph, g("Div", wd, pw), pw)
        t = g("Transpose", t, perm=[0, 2, 4, 1, 3, 5])
        p.base = g.reshape(t, 0, -1, k)
    acc = shifted_matmul(g, parts, const_parts(w.T), k, op.attrs.get("chunks", 1))
    return Value(g("Add", acc, npi(op.tensors["bias"])), 3)


@handler("linear")
def _linear(g: Graph, op: Op, codes: Value) -> Value:
    w = npi(op.tensors["weight"])

    def rows(t: str, prefix: str) -> str:
        acc = shifted_matmul(g, operands(g, op.encoder(prefix), t), const_parts(w.T),
                             w.shape[1], op.attrs.get("chunks", 1))
        return g("Add", acc, npi(op.tensors["bias0" if prefix == "in0" else "bias"]))

    return Value(first_row(g, op, codes, "in", rows), codes.rank)


@handler("matmul")
def _matmul(g: Graph, op: Op, a: Value, b: Value) -> Value:
    """Q·Kᵀ (``transpose_b``) and A·V on codes."""
    b_parts = [p.plain(g) for p in operands(g, op.encoder("b"), b.name)]
    if op.attrs.get("transpose_b"):
        perm = [*range(b.rank - 2), b.rank - 1, b.rank - 2]
        for p in b_parts:
            p.base = g("Transpose", p.base, perm=perm)
    acc = shifted_matmul(g, operands(g, op.encoder("a"), a.name), b_parts, None,
                         op.attrs.get("chunks", 1))
    return Value(acc, a.rank)


# -- requantizations and encoders --------------------------------------------------------------
def _requant_rows(g: Graph, op: Op, x: Value, prefix: str) -> str:
    return first_row(g, op, x, prefix, lambda t, p: requantize(g, t, *_dyadic(op, p)))


@handler("requant")
def _requant(g: Graph, op: Op, x: Value) -> Value:
    return Value(_requant_rows(g, op, x, "rq"), x.rank)


@handler("residual")
def _residual(g: Graph, op: Op, a: Value, b: Value) -> Value:
    return Value(g("Add", _requant_rows(g, op, a, "a"), _requant_rows(g, op, b, "b")), a.rank)


@handler("encode")
def _encode(g: Graph, op: Op, x: Value) -> Value:
    return Value(first_row(g, op, x, "enc", lambda t, p: encode(g, op.encoder(p), t)), x.rank)


@handler("layernorm")
def _layernorm(g: Graph, op: Op, codes: Value) -> Value:
    x = first_row(g, op, codes, "in", lambda t, p: operand(g, op.encoder(p), t))
    eps = npi(op.tensors["eps"])
    if "eps0" in op.tensors and codes.rank >= 3:
        # Token 0's ε where there are at least two tokens: (1, L, 1).
        idx = g("Range", 0, g("Squeeze", g.dim(x, 1)), 1)
        first = g("And", g("Equal", idx, 0), g("Greater", g.dim(x, 1), 1))
        row = g("Where", first, npi(op.tensors["eps0"]).reshape(()), eps.reshape(()))
        eps = g.reshape(row, 1, -1, 1)
    gamma = npi(op.tensors["gamma"])
    return Value(int_layernorm(g, x, gamma, op.tensors["beta"], eps, gamma.shape[-1]),
                 codes.rank)


@handler("softmax")
def _softmax(g: Graph, op: Op, logits: Value, *mask: Value) -> Value:
    keep = mask[0].name if mask and mask[0] is not None else None
    p = int_softmax(g, logits.name, *_dyadic(op, "exp"), keep)
    return Value(encode(g, op.encoder("enc"), p), logits.rank)


@handler("gelu")
def _gelu(g: Graph, op: Op, acc: Value) -> Value:
    x = Value(_requant_rows(g, op, acc, "rq"), acc.rank)
    y = Value(int_gelu(g, x.name), x.rank)
    return Value(first_row(g, op, y, "enc", lambda t, p: encode(g, op.encoder(p), t)), acc.rank)


# -- BERT's inputs -----------------------------------------------------------------------------
@handler("embed")
def _embed(g: Graph, op: Op, input_ids: Value, token_type_ids: Value | None = None) -> Value:
    """Three table lookups, each gathering its rows' dyadic multipliers too (constants of one
    row each: M, the rounding term and the divisor 2^N), summed as integers."""
    length = g("Squeeze", g.dim(input_ids.name, 1))
    positions = g("Unsqueeze", g("Range", 0, length, 1), np.array([0], np.int64))
    types = g("Mul", input_ids.name, 0) if token_type_ids is None else token_type_ids.name
    terms = []
    for table, ids in (("word", input_ids.name), ("position", positions),
                       ("type", types)):
        codes = g.const(npi(op.tensors[f"{table}.codes"]).astype(np.int8))

        def lookup(idx: str, prefix: str, table: str = table, codes: str = codes) -> str:
            m = npi(op.tensors[f"{table}.{prefix}.M"])
            s = npi(op.tensors[f"{table}.{prefix}.N"])
            col = np.array([-1], np.int64)

            def rows(c: np.ndarray) -> str:
                return g("Unsqueeze", g("Gather", c, idx, axis=0), col)

            prod = g("Mul", g.cast(g("Gather", codes, idx, axis=0), I64), rows(m))
            return floor_div_pow2(g, g("Add", prod, rows(half_of(s))), rows(pow2(s)))

        terms.append(first_row(g, op, Value(ids, 2), "rq", lookup))
    return Value(total(g, terms), 3)


@handler("key_mask")
def _key_mask(g: Graph, op: Op, attention_mask: Value) -> Value:
    """(N, L) 1/0 to the (N, 1, 1, L) bool keys the Softmax keeps."""
    keep = g.cast(attention_mask.name, BOOL)
    return Value(g("Unsqueeze", keep, np.array([1, 2], np.int64)), 4)


# -- index shuffles ----------------------------------------------------------------------------
@handler("slice_channels")
def _slice_channels(g: Graph, op: Op, x: Value) -> Value:
    return Value(g.slice(x.name, op.attrs["start"], op.attrs["stop"], -1), x.rank)


@handler("heads")
def _heads(g: Graph, op: Op, x: Value) -> Value:
    t = g.reshape(x.name, 0, 0, op.attrs["heads"], -1)
    return Value(g("Transpose", t, perm=[0, 2, 1, 3]), 4)


@handler("merge_heads")
def _merge_heads(g: Graph, op: Op, x: Value) -> Value:
    return Value(g.reshape(g("Transpose", x.name, perm=[0, 2, 1, 3]), 0, 0, -1), 3)


@handler("prepend")
def _prepend(g: Graph, op: Op, x: Value) -> Value:
    tokens = npi(op.tensors["tokens"])[None]
    batch = g("Expand", tokens, g.shape(g.dim(x.name, 0), 1, 1))
    return Value(g("Concat", batch, x.name, axis=1), x.rank)


@handler("add_const")
def _add_const(g: Graph, op: Op, x: Value) -> Value:
    return Value(g("Add", x.name, npi(op.tensors["value"])), x.rank)


@handler("take_token")
def _take_token(g: Graph, op: Op, x: Value) -> Value:
    return Value(g("Gather", x.name, np.array(op.attrs["index"], np.int64), axis=1), x.rank - 1)


@handler("sum_tokens")
def _sum_tokens(g: Graph, op: Op, x: Value) -> Value:
    rest = g.slice(x.name, op.attrs["start"], INT64_END, 1)
    return Value(g("ReduceSum", rest, np.array([1], np.int64), keepdims=0), x.rank - 1)


# -- Swin --------------------------------------------------------------------------------------
@handler("tokens_to_grid")
def _tokens_to_grid(g: Graph, op: Op, x: Value) -> Value:
    h, w = op.attrs["grid"]
    return Value(g.reshape(x.name, 0, h, w, -1), 4)


@handler("roll")
def _roll(g: Graph, op: Op, x: Value) -> Value:
    """torch.roll, one axis after the other: the last s entries moved to the front (|s| below
    the axis' length)."""
    t = x.name
    for shift, dim in zip(op.attrs["shifts"], op.attrs["dims"], strict=True):
        if shift == 0:
            continue
        cut = -shift  # s > 0: x[−s:] then x[:−s]; s < 0: x[|s|:] then x[:|s|]
        t = g("Concat", g.slice(t, cut, INT64_END, dim), g.slice(t, 0, cut, dim), axis=dim)
    return Value(t, x.rank)


@handler("window_partition")
def _window_partition(g: Graph, op: Op, x: Value) -> Value:
    wh, ww = op.attrs["window"]
    t = x.name
    n, h, w, c = (g.dim(t, i) for i in range(4))
    t = g.reshape(t, n, g("Div", h, wh), wh, g("Div", w, ww), ww, c)
    t = g("Transpose", t, perm=[0, 1, 3, 2, 4, 5])
    return Value(g.reshape(t, -1, wh * ww, c), 3)


@handler("window_reverse")
def _window_reverse(g: Graph, op: Op, x: Value) -> Value:
    wh, ww = op.attrs["window"]
    h, w = op.attrs["grid"]
    c = g.dim(x.name, 2)
    t = g.reshape(x.name, -1, h // wh, w // ww, wh, ww, c)
    t = g("Transpose", t, perm=[0, 1, 3, 2, 4, 5])
    return Value(g.reshape(t, -1, h, w, c), 4)


@handler("window_bias")
def _window_bias(g: Graph, op: Op, logits: Value) -> Value:
    bias = npi(op.tensors["bias"])
    out = g("Add", logits.name, bias)
    if "mask" in op.tensors:
        mask = npi(op.tensors["mask"])
        heads, length = bias.shape[0], bias.shape[-1]
        t = g.reshape(out, -1, mask.shape[0], heads, length, length)
        out = g.reshape(g("Add", t, mask[:, None]), -1, heads, length, length)
    return Value(out, logits.rank)


@handler("patch_merge")
def _patch_merge(g: Graph, op: Op, x: Value) -> Value:
    n, h, w, c = (g.dim(x.name, i) for i in range(4))
    h2, w2 = g("Div", h, 2), g("Div", w, 2)
    t = g.reshape(x.name, n, h2, 2, w2, 2, c)
    t = g("Transpose", t, perm=[0, 1, 3, 4, 2, 5])
    return Value(g.reshape(t, 0, h2, w2, -1), 4)


@handler("sum_spatial")
def _sum_spatial(g: Graph, op: Op, x: Value) -> Value:
    axes = np.arange(1, x.rank - 1, dtype=np.int64)
    return Value(g("ReduceSum", x.name, axes, keepdims=0), 2)
