"""The micro-batcher, driven directly with no HTTP."""

import asyncio
import time
from collections.abc import Sequence

import pytest

from service.serving.batching import BatcherClosedError, DeadlineExceededError, MicroBatcher, QueueFullError


class Recorder:
    """A real infer function that records the batches it was given (and can be held, slowed or made to fail)."""

    def __init__(self, delay: float = 0.0, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay
        self.fail_on = fail_on
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, payloads: list[int]) -> Sequence[int]:
        await asyncio.wait_for(self.gate.wait(), 10)
        self.batches.append(list(payloads))
        await asyncio.sleep(self.delay)
        if self.fail_on is not None and self.fail_on in payloads:
            raise ValueError(f"bad payload {self.fail_on}")
        return [p * 10 for p in payloads]


class Gated:
    """A real infer function whose n-th call records its payloads, then waits until `gates[n]` is set."""

    def __init__(self, calls: int) -> None:
        self.started: list[list[int]] = []
        self.gates = [asyncio.Event() for _ in range(calls)]

    async def __call__(self, payloads: list[int]) -> list[int]:
        call = len(self.started)
        self.started.append(list(payloads))
        await self.gates[call].wait()
        return [p * 10 for p in payloads]


class Events:
    def __init__(self) -> None:
        self.rejections: list[str] = []
        self.sizes: list[int] = []

    def queued(self, images: int) -> None: ...
    def batch_done(self, images: int, waits: Sequence[float], seconds: float) -> None:
        self.sizes.append(images)

    def rejected(self, reason: str) -> None:
        self.rejections.append(reason)


async def test_concurrent_submits_become_one_batch_in_order() -> None:
    infer = Recorder()
    infer.gate.clear()  # hold the worker so all submits queue up behind the first batch
    batcher = MicroBatcher(infer, max_batch_size=64)
    batcher.start()
    first = asyncio.create_task(batcher.submit(-1, size=1, timeout=5))
    await asyncio.sleep(0.05)
    tasks = [asyncio.create_task(batcher.submit(i, size=1, timeout=5)) for i in range(20)]
    await asyncio.sleep(0.05)
    infer.gate.set()
    results = await asyncio.gather(*tasks)
    assert await first == -10
    assert results == [i * 10 for i in range(20)], "each caller gets its own result"
    assert infer.batches == [[-1], list(range(20))], "the 20 queued requests ran as one batch, in queue order"
    await batcher.stop()


async def test_no_added_latency_when_idle() -> None:
    batcher = MicroBatcher(Recorder(), max_batch_size=64, max_batch_delay=0.0)
    batcher.start()
    started = time.perf_counter()
    assert await batcher.submit(3, size=1, timeout=5) == 30
    assert time.perf_counter() - started < 0.5
    await batcher.stop()


async def test_batch_size_limit_counts_images() -> None:
    infer = Recorder()
    infer.gate.clear()
    events = Events()
    batcher = MicroBatcher(infer, max_batch_size=8, max_queue=100, observer=events)
    batcher.start()
    tasks = [asyncio.create_task(batcher.submit(i, size=3, timeout=5)) for i in range(6)]
    await asyncio.sleep(0.05)
    infer.gate.set()
    await asyncio.gather(*tasks)
    assert all(size <= 8 for size in events.sizes)
    assert [len(b) for b in infer.batches] == [2, 2, 2], "3 + 3 images fit in 8; a third request would not"
    assert events.sizes == [6, 6, 6]
    await batcher.stop()


async def test_error_spreads_to_the_whole_batch() -> None:
    infer = Recorder(fail_on=2)
    infer.gate.clear()
    batcher = MicroBatcher(infer, max_batch_size=64)
    batcher.start()
    blocker = asyncio.create_task(batcher.submit(100, size=1, timeout=5))
    await asyncio.sleep(0.05)
    tasks = [asyncio.create_task(batcher.submit(i, size=1, timeout=5)) for i in range(4)]
    await asyncio.sleep(0.05)
    infer.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert await blocker == 1000
    assert all(isinstance(r, ValueError) and "bad payload 2" in str(r) for r in results)
    assert await batcher.submit(7, size=1, timeout=5) == 70, "the worker survives a failed batch"
    await batcher.stop()


