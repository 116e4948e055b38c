"""The integer program: a list of integer operators with their constants, and its interpreter.

One operator a runner (I-BERT's one module per integer operator, each carrying its scale
forward; here the scales were all folded into integer constants by the lowering, so the
program itself holds no float but the image quantizer's input scale and the logits' final
dequantization scale). Operators name their inputs and output; constants are int tensors keyed
by name. ``Program.to_state`` gives JSON-ready ops and a flat dict of tensors (what a checkpoint
stores), ``Program.from_state`` the inverse: the engine and the exporters read only that.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .dyadic import Dyadic, requantize
from .encoders import Encoder, encoder_from
from .gelu import int_gelu
from .layernorm import int_layernorm
from .matmul import int_matmul, shifted_matmul
from .softmax import int_softmax

FLOAT_OPS = frozenset({"quantize_image", "dequantize"})  # the program's two ends
INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool)


@dataclass
class Op:
    kind: str
    inputs: list[str]
    output: str
    attrs: dict = field(default_factory=dict)
    tensors: dict[str, Tensor] = field(default_factory=dict)
    # Lowering-time notes for reports (worst-case bits, multipliers); not needed to run.
    info: dict = field(default_factory=dict)

    def encoder(self, prefix: str) -> Encoder:
        cached = self.__dict__.setdefault("_encoders", {})
        if prefix not in cached:
            cut = len(prefix) + 1
            cached[prefix] = encoder_from(self.attrs[prefix], {
                k[cut:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")})
        return cached[prefix]

    def dyadic(self, prefix: str) -> Dyadic:
        return Dyadic.from_tensors(self.tensors, prefix)

    def first_row(self, x: Tensor, prefix: str, fn: Callable[[Tensor, str], Tensor]) -> Tensor:
        """``fn`` over ``x`` (N, L, …), token 0 with the ``prefix + "0"`` constants when the op
        has them (a first-token quantizer), the others with ``prefix``'s."""
        if prefix + "0" not in self.attrs or x.dim() < 2 or x.shape[1] < 2:
            return fn(x, prefix)
        return torch.cat([fn(x[:, :1], prefix + "0"), fn(x[:, 1:], prefix)], dim=1)


def _encode(op: Op, x: Tensor) -> Tensor:
    return op.first_row(x, "enc", lambda t, p: op.encoder(p).encode(t))


def _quantize_image(op: Op, x: Tensor) -> Tensor:
    s = op.tensors["scale"].to(x.dtype)
    z = op.tensors["z"]
    return (torch.round(x / s) + z).clamp_(0, (1 << op.attrs["bits"]) - 1).to(torch.int64)


