"""The fast QDQ graph of a timm VisionTransformer twin (ViT, DeiT, distilled DeiT)."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from .graph import finish_model
from .kernels import ExportError
from .qdq_builder import GELU_MIN, QdqGraph, _np, _on


def _layerscale(g: QdqGraph, ls, x: str) -> str:
    from timm.layers import LayerScale
    from torch import nn

    if isinstance(ls, nn.Identity):
        return x
    if isinstance(ls, LayerScale):
        return g.op("Mul", [x, g.const(_np(ls.gamma.float()))])
    raise ExportError(f"{type(ls).__name__} has no QDQ form")


def _attention(g: QdqGraph, m, x: str, hint: str) -> str:
    return g.linear(m.proj, g.attention_heads(m, x, hint), hint + "_proj")


def vit_to_qdq(model, per_channel_qdq: bool = False, operands: str = "u8u8") -> onnx.ModelProto:
    """The QDQ graph of a calibrated timm VisionTransformer twin (``per_channel_qdq``: O-2SF as
    a per-channel QuantizeLinear/DequantizeLinear pair rather than float ops; ``operands``: see
    ``QdqGraph.qdq``)."""
    from timm.models.vision_transformer import Block
    from torch import nn

    from quant.calibrate import param_quantizers

    g = QdqGraph(per_channel_qdq, operands)
    pe = model.patch_embed
    conv = pe.proj
    if not isinstance(pe.norm, nn.Identity) or not isinstance(model.norm_pre, nn.Identity):
        raise ExportError("patch_embed.norm / norm_pre have no QDQ form")
    (img,) = g.quantize("images", conv.input_q, "image")
    w = conv.weight.detach().float()
    wq = conv.weight_q
    if _on(wq):
        ints = wq.integer(wq.codes(w)).to(torch.int8)
        wdq = g.weight_dq(_np(ints), _np(wq.scale.float().reshape(-1)), "pw", axis=0)
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

    def embedding(names: list[str]) -> str:
        """(1, T, E) rows of quantized embeddings: int8 codes and one scale per channel
        (``DequantizeLinear``, axis 2) where their quantizers say so, else float."""
        values = np.concatenate([param(n) for n in names])[None]
        codes, scales = [], []
        for n in names:
            q = pq.get(n)
            if not (_on(q) and q.bits <= 8 and q.symmetric and q.scale.numel() == e):
                return g.const(values)
            p = model.get_parameter(n).detach().float()
            codes.append(_np(q.integer(q.codes(p))).reshape(-1, e))
            scales.append(_np(q.scale.float().reshape(-1)))
        if any(not np.array_equal(scales[0], sc) for sc in scales[1:]):
            return g.const(values)
        ints = np.concatenate(codes)[None].astype(np.int8)
        if not np.allclose(ints * scales[0], values, rtol=0, atol=1e-7):
            return g.const(values)
        return g.op("DequantizeLinear", [g.const(ints, "emb_q", np.int8), g.const(scales[0]),
                                         g.const(np.zeros(e), "emb_z", np.int8)], axis=2)

    prefix = [n for n in ("cls_token", "dist_token", "reg_token")
              if isinstance(getattr(model, n, None), nn.Parameter)]
    pos = embedding(["pos_embed"]) if getattr(model, "pos_embed", None) is not None else None
    if pos is not None and model.no_embed_class:
        x = g.op("Add", [x, pos])
    if prefix:
        toks = embedding(prefix)
        n = g.op("Slice", [g.op("Shape", [x]), g.const([0], "i", np.int64),
                           g.const([1], "i", np.int64)])
        shp = g.op("Concat", [n, g.const([len(prefix), e], "i", np.int64)], axis=0)
        x = g.op("Concat", [g.op("Expand", [toks, shp]), x], axis=1)
    if pos is not None and not model.no_embed_class:
        x = g.op("Add", [x, pos])

    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block:
            raise ExportError(f"block {i} ({type(blk).__name__}) has no QDQ form")
        h = g.layernorm(blk.norm1, x, f"b{i}_ln1")
        x = g.op("Add", [x, _layerscale(g, blk.ls1, _attention(g, blk.attn, h, f"b{i}_attn"))])
        h = g.layernorm(blk.norm2, x, f"b{i}_ln2")
        h = g.gelu(g.linear(blk.mlp.fc1, h, f"b{i}_fc1"))
        out = g.linear(blk.mlp.fc2, h, f"b{i}_fc2", floor=GELU_MIN)
        x = g.op("Add", [x, _layerscale(g, blk.ls2, out)])
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
    logits = g.linear(model.head, feat, "head")
    if hasattr(model, "head_dist"):  # distilled DeiT at inference: the mean of its two heads
        if model.global_pool != "token":
            raise ExportError(f"a distilled head with global_pool={model.global_pool!r}")
        dist = g.op("Gather", [x, g.const(np.asarray(1), "idx", np.int64)], axis=1)
        dist = g.linear(model.head_dist, dist, "head_dist")
        logits = g.op("Mul", [g.op("Add", [logits, dist]), g.const(0.5)], "heads_mean")
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="output_logits"))

    c = conv.weight.shape[1]
    graph = helper.make_graph(
        g.nodes, "tsptq_qdq", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                             ["N", c, "H", "W"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", None])],
        initializer=g.inits)
    return finish_model(graph, __doc__.splitlines()[0])


