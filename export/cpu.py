"""What this CPU's int8 kernels in ONNX Runtime can do: which fast-graph operands are exact here."""

from __future__ import annotations

import platform
from pathlib import Path

INT8_FLAGS = ("avx512_vnni", "avx_vnni", "avx512bw", "amx_int8", "amx_tile")


def int8_flags() -> list[str]:
    """The int8 instruction sets of this CPU that ONNX Runtime's kernels use (x86 Linux)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [f for f in INT8_FLAGS if f in flags]


def s8s8_is_exact() -> bool:
    """ONNX Runtime's uint8 × int8 kernels (which run the ``s8s8`` fast graph) sum in int32 on
    ARM and on x86 with VNNI; on x86 without VNNI they add pairs of products in saturating int16,
    so only ``u8u8`` is exact there."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return True
    return bool({"avx512_vnni", "avx_vnni"} & set(int8_flags()))
