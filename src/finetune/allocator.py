"""Memory freed by one training step stays in the process for the next, instead of going back to the kernel.

glibc's malloc serves each large block (over a threshold that adapts up to 32 MB) with its own `mmap` and hands it
back with `munmap` when it is freed. A training step on the CPU frees and asks again for the same activations and
gradients every step, tens to hundreds of MB of them at 224 px, so the kernel maps and zeroes those pages afresh at
every step: on this project's 2-core CPU, 23% of a depth study's CPU time was the kernel's (1,046 of 4,470 s, 345
million page faults), and EfficientNet-Lite0's full training step ran at 18-27 images/s, 28-31 with the setting
below (bench/RESULTS.md, "The allocator"). PyTorch's CPU tensors are allocated with malloc, so the fix is glibc's:
no `mmap` per block (`M_MMAP_MAX` 0) and no trimming of the heap's free top below 2 GB (`M_TRIM_THRESHOLD`). A
process then keeps its peak memory, which the next step needs again, instead of returning it between steps.

What `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...` in the environment would do, set by the process itself so that
`python train.py` gets it without a wrapper. Only under glibc (Linux); elsewhere nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import platform

log = logging.getLogger(__name__)

# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest, 2 GB


@functools.cache
def keep_freed_memory() -> bool:
    """Sets glibc's malloc, once a process, to keep freed blocks for reuse (see the module docstring). Returns whether
    it took: False off glibc (macOS, Windows, musl) or where `mallopt` refuses."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    taken = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("allocator: glibc malloc keeps freed blocks for reuse (no mmap per block): %s", taken)
    return taken
