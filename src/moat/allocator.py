"""The process's memory allocator: a setting that only a program owning its process should
make (the `moat` command and the benchmark scripts), never a library import; eager CPU
inference reads it (`freed_memory_kept`: large batches need no chunking then).

`keep_freed_memory()`: glibc's malloc serves every allocation above its mmap threshold
(at most 32 MiB) with a fresh mmap and unmaps it on free; it also trims the heap whenever
its free top exceeds 128 KiB. Each training step of a high-resolution network allocates
and frees gigabytes of such tensors (MOAT-0's first block alone: 154 MB activations at
batch 8), so every step page-faults them in again: on the 2-core reference machine that
was 4 million page faults in 6 steps and a MOAT-0 training step of 2.5 s instead of 1.5 s.
Keeping freed memory in the heap for reuse removes the faults once the heap has grown to
fit the step (a few steps); the price is that the process keeps its peak memory, plus some
fragmentation, until it exits (MOAT-0 training at batch 8: 4.3 GB resident for 2.6 GB of
peak live tensors). Setting MALLOC_TRIM_THRESHOLD_ or MALLOC_MMAP_MAX_ yourself keeps
glibc's own behaviour.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_MAX = -4

_KEPT = "glibc, freed memory kept (no mmap, no trim)"
_state = {"allocator": "system default"}


def keep_freed_memory() -> str:
    """Make glibc's malloc keep freed memory for reuse (no mmap per large tensor, no trim).

    Does nothing, and says so, when the C library is not glibc or the user set the
    allocator up already (MALLOC_MMAP_MAX_ / MALLOC_TRIM_THRESHOLD_ / LD_PRELOAD). Returns
    the allocator setting in words, also recorded with benchmark results.
    """
    if any(name in os.environ for name in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_",
                                           "LD_PRELOAD")):
        _state["allocator"] = "set by the environment"
        return _state["allocator"]
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without mallopt)
        return _state["allocator"]
    # -1 disables trimming; 0 mmaps disables mmap for large blocks (documented in mallopt(3)).
    if mallopt(_M_TRIM_THRESHOLD, -1) and mallopt(_M_MMAP_MAX, 0):
        _state["allocator"] = _KEPT
    return _state["allocator"]


def allocator_setting() -> str:
    """The allocator setting of this process, in words."""
    return _state["allocator"]


def freed_memory_kept() -> bool:
    """True once `keep_freed_memory` has made glibc keep freed memory in this process."""
    return _state["allocator"] == _KEPT