def _patch_conv(op: Op, codes: Tensor) -> Tensor:
    """The patch embedding (stride = kernel, no padding): patches gathered by reshapes, then one
    integer matmul; (N, C, H, W) codes to (N, tokens, out) accumulators."""
    ph, pw = op.attrs["patch"]
    x = op.encoder("in").operand(codes)
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5)
    x = x.reshape(n, (h // ph) * (w // pw), c * ph * pw)
    acc = int_matmul(x, op.tensors["weight"].t(), op.attrs.get("chunks", 1))
    return acc + op.tensors["bias"]


def _linear(op: Op, codes: Tensor) -> Tensor:
    """Token 0 with its own quantizer is its own matmul (its V-2SF shift may differ)."""
    def rows(t: Tensor, prefix: str) -> Tensor:
        parts = op.encoder(prefix).operands(t)
        acc = shifted_matmul(parts, op.tensors["weight"].t(), op.attrs.get("chunks", 1))
        return acc + op.tensors["bias0" if prefix == "in0" else "bias"]

    return op.first_row(codes, "in", rows)


def _matmul(op: Op, a: Tensor, b: Tensor) -> Tensor:
    """Both attention matmuls on codes: Q·Kᵀ (``transpose_b``) and A·V."""
    rhs = op.encoder("b").operand(b)
    if op.attrs.get("transpose_b"):
        rhs = rhs.transpose(-2, -1)
    return shifted_matmul(op.encoder("a").operands(a), rhs, op.attrs.get("chunks", 1))


def _requant(op: Op, x: Tensor) -> Tensor:
    return op.first_row(x, "rq", lambda t, p: requantize(t, op.dyadic(p)))


def _residual(op: Op, a: Tensor, b: Tensor) -> Tensor:
    """Two integers to one grid, then their sum: every residual add of the stream."""
    return (op.first_row(a, "a", lambda t, p: requantize(t, op.dyadic(p)))
            + op.first_row(b, "b", lambda t, p: requantize(t, op.dyadic(p))))


def _layernorm(op: Op, codes: Tensor) -> Tensor:
    x = op.first_row(codes, "in", lambda t, p: op.encoder(p).operand(t))
    eps = op.tensors["eps"]
    if "eps0" in op.tensors and x.dim() >= 3 and x.shape[1] > 1:
        eps = torch.cat([op.tensors["eps0"].expand(1), eps.expand(x.shape[1] - 1)]).reshape(
            1, -1, 1)
    return int_layernorm(x, op.tensors["gamma"], op.tensors["beta"], eps)


def _softmax(op: Op, logits: Tensor, *mask: Tensor) -> Tensor:
    keep = mask[0] if mask else None
    p = int_softmax(logits, op.dyadic("exp"), keep)
    return op.encoder("enc").encode(p)


def _gelu(op: Op, acc: Tensor) -> Tensor:
    x = op.first_row(acc, "rq", lambda t, p: requantize(t, op.dyadic(p)))
    return _encode(op, int_gelu(x))


def _embed(op: Op, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
    """BERT's embeddings sum: each table holds integer codes with one scale per row, so each
    lookup gathers its rows' dyadic multipliers too and lands on the stream's grid (token 0 on
    its own quantizer's grid); the three lookups are then added as integers."""
    n, length = input_ids.shape
    positions = torch.arange(length, device=input_ids.device).expand(n, -1)
    types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
    out = None
    for table, ids in (("word", input_ids), ("position", positions), ("type", types)):
        def lookup(idx: Tensor, prefix: str, table: str = table) -> Tensor:
            m = op.tensors[f"{table}.{prefix}.M"][idx].unsqueeze(-1)
            s = op.tensors[f"{table}.{prefix}.N"][idx].unsqueeze(-1)
            return requantize(op.tensors[f"{table}.codes"][idx], Dyadic(m, s))
        term = op.first_row(ids, "rq", lookup)
        out = term if out is None else out + term
    return out


def _key_mask(op: Op, attention_mask: Tensor) -> Tensor:
    """(N, L) 1/0 mask of real tokens to the (N, 1, 1, L) keys the Softmax keeps (None: all)."""
    if attention_mask is None:
        return torch.ones((1, 1, 1, 1), dtype=torch.bool)
    return attention_mask.bool()[:, None, None, :]


def _slice_channels(op: Op, x: Tensor) -> Tensor:
    return x[..., op.attrs["start"]:op.attrs["stop"]]


def _heads(op: Op, x: Tensor) -> Tensor:
    n, l, c = x.shape
    h = op.attrs["heads"]
    return x.reshape(n, l, h, c // h).transpose(1, 2)


def _merge_heads(op: Op, x: Tensor) -> Tensor:
    n, h, l, d = x.shape
    return x.transpose(1, 2).reshape(n, l, h * d)


def _prepend(op: Op, x: Tensor) -> Tensor:
    t = op.tensors["tokens"]
    return torch.cat([t.unsqueeze(0).expand(x.shape[0], -1, -1), x], dim=1)


def _add_const(op: Op, x: Tensor) -> Tensor:
    return x + op.tensors["value"]


def _take_token(op: Op, x: Tensor) -> Tensor:
    return x[:, op.attrs["index"]]


def _sum_tokens(op: Op, x: Tensor) -> Tensor:
    return x[:, op.attrs["start"]:].sum(1)


# Swin: the NHWC stream's index shuffles, the window bias, the spatial sum.
def _tokens_to_grid(op: Op, x: Tensor) -> Tensor:
    """(N, H·W, C) to (N, H, W, C)."""
    h, w = op.attrs["grid"]
    return x.reshape(x.shape[0], h, w, x.shape[-1])


def _roll(op: Op, x: Tensor) -> Tensor:
    return torch.roll(x, shifts=tuple(op.attrs["shifts"]), dims=tuple(op.attrs["dims"]))


def _window_partition(op: Op, x: Tensor) -> Tensor:
    """(N, H, W, C) to (N·windows, wh·ww, C), windows in row-major order per image."""
    wh, ww = op.attrs["window"]
    n, h, w, c = x.shape
    x = x.reshape(n, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, c)


def _window_reverse(op: Op, x: Tensor) -> Tensor:
    """``_window_partition``'s inverse: (N·windows, wh·ww, C) to (N, H, W, C)."""
    wh, ww = op.attrs["window"]
    h, w = op.attrs["grid"]
    c = x.shape[-1]
    x = x.reshape(-1, h // wh, w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def _window_bias(op: Op, logits: Tensor) -> Tensor:
    """Integer logits (N·windows, heads, L, L) plus the integer relative position bias
    (heads, L, L) and, for shifted windows, the integer mask of each window (windows, L, L)."""
    out = logits + op.tensors["bias"]
    if "mask" in op.tensors:
        mask = op.tensors["mask"]
        out = (out.reshape(-1, mask.shape[0], *out.shape[1:]) + mask.unsqueeze(1)).reshape(
            out.shape)
    return out


def _patch_merge(op: Op, x: Tensor) -> Tensor:
    """Each 2×2 neighbourhood of (N, H, W, C) to 4·C channels, in timm's order."""
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(
        n, h // 2, w // 2, 4 * c)


def _sum_spatial(op: Op, x: Tensor) -> Tensor:
    """(N, …, C) summed over every axis between the first and the last (mean pooling: the
    1/count is folded into the next multiplier)."""
    return x.to(torch.int64).sum(tuple(range(1, x.dim() - 1)))


def _dequantize(op: Op, x: Tensor) -> Tensor:
    return (x.to(torch.float64) * op.tensors["scale"].to(torch.float64)).to(torch.float32)


RUNNERS: dict[str, Callable[..., Tensor]] = {
    "quantize_image": _quantize_image, "patch_conv": _patch_conv, "linear": _linear,
    "matmul": _matmul, "requant": _requant, "residual": _residual, "layernorm": _layernorm,
    "softmax": _softmax, "gelu": _gelu, "encode": _encode, "slice_channels": _slice_channels,
    "heads": _heads, "merge_heads": _merge_heads, "prepend": _prepend, "add_const": _add_const,
    "take_token": _take_token, "sum_tokens": _sum_tokens, "dequantize": _dequantize,
    "tokens_to_grid": _tokens_to_grid, "roll": _roll, "window_partition": _window_partition,
    "window_reverse": _window_reverse, "window_bias": _window_bias,
    "patch_merge": _patch_merge, "sum_spatial": _sum_spatial,
    "embed": _embed, "key_mask": _key_mask,
}


class FloatLeak(AssertionError):
    """An operator between the program's two ends produced a float tensor."""


@dataclass
class Program:
    ops: list[Op]
    inputs: list[str]
    outputs: list[str]
    info: dict = field(default_factory=dict)

    def run(self, *args: Tensor, trace: Callable[[Op, Tensor], None] | None = None,
            **kwargs: Tensor) -> Tensor | tuple[Tensor, ...]:
        if len(args) == 1 and not kwargs and isinstance(args[0], Mapping):
            args, kwargs = (), dict(args[0])  # a text batch, as its tokenizer returned it
        env = dict(zip(self.inputs, args, strict=False))
        env.update(kwargs)
        for op in self.ops:
            out = RUNNERS[op.kind](op, *(env.get(i) for i in op.inputs))
            if op.kind not in FLOAT_OPS and out.dtype not in INTEGER_DTYPES:
                raise FloatLeak(f"{op.kind} -> {op.output} produced {out.dtype}")
            if trace is not None:
                trace(op, out)
            env[op.output] = out
        outs = tuple(env[o] for o in self.outputs)
        return outs[0] if len(outs) == 1 else outs

    __call__ = run

    def forward(self, *args, **kwargs):
        """The model's own calling convention: an image batch, or a text batch (a mapping)."""
        return self.run(*args, **kwargs)

    def to_state(self) -> tuple[dict, dict[str, Tensor]]:
        ops, tensors = [], {}
        for i, op in enumerate(self.ops):
            ops.append({"kind": op.kind, "inputs": op.inputs, "output": op.output,
                        "attrs": op.attrs, "tensors": sorted(op.tensors)})
            for k, v in op.tensors.items():
                tensors[f"{i}.{k}"] = v.detach().cpu().clone().contiguous()
        return {"ops": ops, "inputs": self.inputs, "outputs": self.outputs}, tensors

    @classmethod
    def from_state(cls, spec: dict, tensors: dict[str, Tensor]) -> Program:
        ops = []
        for i, o in enumerate(spec["ops"]):
            if o["kind"] not in RUNNERS:
                raise ValueError(f"unknown integer operator {o['kind']!r}")
            ops.append(Op(o["kind"], list(o["inputs"]), o["output"], dict(o["attrs"]),
                          {k: tensors[f"{i}.{k}"] for k in o["tensors"]}))
        return cls(ops, list(spec["inputs"]), list(spec["outputs"]))

    def report(self) -> list[dict]:
        """Per operator: its multipliers and shifts and its worst-case accumulator bits."""
        return [{"op": op.kind, "output": op.output, **op.info} for op in self.ops if op.info]
