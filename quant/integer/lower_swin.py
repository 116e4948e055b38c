"""The integer program of a timm SwinTransformer.

The stream is NHWC, as in timm: (N, H, W, C) integers on the grid of the LayerNorm that reads it
next (its input quantizer's base scale), every residual add requantizing both terms to that
grid. The patch embedding's LayerNorm and each PatchMerging's reduction become the stream by a
requantization. Inside a block the LayerNorm's output is rolled (shifted windows) and cut into
windows by index shuffles only; Q·Kᵀ's integer logits get the relative position bias and the
shifted-window mask added as integer constants on the logits' grid (s_q·s_k), then the integer
Softmax. The head's average pool is an integer sum over H, W, its 1/(H·W) folded into the fc's
input multiplier.
"""

from __future__ import annotations

import math

import torch
from timm.layers import DropPath
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock
from torch import Tensor, nn

from ..modules import (
    QConv2d,
    QLayerNorm,
    QLinear,
    QuantModule,
    QWindowAttention,
    UnsupportedModelError,
)
from .dyadic import MAX_INPUT_BITS, bits_of
from .lower import (
    LOG2E,
    AccumulatorOverflowError,
    Builder,
    Value,
    f64,
    image_codes,
    logits_out,
    stream_step,
    weight_integers,
)
from .matmul import INT32_MAX
from .program import Program


def _plain(m: nn.Module, what: str) -> None:
    """Modules that compute nothing at inference (eval mode)."""
    if not isinstance(m, (nn.Identity, nn.Dropout, DropPath)):
        raise UnsupportedModelError(f"{what} ({type(m).__name__}) has no integer form yet")


def _same(v: Value, name: str) -> Value:
    """A value whose integers were moved, not changed: same step and bound."""
    return Value(name, v.step, v.bound)


def _tiled(t: Tensor, times: int) -> Tensor:
    return t.repeat(times) if t.numel() > 1 else t


def _bias_integers(m: QWindowAttention, step: float, where: str) -> Tensor:
    """The relative position bias (heads, N, N) on the logits' grid, as int32."""
    n = m.window_area
    table = m.relative_position_bias_table.detach().cpu()
    bias = table[m.relative_position_index.view(-1).cpu()].view(n, n, -1).permute(2, 0, 1)
    ints = torch.round(f64(bias) / step)
    if float(ints.abs().max()) > INT32_MAX:
        raise AccumulatorOverflowError(f"{where}: the relative position bias does not fit int32 "
                                       "on the logits' grid")
    return ints.to(torch.int32).contiguous()


def _mask_integers(mask: Tensor, step: float, logit_bound: float, where: str) -> Tensor:
    """The shifted-window mask (windows, N, N; 0 or a large negative value) on the logits' grid,
    as int32. Its value is kept when the biased logits then still fit int32; otherwise its
    magnitude is clamped to what the room allows, which is still enough for every masked
    position's exponential to be exactly 0 (a difference of 48 in base-2 exponent: ``exp2``'s
    MAX_SHIFT), where the float model's e^-100 is 0 after the post-Softmax quantizer too."""
    ints = torch.round(f64(mask) / step)
    low = float(-ints.min()) if ints.numel() else 0.0
    if low <= 0:
        return ints.to(torch.int32)
    room = INT32_MAX - math.ceil(logit_bound)
    if low > room:
        need = 2 * math.ceil(logit_bound) + math.ceil(50 / (step * LOG2E))
        if need > room:
            raise AccumulatorOverflowError(f"{where}: the shifted-window mask does not fit int32 "
                                           "on the logits' grid")
        ints = ints.clamp_min(-room)
    return ints.to(torch.int32).contiguous()


