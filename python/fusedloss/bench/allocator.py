"""Keep freed CPU memory in the process, so that timings measure the loss, not the OS.

PyTorch's CPU allocator is glibc ``malloc``. By default glibc serves every
block above 32 MiB with a fresh ``mmap`` and unmaps it on ``free``, so each
logits-sized tensor (the gradient, the copy, an unfused baseline's
temporaries) is page-faulted in again on every call. On the 2-core VM this
was measured on, faulting ran at roughly 1-2 GB/s against 17-20 GB/s for the
copy itself: the same 32 MiB ``clone()`` took 3 ms or 25 ms depending on
whether the previous cell had left a freed block to reuse, which made the
ratio to the copy swing by 10x. Turning off ``mmap`` for large blocks and
heap trimming makes every call after the warm-up reuse memory, the way
PyTorch's caching allocator already behaves on CUDA, so CPU and GPU rows
measure the same thing: compute and memory traffic.

The setting is process-wide and one-way (glibc has no "restore defaults"),
which is why it is a CLI choice (``--cpu-allocator``), applied once, up front.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# From glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> str:
    """Apply the setting; returns a description for the result file."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "system (mallopt unavailable: not glibc)"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success.
    if mallopt(_M_MMAP_MAX, 0) != 1 or mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) != 1:
        return "system (mallopt refused)"
    return "warm (glibc: no mmap for large blocks, no trimming)"
