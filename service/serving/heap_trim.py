"""Give the event loop's freed heap memory back to the OS once a burst is over (glibc only).

A burst of concurrent requests buffers their bodies at once, all from glibc's heap. Freed, they leave free chunks
between live ones, and glibc only shrinks the heap from its top, so RSS stays up for good after a burst though the
memory in use is back where it was (bench/HISTORY.md). `malloc_trim(0)` hands the free pages in the middle back too. Here it runs at most
once per `TRIM_INTERVAL`, and only when the heap holds more than `FREE_BYTES_TO_TRIM` free *and* RSS has grown by
as much since the last trim (a trim leaves the chunks free, only their pages go, so free bytes alone would ask
for a trim every second). Steady load leaves neither behind, so the request path does not pay for it.

Where the model runs, the opposite holds: every forward pass allocates and frees the same few MB of activations,
and `keep_model_heap_mapped` keeps them mapped between passes. (With the model on a thread of the server,
`BNSERVE_INFERENCE_PROCESS=false`, both live in one process: the trimmer still trims after a burst.)
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import time

logger = logging.getLogger("service.heap")

TRIM_INTERVAL = 1.0  # seconds between looks at the heap
FREE_BYTES_TO_TRIM = 16 * 1024 * 1024  # steady load leaves 3-10 MB free; a burst of big bodies, 20-40 MB

_MALLINFO2_FIELDS = (
    "arena",
    "ordblks",
    "smblks",
    "hblks",
    "hblkhd",
    "usmblks",
    "fsmblks",
    "uordblks",
    "fordblks",  # free bytes: what trim_if_worth_it reads
    "keepcost",
)


class _MallInfo2(ctypes.Structure):
    """glibc's `struct mallinfo2` (malloc.h, glibc ≥ 2.33)."""

    _fields_ = [(name, ctypes.c_size_t) for name in _MALLINFO2_FIELDS]


def rss_bytes() -> int:
    """This process's resident memory."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _libc() -> ctypes.CDLL:
    """The C library (glibc on Debian); a function missing from it raises AttributeError when looked up."""
    return ctypes.CDLL(ctypes.util.find_library("c"))


class HeapTrimmer:
    """`malloc_trim` behind a check of how much of the heap is free; `available` is False off glibc/Linux."""

    def __init__(self) -> None:
        self._libc: ctypes.CDLL | None = None
        self.rss_after_trim = 0  # RSS right after the last trim (0: never trimmed)
        try:
            libc = _libc()
            libc.mallinfo2.restype = _MallInfo2
            libc.malloc_trim.argtypes = [ctypes.c_size_t]
            rss_bytes()
        except (OSError, AttributeError, TypeError):  # not glibc, older than 2.33, or no /proc
            return
        self._libc = libc

    @property
    def available(self) -> bool:
        return self._libc is not None

    def free_bytes(self) -> int:
        """Bytes in free chunks of the heap (all arenas), which RSS may still count."""
        assert self._libc is not None
        return int(self._libc.mallinfo2().fordblks)

    def trim_if_worth_it(self, threshold: int = FREE_BYTES_TO_TRIM) -> int:
        """Trim when more than `threshold` bytes are free and RSS grew by more than `threshold` since the last
        trim; returns the bytes RSS dropped by (0: no trim)."""
        if self._libc is None:
            return 0
        rss = rss_bytes()
        if rss - self.rss_after_trim <= threshold or self.free_bytes() <= threshold:
            return 0
        started = time.perf_counter()
        self._libc.malloc_trim(0)
        self.rss_after_trim = rss_bytes()
        logger.debug(
            "heap trimmed in %.1f ms: RSS %.1f → %.1f MB",
            (time.perf_counter() - started) * 1e3,
            rss / 1e6,
            self.rss_after_trim / 1e6,
        )
        return max(rss - self.rss_after_trim, 0)


async def trim_heap_periodically(trimmer: HeapTrimmer, interval: float = TRIM_INTERVAL) -> None:
    """The lifespan task: look every `interval` seconds, trim when a burst left much of the heap free."""
    if not trimmer.available:
        return
    while True:
        await asyncio.sleep(interval)
        trimmer.trim_if_worth_it()