async def test_full_queue_rejects() -> None:
    infer = Recorder()
    infer.gate.clear()
    events = Events()
    batcher = MicroBatcher(infer, max_batch_size=2, max_queue=4, observer=events)
    batcher.start()
    running = asyncio.create_task(batcher.submit(0, size=2, timeout=5))
    await asyncio.sleep(0.05)  # the worker holds this one; the queue is empty again
    queued = [asyncio.create_task(batcher.submit(i, size=2, timeout=5)) for i in (1, 2)]
    await asyncio.sleep(0.05)
    with pytest.raises(QueueFullError, match="full"):
        await batcher.submit(3, size=1, timeout=5)
    assert events.rejections == ["queue_full"]
    infer.gate.set()
    assert await running == 0 and await asyncio.gather(*queued) == [10, 20]
    await batcher.stop()


async def test_deadline_expires_and_the_request_is_skipped() -> None:
    infer = Recorder()
    infer.gate.clear()
    events = Events()
    batcher = MicroBatcher(infer, max_batch_size=1, observer=events)
    batcher.start()
    slow = asyncio.create_task(batcher.submit(1, size=1, timeout=5))
    await asyncio.sleep(0.05)
    with pytest.raises(DeadlineExceededError):
        await batcher.submit(2, size=1, timeout=0.1)
    infer.gate.set()
    assert await slow == 10
    await batcher.stop()
    assert events.rejections == ["deadline"]
    assert [2] not in infer.batches, "an expired request never reaches the model"


async def test_shutdown_drains_what_was_accepted() -> None:
    infer = Recorder(delay=0.02)
    batcher = MicroBatcher(infer, max_batch_size=2)
    batcher.start()
    tasks = [asyncio.create_task(batcher.submit(i, size=1, timeout=5)) for i in range(10)]
    await asyncio.sleep(0)  # let them all queue
    await batcher.stop()
    assert await asyncio.gather(*tasks) == [i * 10 for i in range(10)]
    with pytest.raises(BatcherClosedError):
        await batcher.submit(99, size=1, timeout=1)


async def test_max_batch_delay_waits_for_a_fuller_batch() -> None:
    infer = Recorder()
    batcher = MicroBatcher(infer, max_batch_size=4, max_batch_delay=0.2)
    batcher.start()
    first = asyncio.create_task(batcher.submit(1, size=1, timeout=5))
    await asyncio.sleep(0.05)
    second = asyncio.create_task(batcher.submit(2, size=1, timeout=5))
    assert await asyncio.gather(first, second) == [10, 20]
    assert infer.batches == [[1, 2]]
    await batcher.stop()


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="max_batch_size must be > 0"):
        MicroBatcher(Recorder(), max_batch_size=0)
    with pytest.raises(ValueError, match="max_queue"):
        MicroBatcher(Recorder(), max_batch_size=8, max_queue=4)
    with pytest.raises(ValueError, match="max_in_flight"):
        MicroBatcher(Recorder(), max_batch_size=8, max_in_flight=0)


