"""glibc's malloc told to keep freed memory for reuse: the CPU step's temporaries stop being faulted in again.

A training step on a CPU allocates and frees thousands of activation-sized temporaries ((tokens x hidden) casts,
norms, softmax blocks). By default glibc serves blocks above its mmap threshold with fresh pages and gives memory
at the heap's top back to the kernel past its trim threshold, so the same buffers are mapped, zeroed by page
faults and unmapped on every use (`bench.perf.train_throughput` with and without: `docs/speed.md`). Raising
both thresholds keeps freed blocks in the heap, as the caching allocators PyTorch recommends for CPUs (jemalloc,
tcmalloc) do. Numbers are unchanged: only where memory comes from. Resident memory then stays at its high-water mark until the process ends.

`lora_mem.model.loader.load_model` applies it when it builds a model on a CPU, unless LORA_MEM_CPU_KEEP_FREED=0;
anywhere but glibc it does nothing. Every bench results file records whether it applies (`bench.common.run_info`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Mapping

from lora_mem.kernels.policy import env_choice

# mallopt parameters (glibc's malloc.h) and the values set
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's ceiling on 64-bit: blocks above it are still mapped fresh
TRIM_THRESHOLD_BYTES = 1 << 30


@functools.cache
def _glibc():
    """glibc, or None where the C library is another (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # glibc only
        libc.mallopt
    except (OSError, AttributeError, TypeError):
        return None
    return libc


def keeps_freed_memory(environ: Mapping[str, str] | None = None) -> bool:
    """Whether :func:`keep_freed_memory` acts here: glibc, and LORA_MEM_CPU_KEEP_FREED unset or 1."""
    wanted = env_choice("LORA_MEM_CPU_KEEP_FREED", "1", ("0", "1"), os.environ if environ is None else environ)
    return wanted == "1" and _glibc() is not None


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); True where both were set."""
    if not keeps_freed_memory():
        return False
    libc = _glibc()
    mmap_set = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    trim_set = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    return bool(mmap_set and trim_set)
