"""The integer program of a timm VisionTransformer (ViT, DeiT, distilled DeiT).

Pre-norm blocks: the residual stream is an integer tensor on the grid of the LayerNorm that reads
it next (its input quantizer's base scale), so the LayerNorm's input codes are that stream
through O-2SF's per-channel rounding shifts; each residual add requantizes both terms to the next
LayerNorm's grid. Position embeddings, class and distillation tokens are integer constants on the
first grid. Mean pooling is an integer sum, its 1/N folded into the next multiplier.
"""

from __future__ import annotations

import torch
from timm.layers import LayerScale
from timm.models.vision_transformer import Block
from torch import nn

from ..calibrate import param_quantizers
from ..modules import QAttention, QConv2d, QLayerNorm, QuantModule, UnsupportedModelError
from .dyadic import dyadic, requantize
from .lower import Builder, Value, f64, image_codes, logits_out, stream_step, weight_integers
from .program import Program


def _gamma(ls: nn.Module):
    if isinstance(ls, LayerScale):
        return ls.gamma.detach().cpu()
    if isinstance(ls, nn.Identity):
        return None
    raise UnsupportedModelError(f"{type(ls).__name__} has no integer form")


def _plain(m: nn.Module, what: str) -> None:
    if not isinstance(m, nn.Identity):
        raise UnsupportedModelError(f"{what} ({type(m).__name__}) has no integer form yet")


def _const_on(param: torch.Tensor, q, step) -> torch.Tensor:
    """A quantized parameter (its integer codes times its per-channel step) on the grid
    ``step``, by the same dyadic rule as every requantization."""
    ints = q.integer(q.codes(param.detach().float())).to(torch.int64).cpu()
    return requantize(ints, dyadic(f64(q.scale).reshape(-1) / step))


