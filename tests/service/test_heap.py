"""Heap trimming after a burst: the freed middle of glibc's heap goes back to the OS, and only when it is worth it."""

import asyncio
import subprocess
import sys

import pytest

from service.heap import FREE_BYTES_TO_TRIM, HeapTrimmer, rss_bytes, trim_heap_periodically

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


# Three 6 MB blocks alive at once, then all freed, like a forward pass's activations; minor page faults per round
# after the first. glibc's defaults give each round fresh pages (the blocks are mmapped, or the heap is trimmed).
_ROUNDS = """
import resource, sys
import numpy as np
from service.heap import keep_model_heap_mapped
if sys.argv[1] == "keep":
    assert keep_model_heap_mapped()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(11):
    if i == 1:
        start = faults()
    blocks = [np.ones(1_500_000, np.float32) for _ in range(3)]
    del blocks
print((faults() - start) / 10)
"""


def faults_per_round(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _ROUNDS, mode], capture_output=True, text=True, check=True)
    return float(out.stdout)


def test_the_models_heap_keeps_freed_activations_mapped() -> None:
    # of the blocks' ~4400 pages, glibc's defaults (2.36) fault ~1000 in again every round: a trimmed heap top
    assert faults_per_round("default") > 500, "glibc's defaults no longer give the pages back: is this still needed?"
    assert faults_per_round("keep") < 50
