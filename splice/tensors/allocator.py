"""The C allocator's settings for a process that streams checkpoints (the `splice` command's own process).

A stream allocates and frees a buffer the size of a tensor for every input it reads and every output it computes.
glibc's malloc by default gives blocks above a threshold (128 KiB, raised as such blocks are freed, at most 32 MiB)
their own fresh mapping, and returns freed memory at the top of its heap to the system beyond 2x that threshold:
every such buffer is then faulted in again page by page, in the kernel. On a 3 x 1.6 GB bf16 soup in a fresh
process that was 380K page faults and 4-7 s of system time, more than the merge's reads and writes
(benchmarks/throughput.py). Raising both thresholds keeps freed buffers in the heap for the next tensor.

Only the command line calls `keep_freed_buffers`: the settings are process-wide and cannot be read back, so a
library call leaves its host's allocator alone (a host can set the same with MALLOC_MMAP_THRESHOLD_ and
MALLOC_TRIM_THRESHOLD_ in its environment). Settings a user gave (those variables, GLIBC_TUNABLES) are kept.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Mapping

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
KEPT_BLOCK_BYTES = 1 << 30
"""Blocks up to this size come from the heap, and up to this much freed memory stays in it. Blocks that threads other
than the main one ask for above 64 MiB (glibc's per-thread heap) still get their own mapping."""
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_buffers() -> bool:
    """Raise glibc's mmap and trim thresholds to KEPT_BLOCK_BYTES for this process. False (nothing changed) where
    the C library is not glibc or the user set the allocator's settings."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or user_tuned(os.environ):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, KEPT_BLOCK_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, KEPT_BLOCK_BYTES))


def user_tuned(environment: Mapping[str, str]) -> bool:
    return any(name in environment for name in USER_SETTINGS) or "glibc.malloc" in environment.get("GLIBC_TUNABLES", "")
