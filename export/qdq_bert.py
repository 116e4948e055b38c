"""The fast QDQ graph of a Hugging Face BERT encoder twin (all-MiniLM-L6-v2 is one).

Inputs ``input_ids``, ``attention_mask`` and ``token_type_ids`` (int64, (N, L), right-padded as
BERT tokenizers pad), output ``last_hidden_state`` (N, L, C), as the integer graph's. Each
embedding table is stored as its int8 codes and one scale per row: a lookup gathers the codes
and the row's scale (never the whole table dequantized). Padding keys get −10^30 added to their
logits (Softmax gives them 0, as the integer Softmax's keep mask leaves them out). Post-norm
blocks: each LayerNorm's output is the next block's input and the residual. [CLS] (token 0)
takes its own quantizers in every LayerNorm and Linear (``QdqGraph.layernorm``,
``QdqGraph.linear``); BERT's qkv and fc1 inputs are O-2SF, multiplied one exponent at a time
(``QdqGraph.product``).
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from .graph import finish_model
from .kernels import ExportError
from .qdq_builder import GELU_MIN, QdqGraph, _np, _on

TABLES = {"word": ("embeddings.word_embeddings.weight", "input_ids"),
          "position": ("embeddings.position_embeddings.weight", None),
          "type": ("embeddings.token_type_embeddings.weight", "token_type_ids")}
MASKED = -1e30


def _lookup(g: QdqGraph, model, pname: str, ids: str, hint: str) -> str:
    """Rows ``ids`` of a quantized table: int8 codes times their row's scale."""
    from quant.calibrate import param_quantizers

    q = param_quantizers(model).get(pname)
    w = model.get_parameter(pname).detach().float()
    if not _on(q):
        return g.op("Gather", [g.const(_np(w), hint + "_table"), ids], hint, axis=0)
    if q.bits > 8 or not q.symmetric:
        raise ExportError(f"{pname}: embeddings must be symmetric, at most 8 bits")
    codes = q.integer(q.codes(w)).to(torch.int8)
    rows = g.op("Cast", [g.op("Gather", [g.const(_np(codes), hint + "_codes", np.int8), ids],
                              axis=0)], to=TensorProto.FLOAT)
    scale = g.op("Gather", [g.const(_np(q.scale.float().reshape(-1, 1)), hint + "_scales"), ids],
                 axis=0)
    return g.op("Mul", [rows, scale], hint)


def bert_to_qdq(model, per_channel_qdq: bool = False, operands: str = "u8u8"
                ) -> onnx.ModelProto:
    from quant.modules import QLayerNorm, QLinear, QSelfAttention

    g = QdqGraph(per_channel_qdq, operands)
    emb = model.embeddings
    if getattr(model.config, "position_embedding_type", "absolute") != "absolute":
        raise ExportError("BERT with relative position embeddings has no QDQ form")
    length = g.op("Gather", [g.op("Shape", ["input_ids"]),
                             g.const(np.asarray(1), "idx", np.int64)])
    positions = g.op("Range", [g.const(np.asarray(0), "i", np.int64), length,
                               g.const(np.asarray(1), "i", np.int64)], "positions")
    parts = [_lookup(g, model, pname, positions if ids is None else ids, f"emb_{table}")
             for table, (pname, ids) in TABLES.items()]
    x = g.op("Add", [g.op("Add", [parts[0], parts[2]]), parts[1]], "embeddings")
    h = g.layernorm(emb.LayerNorm, x, "emb_ln")
    # (N, 1, 1, L): 0 on real keys, −10^30 on padding
    mask = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    bias = g.op("Mul", [g.op("Sub", [g.const(1.0), mask]), g.const(MASKED)])
    bias = g.op("Unsqueeze", [bias, g.const(np.asarray([1, 2]), "axes", np.int64)], "key_bias")
    for i, layer in enumerate(model.encoder.layer):
        att, where = layer.attention, f"l{i}"
        modules = (att.self, att.output.dense, att.output.LayerNorm, layer.intermediate.dense,
                   layer.output.dense, layer.output.LayerNorm)
        kinds = (QSelfAttention, QLinear, QLayerNorm, QLinear, QLinear, QLayerNorm)
        if not all(isinstance(mod, k) for mod, k in zip(modules, kinds, strict=True)):
            raise ExportError(f"encoder.layer.{i} is not a quantized BERT layer")
        heads = g.attention_heads(att.self, h, where + "_attn", logit_bias=bias)
        out = g.linear(att.output.dense, heads, where + "_attn_out")
        h1 = g.layernorm(att.output.LayerNorm, g.op("Add", [h, out]), where + "_ln1")
        inter = g.gelu(g.linear(layer.intermediate.dense, h1, where + "_fc1"))
        out = g.linear(layer.output.dense, inter, where + "_fc2", floor=GELU_MIN)
        h = g.layernorm(layer.output.LayerNorm, g.op("Add", [h1, out]), where + "_ln2")
    g.nodes.append(helper.make_node("Identity", [h], ["last_hidden_state"], name="output"))
    ints = [helper.make_tensor_value_info(n, TensorProto.INT64, ["N", "L"])
            for n in ("input_ids", "attention_mask", "token_type_ids")]
    graph = helper.make_graph(
        g.nodes, "tsptq_qdq_bert", ints,
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT,
                                       ["N", "L", model.config.hidden_size])],
        initializer=g.inits)
    return finish_model(graph, "tsptq fast (QDQ) graph of a BERT encoder")
