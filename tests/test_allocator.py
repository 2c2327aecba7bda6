"""The server's pinned mmap threshold: model-sized blocks stay mmapped (so free returns them to the OS)
where glibc's adaptive threshold would move them into its heaps."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from lbgm.server.allocator import MAX_MMAP_THRESHOLD, pin_mmap_threshold

# Frees one 4 MiB block (glibc's adaptive threshold rises to it), then allocates another and prints how
# many mmapped blocks that added: 1 when the threshold stayed where it was pinned, 0 when it adapted.
PROBE = """
import ctypes, sys
from lbgm.server.allocator import GLIBC_START_MMAP_THRESHOLD, pin_mmap_threshold
FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
if sys.argv[1] == "pinned":
    assert pin_mmap_threshold(GLIBC_START_MMAP_THRESHOLD)
libc.free(libc.malloc(4 << 20))
before = libc.mallinfo2().hblks
block = libc.malloc(4 << 20)
print(libc.mallinfo2().hblks - before)
"""


def glibc_has_mallinfo2() -> bool:
    return hasattr(ctypes.CDLL(None), "mallinfo2")


@pytest.mark.skipif(not glibc_has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
def test_pinned_threshold_keeps_freed_sized_blocks_mmapped_where_adaptive_does_not():
    def mmapped_blocks(setting: str) -> int:
        result = subprocess.run([sys.executable, "-c", PROBE, setting], capture_output=True, text=True,
                                timeout=60, check=True)
        return int(result.stdout)

    assert mmapped_blocks("adaptive") == 0
    assert mmapped_blocks("pinned") == 1


@pytest.mark.parametrize("threshold", [0, -1, MAX_MMAP_THRESHOLD + 1])
def test_out_of_range_threshold_is_refused(threshold):
    with pytest.raises(ValueError, match="mmap threshold must lie in"):
        pin_mmap_threshold(threshold)


def test_server_flag_out_of_range_is_a_usage_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lbgm.cli", "server", "--malloc-mmap-threshold", "-1",
                             "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--malloc-mmap-threshold must lie in [0, 33554432], got -1" in result.stderr
    assert not any(tmp_path.iterdir())
