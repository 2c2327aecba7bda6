"""Give model-sized buffers back to the OS when they are freed (glibc only).

glibc serves a request above its mmap threshold with a private mapping and
unmaps it on free. By default it raises that threshold to the largest such
block freed so far (up to 32 MiB), so after the first round the server's
model-sized upload buffers and tensors come from its malloc heaps instead:
one heap per RPC thread, up to eight per core, each keeping what was freed
in it. The server's resident memory then grows with the workers far beyond
the mirrors it really holds. Setting the threshold explicitly turns that
adaptation off; every model-sized buffer is then a fresh mapping whose pages
are faulted in again, which makes rounds longer. bench.scale measures both
settings side by side; `lbgm server --malloc-mmap-threshold` chooses.
"""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h
GLIBC_START_MMAP_THRESHOLD = 128 * 1024  # where glibc's adaptive threshold starts
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024  # the largest value glibc accepts on 64-bit


def pin_mmap_threshold(threshold: int) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes; False when the C library is not glibc."""
    if not 0 < threshold <= MAX_MMAP_THRESHOLD:
        raise ValueError(f"the mmap threshold must lie in [1, {MAX_MMAP_THRESHOLD}] bytes, got {threshold}")
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1
