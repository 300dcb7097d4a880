"""Heap trimming after a burst: the freed middle of glibc's heap goes back to the OS, and only when it is worth it."""

import asyncio

import pytest

from service.serving.heap_trim import FREE_BYTES_TO_TRIM, HeapTrimmer, rss_bytes, trim_heap_periodically

pytestmark = pytest.mark.skipif(not HeapTrimmer().available, reason="needs glibc ≥ 2.33 (mallinfo2, malloc_trim)")


def fragmented_heap(megabytes: int = 48) -> bytearray:
    """Like a burst of request bodies: many heap blocks, all freed but the last, which pins the heap's top."""
    blocks = [bytearray(b"x" * (60 * 1024)) for _ in range(megabytes * 1024 // 60)]
    return blocks[-1]


def test_a_fragmented_heap_is_trimmed_and_rss_drops() -> None:
    trimmer = HeapTrimmer()
    trimmer.trim_if_worth_it(threshold=0)  # start from a trimmed heap
    pin = fragmented_heap()
    assert trimmer.free_bytes() > FREE_BYTES_TO_TRIM
    before = rss_bytes()
    assert trimmer.trim_if_worth_it() > 30 * 1024 * 1024
    assert before - rss_bytes() > 30 * 1024 * 1024
    assert trimmer.trim_if_worth_it() == 0, "the pages are gone already: nothing to gain from a second trim"
    assert len(pin) == 60 * 1024


def test_no_trim_below_the_threshold() -> None:
    trimmer = HeapTrimmer()
    assert trimmer.trim_if_worth_it(threshold=1 << 50) == 0


async def test_the_periodic_task_trims_in_the_background() -> None:
    trimmer = HeapTrimmer()
    trimmer.trim_if_worth_it(threshold=0)
    task = asyncio.create_task(trim_heap_periodically(trimmer, interval=0.01))
    before = rss_bytes()
    pin = fragmented_heap()
    try:
        for _ in range(300):
            await asyncio.sleep(0.01)
            if rss_bytes() - before < FREE_BYTES_TO_TRIM:
                break
        assert rss_bytes() - before < FREE_BYTES_TO_TRIM
    finally:
        task.cancel()
    assert len(pin) == 60 * 1024
