"""Process memory settings for the processes that score candidates.

glibc serves a block above its mmap threshold (128 KiB at start) with a fresh mapping and
returns it to the OS when freed, and trims the top of its heap beyond a threshold; it raises
both as large blocks come and go, but a scoring actor frees a whole forward pass's
activations at once (several MiB on the digits ViT's 256 validation images), which the heap
trims. Every forward pass then touches new pages, and the kernel zeroes each one on its first
write: measured in a Ray actor, the validation pass took 75-110 ms against 52 ms in a process
whose calibration had raised the thresholds, its elementwise operators two to four times
slower, and two actors zeroing pages at once slowed each other further (BENCHMARKS.md,
"Ray scaling").
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
# glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): blocks above it (a
# whole calibration sample) still get their own mapping and go back to the OS when freed.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20  # free memory the heap keeps at its top


def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks for reuse rather than return them to the OS; whether it
    applied (False on other C libraries and platforms, where nothing changes)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and others: no glibc, no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