async def test_a_failing_dispatch_never_stops_the_batcher() -> None:
    calls = 0

    async def wrong_length(payloads: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        return [] if calls == 1 else list(payloads)

    batcher = MicroBatcher(wrong_length, max_batch_size=4)
    batcher.start()
    with pytest.raises(RuntimeError, match="infer returned 0 results for 1 requests"):
        await batcher.submit(1, size=1, timeout=5)
    assert await batcher.submit(2, size=1, timeout=5) == 2
    await batcher.stop()


async def test_with_two_in_flight_the_next_batch_goes_early_once_it_is_as_big_as_the_running_one() -> None:
    infer = Gated(4)
    started, gates = infer.started, infer.gates
    batcher = MicroBatcher(infer, max_batch_size=8, max_in_flight=2)
    batcher.start()
    a = [asyncio.create_task(batcher.submit(0, size=3, timeout=5))]  # one batch of 3 images runs
    await asyncio.sleep(0.02)
    b = [asyncio.create_task(batcher.submit(i, size=1, timeout=5)) for i in (10, 11)]
    await asyncio.sleep(0.02)
    assert started == [[0]], "2 images queued behind a 3-image batch wait for it: batches do not shrink"
    b.append(asyncio.create_task(batcher.submit(12, size=1, timeout=5)))
    await asyncio.sleep(0.02)
    assert started == [[0], [10, 11, 12]], "as big as the running batch: handed over while it runs"
    c = [asyncio.create_task(batcher.submit(i, size=1, timeout=5)) for i in (20, 21, 22, 23)]
    await asyncio.sleep(0.02)
    assert len(started) == 2, "never more than max_in_flight batches at once"
    gates[1].set()  # the second finishes first: its callers are answered at once
    assert await asyncio.gather(*b) == [100, 110, 120]
    await asyncio.sleep(0.02)
    assert started[2] == [20, 21, 22, 23]
    for gate in gates:
        gate.set()
    assert await asyncio.gather(*a, *c) == [0, 200, 210, 220, 230]
    await batcher.stop()


async def test_requests_arriving_together_at_an_idle_model_are_split_so_two_batches_overlap() -> None:
    started: list[list[int]] = []
    gate = asyncio.Event()

    async def infer(payloads: list[int]) -> list[int]:
        started.append(list(payloads))
        await gate.wait()
        return payloads

    batcher = MicroBatcher(infer, max_batch_size=32, max_in_flight=2)
    batcher.start()
    tasks = [asyncio.create_task(batcher.submit(i, size=1, timeout=5)) for i in range(8)]
    await asyncio.sleep(0.02)
    assert started == [[0, 1, 2, 3], [4, 5, 6, 7]], "half each: the model never waits for the loop to answer all 8"
    gate.set()
    assert await asyncio.gather(*tasks) == list(range(8))
    one = MicroBatcher(infer, max_batch_size=32, max_in_flight=1)
    one.start()
    started.clear()
    assert await asyncio.gather(*(one.submit(i, size=1, timeout=5) for i in range(8))) == list(range(8))
    assert started == [list(range(8))], "one in flight: nothing to overlap with, so no split"
    await asyncio.gather(batcher.stop(), one.stop())


async def test_stop_drains_every_batch_in_flight() -> None:
    infer = Recorder(delay=0.05)
    batcher = MicroBatcher(infer, max_batch_size=2, max_in_flight=2)
    batcher.start()
    tasks = [asyncio.create_task(batcher.submit(i, size=1, timeout=5)) for i in range(7)]
    await asyncio.sleep(0)
    await batcher.stop()
    assert [t.result() for t in tasks] == [i * 10 for i in range(7)]
    assert sorted(p for batch in infer.batches for p in batch) == list(range(7))


async def test_with_two_in_flight_a_batch_takes_at_most_half_of_what_the_server_holds() -> None:
    """The lanes stay balanced: at c=32, batches of up to 32 used to alternate between ~31 images and 1-2 (the
    second batch, which could never grow as big as the first, waited for it to end; bench/README.md)."""
    infer = Gated(5)
    started, gates = infer.started, infer.gates
    batcher = MicroBatcher(infer, max_batch_size=32, max_in_flight=2)
    batcher.start()
    first = [asyncio.create_task(batcher.submit(i, size=1, timeout=5)) for i in range(4)]
    await asyncio.sleep(0.02)
    assert started == [[0, 1], [2, 3]]
    rest = [asyncio.create_task(batcher.submit(i, size=1, timeout=5)) for i in range(4, 32)]
    await asyncio.sleep(0.02)
    assert batcher.lane_share == 16, "32 images held (4 running, 28 queued), two lanes"
    gates[0].set()
    await asyncio.sleep(0.02)
    assert started[2] == list(range(4, 20)), "16 of the 28 queued, not all of them: the other lane takes the rest"
    gates[1].set()
    await asyncio.sleep(0.02)
    assert len(started) == 3, "12 queued behind a running 16: they wait (batches do not shrink)"
    gates[2].set()
    await asyncio.sleep(0.02)
    assert started[3:] == [list(range(20, 26)), list(range(26, 32))], "nothing running: split in two again"
    for gate in gates:
        gate.set()
    assert await asyncio.gather(*first, *rest) == [i * 10 for i in range(32)]
    await batcher.stop()


async def test_the_lane_share_follows_the_load_and_is_the_whole_batch_with_one_lane() -> None:
    infer = Recorder()
    batcher = MicroBatcher(infer, max_batch_size=32, max_in_flight=2)
    assert batcher.lane_share == 1, "nothing held yet"
    batcher.start()
    await asyncio.gather(*(batcher.submit(i, size=1, timeout=5) for i in range(100)))
    assert batcher.lane_share == 32, "a burst of 100: half is more than a batch"
    await asyncio.sleep(2.1)  # two windows of HELD_WINDOW later, one client
    await batcher.submit(0, size=1, timeout=5)
    assert batcher.lane_share == 1
    await batcher.stop()
    assert MicroBatcher(infer, max_batch_size=32, max_in_flight=1).lane_share == 32
    assert MicroBatcher(infer, max_batch_size=32, max_in_flight=2, max_batch_delay=0.01).lane_share == 32