def window_attention(b: Builder, m: QWindowAttention, x: Value, mask: Tensor | None,
                     where: str) -> Value:
    """Windowed attention on (N·windows, area, C) integers: Q, K, V to their codes (1/√d folded
    into Q's multiplier), Q·Kᵀ, the integer bias and mask, the integer Softmax to A's codes,
    A·V, heads merged, the projection (accumulators)."""
    qkv = b.linear(m.qkv, x, where + ".qkv")
    c = qkv.step.numel() // 3
    heads = []
    for j, (q, extra) in enumerate(((m.q_q, m.scale), (m.k_q, 1.0), (m.v_q, 1.0))):
        part = b.emit("slice_channels", [qkv], {"start": j * c, "stop": (j + 1) * c})
        part = Value(part, qkv.step[j * c:(j + 1) * c] * extra,
                     qkv.bound[j * c:(j + 1) * c] * extra)
        codes = b.encode(part, q, f"{where}.{'qkv'[j]}_q")
        h = b.emit("heads", [codes], {"heads": m.num_heads})
        heads.append(Value(h, codes.step, codes.bound, codes.encoder))
    qh, kh, vh = heads
    logits = b.matmul(qh, kh, c // m.num_heads, where + ".qk", transpose_b=True)
    step = float(logits.step)
    bias = _bias_integers(m, step, where + ".relative_position_bias")
    tensors = {"bias": bias}
    bound = float(logits.bound.max()) + float(bias.abs().max())
    info = {"layer": where + ".bias", "bias_bits": bits_of(float(bias.abs().max()))}
    if mask is not None:
        mask_int = _mask_integers(mask.detach().cpu(), step, bound, where + ".mask")
        tensors["mask"] = mask_int
        bound += float(mask_int.abs().max())
        info["mask_min"] = int(mask_int.min())
    info["worst_case_bits"] = bits_of(bound)
    biased = Value(b.emit("window_bias", [logits], {}, tensors, info), logits.step, f64(bound))
    a = b.softmax(biased, m.a_q, where + ".softmax")
    av = b.matmul(a, vh, m.window_area, where + ".av", transpose_b=False, a_row_sum=1.0)
    merged = _same(av, b.emit("merge_heads", [av]))
    return b.linear(m.proj, merged, where + ".proj")


def _check_block(blk: nn.Module, grid: tuple[int, int], where: str) -> None:
    if type(blk) is not SwinTransformerBlock:
        raise UnsupportedModelError(f"{where} ({type(blk).__name__}): the integer setting takes "
                                    "timm's SwinTransformerBlock")
    if not isinstance(blk.attn, QWindowAttention):
        raise UnsupportedModelError(f"{where}.attn must be a quantized window attention")
    if getattr(blk, "dynamic_mask", False):
        raise UnsupportedModelError(f"{where}: dynamic masks (strict_img_size=False) have no "
                                    "integer program")
    if tuple(blk.input_resolution) != grid:
        raise UnsupportedModelError(f"{where}: input resolution {tuple(blk.input_resolution)} "
                                    f"is not the stream's {grid}")
    ws = tuple(blk.window_size)
    if grid[0] % ws[0] or grid[1] % ws[1]:
        raise UnsupportedModelError(f"{where}: a {grid} grid is not a whole number of {ws} "
                                    "windows (padded windows have no integer form yet)")
    for part in ("drop_path1", "drop_path2"):
        _plain(getattr(blk, part), f"{where}.{part}")
    _plain(blk.mlp.norm, where + ".mlp.norm")
    if not isinstance(blk.mlp.act, nn.GELU):
        raise UnsupportedModelError(f"{where}.mlp.act ({type(blk.mlp.act).__name__}) has no "
                                    "integer form")


def block(b: Builder, blk: SwinTransformerBlock, x: Value, grid: tuple[int, int],
          steps: tuple[Tensor, Tensor], where: str) -> Value:
    """One pre-norm block on the stream ``x``; ``steps``: the grids of the stream after its two
    residual adds (the LayerNorms that read it next)."""
    _check_block(blk, grid, where)
    ws, shift = tuple(blk.window_size), tuple(blk.shift_size)
    h = b.layernorm(blk.norm1, x, where + ".norm1")
    if any(shift):
        h = _same(h, b.emit("roll", [h], {"shifts": [-shift[0], -shift[1]], "dims": [1, 2]}))
    h = _same(h, b.emit("window_partition", [h], {"window": list(ws)}))
    mask = blk.attn_mask if any(shift) else None
    out = window_attention(b, blk.attn, h, mask, where + ".attn")
    out = _same(out, b.emit("window_reverse", [out], {"window": list(ws), "grid": list(grid)}))
    if any(shift):
        out = _same(out, b.emit("roll", [out], {"shifts": list(shift), "dims": [1, 2]}))
    x = b.residual(x, out, steps[0], where + ".add1")
    h = b.layernorm(blk.norm2, x, where + ".norm2")
    h = b.linear(blk.mlp.fc1, h, where + ".mlp.fc1")
    g = b.gelu(h, blk.mlp.fc2.input_q, where + ".mlp.act")
    out = b.linear(blk.mlp.fc2, g, where + ".mlp.fc2", codes=g)
    return b.residual(x, out, steps[1], where + ".add2")


def merge(b: Builder, ds: PatchMerging, x: Value, grid: tuple[int, int], step: Tensor,
          where: str) -> Value:
    """PatchMerging: each 2×2 neighbourhood gathered to 4C channels (timm's order), its
    LayerNorm, the reduction (no bias), requantized to the stream's next grid."""
    if grid[0] % 2 or grid[1] % 2:
        raise UnsupportedModelError(f"{where}: an odd {grid} grid is padded; that has no "
                                    "integer form yet")
    if not isinstance(ds.norm, QLayerNorm) or not isinstance(ds.reduction, QLinear):
        raise UnsupportedModelError(f"{where}: the integer setting needs its LayerNorm and "
                                    "reduction quantized")
    g = b.emit("patch_merge", [x])
    g = Value(g, _tiled(x.step, 4), _tiled(x.bound, 4))
    h = b.layernorm(ds.norm, g, where + ".norm")
    acc = b.linear(ds.reduction, h, where + ".reduction")
    return b.requant(acc, step, where + ".to_stream")


def _readers(model: nn.Module) -> list[QLayerNorm]:
    """The LayerNorms that read the stream, in order (each stream value's grid)."""
    out = []
    for stage in model.layers:
        if isinstance(stage.downsample, PatchMerging):
            out.append(stage.downsample.norm)
        out += [m for blk in stage.blocks for m in (blk.norm1, blk.norm2)]
    if not isinstance(model.norm, QLayerNorm):
        raise UnsupportedModelError("the integer setting needs Swin's final LayerNorm")
    out.append(model.norm)
    for m in out:
        if not isinstance(m, QLayerNorm):
            raise UnsupportedModelError(f"{type(m).__name__} reads the stream: the integer "
                                        "setting quantizes every LayerNorm")
    return out


def _pool_and_head(b: Builder, model: nn.Module, x: Value, grid: tuple[int, int]) -> Value:
    head = model.head
    pool = getattr(head.global_pool, "pool_type", None)
    if pool != "avg":
        raise UnsupportedModelError(f"global_pool={pool!r} has no integer form (avg)")
    _plain(head.drop, "head.drop")
    _plain(head.flatten, "head.flatten")
    if not isinstance(head.fc, QuantModule):
        raise UnsupportedModelError(f"head.fc ({type(head.fc).__name__}) has no integer form")
    n = grid[0] * grid[1]
    # The sum's worst case must stay a requantization input: a LayerNorm's output can reach
    # √C·2^14·max|γ| units, times H·W. Drop low bits first when it would not.
    over = bits_of(float(x.bound.max()) * n) - MAX_INPUT_BITS
    if over > 0:
        x = b.requant(x, x.step * 2.0 ** over, "head.pool_grid")
    feat = Value(b.emit("sum_spatial", [x]), x.step / n, x.bound * n)
    return b.linear(head.fc, feat, "head.fc")


def lower_swin(model: nn.Module) -> Program:
    """The integer program of the calibrated twin ``model`` (a rewritten SwinTransformer)."""
    pe = model.patch_embed
    conv = pe.proj
    if getattr(model, "dynamic_img_size", False) or getattr(pe, "dynamic_img_pad", False) \
            or not getattr(pe, "strict_img_size", True):
        raise UnsupportedModelError("dynamic image sizes have no integer program")
    if not isinstance(conv, QConv2d):
        raise UnsupportedModelError("the patch embedding must be a quantized convolution")
    if tuple(conv.stride) != tuple(conv.weight.shape[2:]) or any(conv.padding):
        raise UnsupportedModelError("the integer patch embedding needs stride = kernel, no "
                                    "padding")
    readers = _readers(model)
    b = Builder()
    codes = image_codes(b, conv.input_q, "images")
    w_int, w_step = weight_integers(conv.weight_q, conv.weight.detach())
    acc = b.weighted("patch_conv", conv, codes, w_int, w_step, "patch_embed.proj",
                     {"patch": list(conv.weight.shape[2:])})
    grid = (int(pe.grid_size[0]), int(pe.grid_size[1]))
    acc = _same(acc, b.emit("tokens_to_grid", [acc], {"grid": list(grid)}))
    if isinstance(pe.norm, QLayerNorm):
        acc = b.layernorm(pe.norm, acc, "patch_embed.norm")
    else:
        _plain(pe.norm, "patch_embed.norm")
    x = b.requant(acc, stream_step(readers[0]), "patch_embed.to_stream")

    r = 0  # x is on the grid of readers[r]
    for i, stage in enumerate(model.layers):
        where = f"layers.{i}"
        if isinstance(stage.downsample, PatchMerging):
            x = merge(b, stage.downsample, x, grid, stream_step(readers[r + 1]),
                      where + ".downsample")
            grid = (grid[0] // 2, grid[1] // 2)
            r += 1
        else:
            _plain(stage.downsample, where + ".downsample")
        for j, blk in enumerate(stage.blocks):
            x = block(b, blk, x, grid, (stream_step(readers[r + 1]),
                                        stream_step(readers[r + 2])), f"{where}.blocks.{j}")
            r += 2
    x = b.layernorm(model.norm, x, "norm")
    logits_out(b, _pool_and_head(b, model, x, grid))
    return b.program(["images"], ["logits"])
