"""The integer program of a Hugging Face BERT encoder (all-MiniLM-L6-v2 is one).

Inputs are integers already: token ids, the attention mask, token types. Each embedding table
holds 8-bit codes with one scale per row, so a lookup also gathers that row's dyadic multiplier
to the first LayerNorm's grid; the three lookups add as integers. BERT is post-norm: each
LayerNorm's output is both the next block's input and the residual, so a residual add
requantizes the previous LayerNorm's output and the branch's accumulators to the grid of the
LayerNorm that reads their sum. [CLS] (token 0) carries its own quantizers in every LayerNorm and
Linear (``QuantConfig.first_token_scale``): its integers sit on grids of their own, and each
operator applies token 0's constants to row 0 (a fixed position: static constants, as on a
device). Padding keys are left out of the integer Softmax (its ``keep`` mask). The output is
the last hidden state, dequantized; the pooler (a tanh head that sentence embeddings do not read)
is not part of the program.
"""

from __future__ import annotations

import torch
from torch import nn

from ..calibrate import param_quantizers
from ..modules import QSelfAttention, UnsupportedModelError
from .dyadic import dyadic
from .lower import Builder, Value, f64, first_stream_step, logits_out, prefixed, stream_step
from .lower_vit import attention_core
from .program import Program

TABLES = {"word": "embeddings.word_embeddings.weight",
          "position": "embeddings.position_embeddings.weight",
          "type": "embeddings.token_type_embeddings.weight"}


def lower_bert(model: nn.Module) -> Program:
    emb = model.embeddings
    norm = emb.LayerNorm
    step, step0 = stream_step(norm), first_stream_step(norm)
    pq = param_quantizers(model)
    b = Builder()
    tensors, bound = {}, 0.0
    for table, pname in TABLES.items():
        q = pq.get(pname)
        if q is None or not q.enabled:
            raise UnsupportedModelError(f"{pname} must be quantized in the integer setting")
        w = model.get_parameter(pname).detach().float()
        codes = q.integer(q.codes(w)).to(torch.int64).cpu()
        rows = f64(q.scale).reshape(-1)
        tensors[f"{table}.codes"] = codes.to(torch.int8) if q.bits <= 8 else codes
        tensors.update(prefixed(dyadic(rows / step).tensors("rq"), table))
        ratio = rows / step
        if step0 is not None:
            tensors.update(prefixed(dyadic(rows / step0).tensors("rq0"), table))
            ratio = torch.maximum(ratio, rows / step0)
        bound += float((codes.abs().amax(1).double() * ratio).max()) + 1
    attrs = {"rq0": True} if step0 is not None else {}
    name = b.emit("embed", ["input_ids", "token_type_ids"], attrs, tensors,
                  {"layer": "embeddings"})
    first = None if step0 is None else Value("", step0, f64(bound))
    x = Value(name, step, f64(bound), None, first)
    keep = b.emit("key_mask", ["attention_mask"])
    h = b.layernorm(norm, x, "embeddings.LayerNorm")
    max_len = model.config.max_position_embeddings
    layers = list(model.encoder.layer)
    for i, layer in enumerate(layers):
        where = f"encoder.layer.{i}"
        att = layer.attention
        if not isinstance(att.self, QSelfAttention):
            raise UnsupportedModelError(f"{where}: attention has no integer form")
        ctx = attention_core(b, att.self, h, where + ".attention.self", max_len, keep)
        out = b.linear(att.output.dense, ctx, where + ".attention.output.dense")
        ln = att.output.LayerNorm
        x = b.residual(h, out, stream_step(ln), where + ".attention.add", None,
                       first_stream_step(ln))
        h1 = b.layernorm(ln, x, where + ".attention.output.LayerNorm")
        inter = b.linear(layer.intermediate.dense, h1, where + ".intermediate.dense")
        fc2 = layer.output.dense
        g = b.gelu(inter, fc2.input_q, where + ".intermediate.act", fc2.first_q)
        out = b.linear(fc2, g, where + ".output.dense", codes=g)
        ln = layer.output.LayerNorm
        x = b.residual(h1, out, stream_step(ln), where + ".output.add", None,
                       first_stream_step(ln))
        h = b.layernorm(ln, x, where + ".output.LayerNorm")
    logits_out(b, h, name="last_hidden_state")
    return b.program(["input_ids", "attention_mask", "token_type_ids"], ["last_hidden_state"])