def attention_core(b: Builder, m: QAttention, x: Value, where: str, tokens: int,
                   mask: str | None = None) -> Value:
    """Q, K, V to their codes (the 1/√d scale folded into Q's multiplier), Q·Kᵀ, the integer
    Softmax to A's codes (``mask``: the keys it keeps), A·V (fine and coarse matmuls), the
    heads merged: the input of the output projection."""
    qkv = b.linear(m.qkv, x, where + ".qkv")
    c = qkv.step.numel() // 3
    heads = []
    for j, (q, extra) in enumerate(((m.q_q, m.scale), (m.k_q, 1.0), (m.v_q, 1.0))):
        cut = slice(j * c, (j + 1) * c)
        part = b.emit("slice_channels", [qkv], {"start": j * c, "stop": (j + 1) * c})
        first = None if qkv.first is None else Value(
            "", qkv.first.step[cut] * extra, qkv.first.bound[cut] * extra)
        part = Value(part, qkv.step[cut] * extra, qkv.bound[cut] * extra, None, first)
        codes = b.encode(part, q, f"{where}.{'qkv'[j]}_q")
        h = b.emit("heads", [codes], {"heads": m.num_heads})
        heads.append(Value(h, codes.step, codes.bound, codes.encoder))
    qh, kh, vh = heads
    logits = b.matmul(qh, kh, c // m.num_heads, where + ".qk", transpose_b=True)
    a = b.softmax(logits, m.a_q, where + ".softmax", mask)
    av = b.matmul(a, vh, tokens, where + ".av", transpose_b=False, a_row_sum=1.0)
    return Value(b.emit("merge_heads", [av]), av.step, av.bound)


def attention(b: Builder, m: QAttention, x: Value, where: str, tokens: int) -> Value:
    """timm's attention: the core, then the output projection."""
    return b.linear(m.proj, attention_core(b, m, x, where, tokens), where + ".proj")


def lower_vit(model: nn.Module) -> Program:
    """The integer program of the calibrated twin ``model`` (a rewritten VisionTransformer)."""
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block:
            raise UnsupportedModelError(f"block {i} ({type(blk).__name__}): the integer setting "
                                        "takes pre-norm ViT blocks")
    if getattr(model, "dynamic_img_size", False):
        raise UnsupportedModelError("dynamic image sizes have no integer program")
    pool = model.global_pool
    if pool not in ("token", "avg"):
        raise UnsupportedModelError(f"global_pool={pool!r} has no integer form (token, avg)")
    pe = model.patch_embed
    conv = pe.proj
    if not isinstance(conv, QConv2d):
        raise UnsupportedModelError("the patch embedding must be a quantized convolution")
    if tuple(conv.stride) != tuple(conv.weight.shape[2:]) or any(conv.padding):
        raise UnsupportedModelError("the integer patch embedding needs stride = kernel, no "
                                    "padding")
    _plain(pe.norm, "patch_embed.norm")
    b = Builder()
    codes = image_codes(b, conv.input_q, "images")
    w_int, w_step = weight_integers(conv.weight_q, conv.weight.detach())
    acc = b.weighted("patch_conv", conv, codes, w_int, w_step, "patch_embed.proj",
                     {"patch": list(conv.weight.shape[2:])})

    norms = [m for blk in model.blocks for m in (blk.norm1, blk.norm2)]
    final_norm = model.norm if isinstance(model.norm, QLayerNorm) else None
    fc_norm = model.fc_norm if isinstance(model.fc_norm, QLayerNorm) else None
    if final_norm is None:
        _plain(model.norm, "norm")
    if fc_norm is None:
        _plain(model.fc_norm, "fc_norm")
    _plain(model.norm_pre, "norm_pre")
    readers = norms + [final_norm or fc_norm]
    if readers[-1] is None:
        raise UnsupportedModelError("the integer setting needs a final LayerNorm")
    step0 = stream_step(readers[0])
    x = b.requant(acc, step0, "patch_embed.to_stream")

    pq = param_quantizers(model)
    prefix = [n for n in ("cls_token", "dist_token", "reg_token")
              if isinstance(getattr(model, n, None), nn.Parameter)]
    consts = {n: _const_on(model.get_parameter(n), pq[n], step0).reshape(
        -1, model.embed_dim) for n in prefix + ["pos_embed"] if n in pq}
    missing = [n for n in prefix + ["pos_embed"] if getattr(model, n, None) is not None
               and n not in consts]
    if missing:
        raise UnsupportedModelError(f"{missing} must be quantized in the integer setting")
    bound = x.bound
    if model.no_embed_class and "pos_embed" in consts:
        x = Value(b.emit("add_const", [x], {}, {"value": consts["pos_embed"]}), step0, bound)
    if prefix:
        x = Value(b.emit("prepend", [x], {}, {"tokens": torch.cat([consts[n] for n in prefix])}),
                  step0, bound)
    if not model.no_embed_class and "pos_embed" in consts:
        x = Value(b.emit("add_const", [x], {}, {"value": consts["pos_embed"]}), step0, bound)
    pos_bound = float(consts["pos_embed"].abs().max()) if "pos_embed" in consts else 0.0
    tok_bound = max([float(consts[n].abs().max()) for n in prefix] + [0.0])
    x.bound = f64(float(bound.max()) + pos_bound + tok_bound)
    tokens = pe.num_patches + len(prefix)

    r = 1
    for i, blk in enumerate(model.blocks):
        where = f"blocks.{i}"
        h = b.layernorm(blk.norm1, x, where + ".norm1")
        out = attention(b, blk.attn, h, where + ".attn", tokens)
        x = b.residual(x, out, stream_step(readers[r]), where + ".add1", _gamma(blk.ls1))
        h = b.layernorm(blk.norm2, x, where + ".norm2")
        h = b.linear(blk.mlp.fc1, h, where + ".mlp.fc1")
        _plain(blk.mlp.norm, where + ".mlp.norm")
        g = b.gelu(h, blk.mlp.fc2.input_q, where + ".mlp.act")
        out = b.linear(blk.mlp.fc2, g, where + ".mlp.fc2", codes=g)
        x = b.residual(x, out, stream_step(readers[r + 1]), where + ".add2", _gamma(blk.ls2))
        r += 2

    n_prefix = model.num_prefix_tokens
    if final_norm is not None:
        x = b.layernorm(final_norm, x, "norm")
    heads = [("head", 0)] + ([("head_dist", 1)] if hasattr(model, "head_dist") else [])
    feats = []
    for _, index in heads:
        if pool == "token":
            feats.append(Value(b.emit("take_token", [x], {"index": index}), x.step, x.bound))
        else:
            n = tokens - n_prefix
            feats.append(Value(b.emit("sum_tokens", [x], {"start": n_prefix}), x.step / n,
                               x.bound * n))
    if fc_norm is not None:
        feats = [b.layernorm(fc_norm, f, "fc_norm") for f in feats]
    accs = []
    for (name, _), f in zip(heads, feats, strict=True):
        head = getattr(model, name)
        if not isinstance(head, QuantModule):
            raise UnsupportedModelError(f"{name} ({type(head).__name__}) has no integer form")
        accs.append(b.linear(head, f, name))
    if len(accs) == 1:
        out = accs[0]
    else:  # distilled: the mean of both heads, on a grid finer than either
        step = torch.minimum(accs[0].step.min(), accs[1].step.min()) / 16
        out = b.residual(accs[0], accs[1], step, "head_mean", torch.full((), 0.5))
        out = Value(out.name, out.step, out.bound)
        # the class head's term is halved too: fold 1/2 into the grid of the sum
        b.ops[-1].tensors.update(dyadic(accs[0].step / step / 2).tensors("a"))
    logits_out(b, out)
    return b.program(["images"], ["logits"])
