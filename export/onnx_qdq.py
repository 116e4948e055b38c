"""The *fast graph* of an integer checkpoint: a QDQ ONNX model (S8S8) that ONNX Runtime fuses into
int8 matmuls, with float LayerNorm, Softmax and GELU between.

``export_qdq(checkpoint, out)`` (or ``export_onnx(checkpoint, out, form="qdq")``) builds it from
the checkpoint's content, not by tracing: the program says which family it is, the calibrated twin
(``quant.load_quantized``) gives each quantizer's real scale, zero point, shift and exponents and
the float weights, and the graph is written module by module, in the twin's order:

* a uniform quantizer of step s and zero point z: ``QuantizeLinear(s, z − 128)`` (int8) then
  ``DequantizeLinear``: its codes shifted by 128, the same values;
* weights: their integer codes as int8 initializers, one scale per output channel
  (``DequantizeLinear`` with ``axis=1`` in front of a ``MatMul``);
* O-2SF / PTF (``pow2``, the LayerNorm input): the fake quantization of scale s·2^e_c and zero
  point z_c in float ops (Div, Round, Max, Min, Mul), or (``per_channel_qdq=True``) a per-channel
  QuantizeLinear/DequantizeLinear pair of scale s·2^e_c and zero point z_c − 128;
* V-2SF: the region flag (x ≥ τ, or x ≥ 0 for the sign rule) splits x into a fine part (scale s,
  zero point z − 128, clipped to the fine payloads) and a coarse part (scale 2^m·s, clipped to the
  coarse payloads) by 0/1 masks, each its own Q/DQ pair and its own int8 matmul, the two
  products summed (the value not in a part's region is 0 there, exactly representable);
* Softmax's log2 quantizer (FQ-ViT) in float: 2^−round(−log2 a), 0 below 2^−(Q+½).

ONNX Runtime's QDQ transformer turns each DequantizeLinear(act) + DequantizeLinear(weight) ->
MatMul into an int8 kernel (MatMulIntegerToFloat, QLinearMatMul). It is the speed form: its float
LayerNorm, Softmax and GELU differ from the integer engine's kernels by their rounding, so its
logits are close to the engine's (same top-1 on ≥ 99.7 % of the digits test split), not equal.
Timm VisionTransformers (ViT, DeiT) only, for now.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from .graph import finish_model
from .kernels import ExportError


def _on(q) -> bool:
    return q is not None and bool(getattr(q, "enabled", True)) and bool(q.calibrated)


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


class _G:
    """Nodes and initializers, with fresh names."""

    def __init__(self, per_channel_qdq: bool = False) -> None:
        self.per_channel_qdq = per_channel_qdq
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def fresh(self, hint: str) -> str:
        self.n += 1
        return f"{hint}_{self.n}"

    def const(self, value, hint: str = "c", dtype=np.float32) -> str:
        name = self.fresh(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, kind: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        out = self.fresh(hint or kind.lower())
        self.nodes.append(helper.make_node(kind, inputs, [out], name=out, **attrs))
        return out

    # -- quantizers ----------------------------------------------------------------------------
    def qdq(self, x: str, scale, zero, axis: int | None = None, hint: str = "q") -> str:
        """QuantizeLinear then DequantizeLinear, int8, scale(s) and zero point(s) given."""
        s = self.const(np.asarray(scale, np.float32), hint + "_s")
        z = self.const(np.asarray(zero), hint + "_z", np.int8)
        kw = {} if axis is None else {"axis": axis}
        q = self.op("QuantizeLinear", [x, s, z], hint + "_q", **kw)
        return self.op("DequantizeLinear", [q, s, z], hint + "_dq", **kw)

    def quantize(self, x: str, q, hint: str, floor: float = -math.inf) -> list[str]:
        """The dequantized operand(s) of quantizer ``q``: one, or V-2SF's fine and coarse parts
        (whose sum is the fake-quantized value). ``floor``: a lower bound of ``x`` (0 after a
        Softmax), which can spare a clip."""
        if not _on(q):
            return [x]
        scheme = q.scheme
        if scheme == "uniform":
            if q.scale.numel() != 1:
                raise ExportError(f"{hint}: per-channel activation quantizer")
            return [self.qdq(x, float(q.scale), int(q.zero_point) - 128, hint=hint)]
        if scheme == "pow2":
            return [self._pow2(x, q, hint)]
        if scheme == "v2sf":
            return self._v2sf(x, q, hint, floor)
        if scheme == "log2":
            return [self._log2(x, q, hint)]
        raise ExportError(f"{hint}: no QDQ form for the {scheme} quantizer")

    def clip(self, x: str, lo: float | None, hi: float | None, hint: str) -> str:
        """Clip with scalar bounds (ONNX Runtime runs it ~2× faster than Min or Max)."""
        bounds = ["" if v is None else self.const(np.float32(v), hint + "_b") for v in (lo, hi)]
        return self.op("Clip", [x, *bounds], hint)

    def _v2sf(self, x: str, q, hint: str, floor: float = -math.inf) -> list[str]:
        """V-2SF as a fine and a coarse int8 operand whose sum is the fake-quantized value.

        With s the fine step, S = 2^m·s the coarse one, A = s·t the fine top (t = F − 1 − z),
        B = S·k0 the first coarse point above it (k0 = ⌊t/2^m⌋ + 1) and τ = (A + B)/2:
        x̂ = s·clip(round(x/s), −z, t) below τ and S·clip(round(x/S), k0, h) from τ up (h: the
        top coarse point in steps S; round(x/S) ≥ k0 there). Every Q/DQ pair shares its zero
        point (ONNX Runtime fuses only those into its uint8 × int8 kernels), and the clips are
        saturations of QuantizeLinear where they can be:

        * t + 1 = 2^m·k0 (post-Softmax: z = 0, t = 127 at 8 bits): the rounding itself lands A,
          τ and B right, so fine = Q(clip(x, ·, B)) (B from τ up, its lower clip the
          saturation of zero point z − 128) and coarse = Q(relu(x − B)) = S·(k − k0), its upper
          clip the saturation of zero point 127 − (h − k0): three passes; where the input is
          never negative (``floor`` ≥ 0: post-Softmax) and z = 0, the fine part's zero point
          127 − (t + 1) makes its clip a saturation too: two passes;
        * else: coarse = Q(clip(x, B, ·)) = S·min(k, h) (B below τ) and fine = clip(x, −zs, A) +
          clip(x·K − τ⁻·K, −B, −A) with K = 2^64: x̂ − B below τ, 0 from τ up (the second term a
          step at τ without Where, which ONNX Runtime runs ~8× slower than Clip): five passes.

        Where a float subtraction meets a rounding tie the result can differ from the twin's
        by one step (ties have measure zero). Needs B and the coarse top on int8 grids: the
        value rule at ≤ 8 bits; else ExportError."""
        if q.region_rule != "value":
            raise ExportError(f"{hint}: the V-2SF sign rule (twin) has no QDQ form")
        s, m, z = float(q.scale), int(q.shift), int(q.zero_point)
        c = q._coarse_start(m, z)
        t = q.payload_max - z
        k0 = (t >> m) + 1
        h = c + q.coarse_max if c else q.coarse_max
        big = s * (1 << m)
        if (k0 << m) + z > 255 or h > 255 or h < k0:
            raise ExportError(f"{hint}: V-2SF grid beyond int8 (bits {q.bits}, m {m}, z {z})")
        b = big * k0
        if t + 1 == k0 << m:
            if z == 0 and floor >= 0.0:  # both clips of the fine part are saturations
                fine = self.qdq(x, s, 127 - (t + 1), hint=hint + "_f")
            else:
                fine = self.qdq(self.clip(x, None, b, hint + "_fclip"), s, z - 128,
                                hint=hint + "_f")
            over = self.op("Relu", [self.op("Sub", [x, self.const(np.float32(b))])], hint + "_c")
            return [fine, self.qdq(over, big, 127 - (h - k0), hint=hint + "_c")]
        k = np.float32(2.0 ** 64)
        tau = np.nextafter(np.float32(q._threshold()), np.float32(-np.inf))
        low = self.clip(x, -z * s, s * t, hint + "_fclip")
        step = self.op("Add", [self.op("Mul", [x, self.const(k)]), self.const(-tau * k)])
        step = self.clip(step, -b, -s * t, hint + "_step")
        fine = self.op("Add", [low, step], hint + "_fine")
        coarse = self.clip(x, b, None, hint + "_cclip")
        return [self.qdq(fine, s, 127, hint=hint + "_f"),
                self.qdq(coarse, big, 127 - h, hint=hint + "_c")]

    def _pow2(self, x: str, q, hint: str) -> str:
        """O-2SF / PTF: per channel, s·2^e_c·(clip(round(x / (s·2^e_c)) + z_c, 0, 2^b − 1) − z_c).

        The LayerNorm that reads it is float, so no int8 tensor is needed here: the same values
        by float ops (Div, Round, Max, Min, Mul; Round is half-to-even like torch's), as
        ``per_channel_qdq=True`` writes them with a per-channel QuantizeLinear/DequantizeLinear
        pair (int8, zero points z_c − 128), which ONNX Runtime 1.32 runs ~10× slower."""
        sc = _np((q.scale.float() * torch.pow(2.0, q.exponent.float())).reshape(-1))
        z = _np(q.zero_point.reshape(-1)).astype(np.int64)
        if self.per_channel_qdq:
            if q.bits != 8:
                raise ExportError(f"{hint}: {q.bits}-bit activations (int8 only)")
            return self.qdq(x, sc, (z - 128).astype(np.int8), axis=-1, hint=hint)
        top = (1 << q.bits) - 1
        k = self.op("Round", [self.op("Div", [x, self.const(sc, hint + "_s")])])
        k = self.op("Min", [self.op("Max", [k, self.const(-z)]), self.const(top - z)])
        return self.op("Mul", [k, self.const(sc, hint + "_s")], hint + "_dq")

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
    def weight(self, w: torch.Tensor, wq, hint: str) -> str:
        """(in, out) MatMul weight: int8 codes and per-output-channel scales, or float."""
        w = w.detach().float().reshape(w.shape[0], -1)
        if not _on(wq):
            return self.const(_np(w.t()), hint + "_w")
        if wq.bits > 8 or not wq.symmetric:
            raise ExportError(f"{hint}: weights must be symmetric, at most 8 bits")
        ints = wq.integer(wq.codes(w)).to(torch.int8)
        wi = self.const(_np(ints.t().contiguous()), hint + "_wq", np.int8)
        ws = self.const(_np(wq.scale.float().reshape(-1)), hint + "_ws")
        wz = self.const(np.zeros(w.shape[0]), hint + "_wz", np.int8)
        return self.op("DequantizeLinear", [wi, ws, wz], hint + "_wdq", axis=1)

    def matmuls(self, parts: list[str], rhs: str, hint: str) -> str:
        outs = [self.op("MatMul", [p, rhs], hint + "_mm") for p in parts]
        out = outs[0]
        for o in outs[1:]:
            out = self.op("Add", [out, o], hint + "_sum")
        return out

    def linear(self, m, x: str, hint: str) -> str:
        if getattr(m, "first_q", None) is not None:
            raise ExportError(f"{hint}: first-token quantizers have no QDQ form yet")
        w = self.weight(m.weight, m.weight_q, hint)
        out = self.matmuls(self.quantize(x, m.input_q, hint + "_in"), w, hint)
        if m.bias is not None:
            out = self.op("Add", [out, self.const(_np(m.bias.float()), hint + "_b")], hint + "_ab")
        return out

    def layernorm(self, m, x: str, hint: str) -> str:
        if getattr(m, "first_q", None) is not None:
            raise ExportError(f"{hint}: first-token quantizers have no QDQ form yet")
        (xq,) = self.quantize(x, m.input_q, hint + "_in")
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


def _layerscale(g: _G, ls, x: str) -> str:
    from timm.layers import LayerScale
    from torch import nn

    if isinstance(ls, nn.Identity):
        return x
    if isinstance(ls, LayerScale):
        return g.op("Mul", [x, g.const(_np(ls.gamma.float()))])
    raise ExportError(f"{type(ls).__name__} has no QDQ form")


def _attention(g: _G, m, x: str, hint: str) -> str:
    heads = m.num_heads
    qkv = g.linear(m.qkv, x, hint + "_qkv")
    c = m.qkv.weight.shape[0] // 3
    d = c // heads
    qkv = g.op("Transpose", [g.shape(qkv, [0, -1, 3, heads, d])], perm=[2, 0, 3, 1, 4])
    q, k, v = (g.op("Gather", [qkv, g.const(np.asarray(j), "idx", np.int64)], axis=0)
               for j in range(3))
    q = g.op("Mul", [q, g.const(float(m.scale))])
    (qd,) = g.quantize(q, m.q_q, hint + "_q")
    # Kᵀ before its quantizer: Q → DQ → MatMul as ONNX Runtime fuses it (a Transpose between
    # turns K's codes into the slower uint8 × uint8 kernel).
    (kt,) = g.quantize(g.op("Transpose", [k], perm=[0, 1, 3, 2]), m.k_q, hint + "_k")
    logits = g.op("MatMul", [qd, kt], hint + "_qk")
    a = g.op("Softmax", [logits], axis=-1)
    (vd,) = g.quantize(v, m.v_q, hint + "_v")
    out = g.matmuls(g.quantize(a, m.a_q, hint + "_a", floor=0.0), vd, hint + "_av")
    out = g.shape(g.op("Transpose", [out], perm=[0, 2, 1, 3]), [0, 0, c])
    return g.linear(m.proj, out, hint + "_proj")


def vit_to_qdq(model, per_channel_qdq: bool = False) -> onnx.ModelProto:
    """The QDQ graph of a calibrated timm VisionTransformer twin (``per_channel_qdq``: O-2SF as
    a per-channel QuantizeLinear/DequantizeLinear pair rather than float ops)."""
    from timm.models.vision_transformer import Block
    from torch import nn

    from quant.calibrate import param_quantizers

    g = _G(per_channel_qdq)
    pe = model.patch_embed
    conv = pe.proj
    if not isinstance(pe.norm, nn.Identity) or not isinstance(model.norm_pre, nn.Identity):
        raise ExportError("patch_embed.norm / norm_pre have no QDQ form")
    (img,) = g.quantize("images", conv.input_q, "image")
    w = conv.weight.detach().float()
    wq = conv.weight_q
    if _on(wq):
        ints = wq.integer(wq.codes(w)).to(torch.int8)
        wdq = g.op("DequantizeLinear", [g.const(_np(ints), "pw_q", np.int8),
                                        g.const(_np(wq.scale.float().reshape(-1))),
                                        g.const(np.zeros(w.shape[0]), "pw_z", np.int8)],
                   axis=0)
    else:
        wdq = g.const(_np(w))
    kh, kw = w.shape[2:]
    inputs = [img, wdq] + ([] if conv.bias is None else [g.const(_np(conv.bias.float()))])
    x = g.op("Conv", inputs, "patch", kernel_shape=[kh, kw],
             strides=list(conv.stride), pads=[0, 0, 0, 0])
    e = model.embed_dim
    x = g.op("Transpose", [g.shape(x, [0, e, -1])], perm=[0, 2, 1])

    pq = param_quantizers(model)

    def param(name: str) -> np.ndarray:
        p = model.get_parameter(name).detach().float()
        q = pq.get(name)
        return _np(q.fake_quant(p) if _on(q) else p).reshape(-1, e)

    prefix = [n for n in ("cls_token", "dist_token", "reg_token")
              if isinstance(getattr(model, n, None), nn.Parameter)]
    pos = param("pos_embed") if getattr(model, "pos_embed", None) is not None else None
    if pos is not None and model.no_embed_class:
        x = g.op("Add", [x, g.const(pos[None])])
    if prefix:
        toks = g.const(np.concatenate([param(n) for n in prefix])[None])
        n = g.op("Slice", [g.op("Shape", [x]), g.const([0], "i", np.int64),
                           g.const([1], "i", np.int64)])
        shp = g.op("Concat", [n, g.const([len(prefix), e], "i", np.int64)], axis=0)
        x = g.op("Concat", [g.op("Expand", [toks, shp]), x], axis=1)
    if pos is not None and not model.no_embed_class:
        x = g.op("Add", [x, g.const(pos[None])])

    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block:
            raise ExportError(f"block {i} ({type(blk).__name__}) has no QDQ form")
        h = g.layernorm(blk.norm1, x, f"b{i}_ln1")
        x = g.op("Add", [x, _layerscale(g, blk.ls1, _attention(g, blk.attn, h, f"b{i}_attn"))])
        h = g.layernorm(blk.norm2, x, f"b{i}_ln2")
        h = g.gelu(g.linear(blk.mlp.fc1, h, f"b{i}_fc1"))
        x = g.op("Add", [x, _layerscale(g, blk.ls2, g.linear(blk.mlp.fc2, h, f"b{i}_fc2"))])
    if not isinstance(model.norm, nn.Identity):
        x = g.layernorm(model.norm, x, "norm")
    if model.global_pool == "token":
        feat = g.op("Gather", [x, g.const(np.asarray(0), "idx", np.int64)], axis=1)
    elif model.global_pool == "avg":
        tail = g.op("Slice", [x, g.const([model.num_prefix_tokens], "i", np.int64),
                              g.const([1 << 30], "i", np.int64), g.const([1], "i", np.int64)])
        feat = g.op("ReduceMean", [tail, g.const([1], "i", np.int64)], keepdims=0)
    else:
        raise ExportError(f"global_pool={model.global_pool!r} has no QDQ form")
    if not isinstance(model.fc_norm, nn.Identity):
        feat = g.layernorm(model.fc_norm, feat, "fc_norm")
    if hasattr(model, "head_dist"):
        raise ExportError("distilled heads have no QDQ form yet")
    logits = g.linear(model.head, feat, "head")
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="output_logits"))

    c = conv.weight.shape[1]
    graph = helper.make_graph(
        g.nodes, "tsptq_qdq", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                             ["N", c, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", None])],
        initializer=g.inits)
    return finish_model(graph, __doc__.splitlines()[0])


def qdq_model(checkpoint_path: str | os.PathLike, per_channel_qdq: bool = False
              ) -> onnx.ModelProto:
    from quant.checkpoint import load_quantized, read_program

    program = read_program(checkpoint_path)  # an integer checkpoint, or CheckpointError
    if "images" not in program.inputs or not any(op.kind == "patch_conv" for op in program.ops):
        raise ExportError("the QDQ form covers vision transformers only")
    qmodel = load_quantized(checkpoint_path)
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(qmodel.model, VisionTransformer):
        raise ExportError(f"{type(qmodel.model).__name__} has no QDQ form yet (ViT, DeiT only)")
    return vit_to_qdq(qmodel.model, per_channel_qdq)


def export_qdq(checkpoint_path: str | os.PathLike, out_path: str | os.PathLike,
               per_channel_qdq: bool = False) -> Path:
    """Write the QDQ (S8S8) fast graph of an integer checkpoint to ``out_path``."""
    model = qdq_model(checkpoint_path, per_channel_qdq)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(out))
    return out
