"""Integer matmuls with int32 accumulators, and the static bound that proves they do not wrap.

The worst case of an accumulator is known before any input is seen: Σ_k |W[n,k]| · max|a_k| for
a Linear (the real weights, not 2^(b−1)·K), K · max|a| · max|b| for an activation matmul, plus
the bias. When it exceeds int32, the reduction axis is split into chunks whose worst cases fit,
each chunk accumulates in int32 and the partial sums are added in int64 (what a device does
with a wider register after an int32 MAC array); the report names the layer and its chunks. It
never wraps silently.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

INT32_MAX = (1 << 31) - 1


def chunks_for(chunk_bound: Callable[[int], float], k: int) -> int:
    """Fewest equal chunks of the reduction axis (length k) whose accumulators all fit int32;
    ``chunk_bound(chunks)`` is the worst case of any one chunk when the axis is cut in that many
    (ceil(k / chunks) terms each, the last one shorter)."""
    chunks = max(1, min(k, math.ceil(chunk_bound(1) / INT32_MAX)))
    while chunk_bound(chunks) > INT32_MAX:
        if chunks >= k:
            raise OverflowError("a single product exceeds int32: operands too wide for int32 "
                                "MACs")
        chunks += 1
    return chunks


def _mm(a: Tensor, b: Tensor) -> Tensor:
    """Exact integer matmul, int64 out. int8 operands of 2-D shape use the CPU's int8 GEMM
    (int32 accumulation, ``torch._int_mm``); anything else multiplies in int64."""
    if (a.dim() == 2 and a.dtype == torch.int8 and b.dtype == torch.int8
            and a.shape[0] > 16 and a.shape[1] % 8 == 0 and b.shape[1] % 8 == 0):
        return torch._int_mm(a, b).to(torch.int64)
    return torch.matmul(a.to(torch.int64), b.to(torch.int64))


def int_matmul(a: Tensor, b: Tensor, chunks: int = 1) -> Tensor:
    """a (…, K) @ b (…, K, N) on integers: int32 accumulation per chunk of K, chunks summed in
    int64 (``chunks_for`` proved each chunk fits)."""
    k = a.shape[-1]
    if chunks <= 1:
        return _mm(a, b)
    size = math.ceil(k / chunks)
    out = None
    for start in range(0, k, size):
        part = _mm(a[..., start:start + size], b[..., start:start + size, :])
        part = part.to(torch.int32).to(torch.int64)  # each chunk is an int32 accumulator
        out = part if out is None else out + part
    return out


def shifted_matmul(parts: list[tuple[Tensor, int]], b: Tensor, chunks: int = 1) -> Tensor:
    """Σ_i (part_i @ b) << shift_i: a V-2SF operand's fine and coarse matmuls."""
    out = None
    for operand, shift in parts:
        acc = int_matmul(operand, b, chunks)
        acc = acc << shift if shift else acc
        out = acc if out is None else out + acc
    return out
