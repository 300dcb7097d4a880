"""Keep the memory a forward pass frees mapped for the next one (glibc), in the process where the model runs."""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt(3) parameters (malloc.h), and the values keep_model_heap_mapped sets.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MODEL_MMAP_THRESHOLD = 32 * 1024 * 1024  # the most glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)
MODEL_TRIM_THRESHOLD = 128 * 1024 * 1024


def keep_model_heap_mapped() -> bool:
    """Keep the memory a forward pass frees mapped for the next one, instead of handing it back to the OS (glibc).

    A forward pass allocates its activations (megabytes) and frees them at the end. glibc serves blocks above its
    dynamic mmap threshold with mmap and returns them at free, and it shrinks the heap whenever more than its trim
    threshold is free at the top, so each pass could fault all of its activations in again, a page fault per 4 KiB
    (what that cost: bench/HISTORY.md). Fixed thresholds end that: blocks up to 32 MB come from the heap, and the heap keeps up to 128 MB free
    at its top. What stays mapped is the largest forward pass's working set, which the next large batch reuses.

    Returns False, changing nothing, off glibc. Process-wide: call it where the model runs.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MODEL_MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, MODEL_TRIM_THRESHOLD)
    )
