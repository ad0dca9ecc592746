"""The C allocator's part in a process's resident memory: freed blocks handed back to the system.

PyTorch's CPU tensors come from glibc's malloc. glibc serves a block of at least its mmap threshold from a mapping
of its own, returned to the system when freed, and anything smaller from its heap, whose freed blocks stay in the
process until `malloc_trim`. The threshold starts at 128 kB and by default rises to the size of each mapped block
freed (up to 32 MB): after the first forward frees its activations, the next forward's megabyte-sized tensors come
from the heap, and what they free in the middle of a step stays resident. In a probe of the demo's TAP stage 2, a
micro-batch's forward saved 119 MB of tensors for the backward pass while the process grew 246 MB; the stage's peak
was 1,298 MB, and 1,195 MB with the threshold fixed at 128 kB (its generation's 1,106 against 1,180 MB;
docs/performance.md, "Two adapters on a device").

Setting the threshold with mallopt fixes it (glibc then stops adjusting it). No effect where the C library is not
glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's starting value, kept


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_libc = _glibc()
CAN_RELEASE = _libc is not None  # whether release_free_memory does anything here


def return_large_blocks_when_freed(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve every block of `threshold` bytes or more from its own mapping, returned to the system when freed,
    whatever sizes were freed before. Returns whether the allocator took the setting."""
    return _libc is not None and bool(_libc.mallopt(M_MMAP_THRESHOLD, threshold))


def release_free_memory() -> None:
    """Hand memory the C allocator holds but no tensor uses back to the system (glibc's malloc_trim).

    Between a round's phases (generation, training) freed blocks would otherwise stay in the process, so the
    peak of one phase adds to what the last one left behind. No effect where the C library has no malloc_trim."""
    if _libc is not None:
        _libc.malloc_trim(0)
