"""The micro-batcher: one bounded queue, one dispatcher on the event loop, results back through futures."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

logger = logging.getLogger("service.batching")

P = TypeVar("P")
R = TypeVar("R")

HELD_WINDOW = 1.0  # seconds: the lanes' share follows the most images the server held in the last 1-2 windows


class QueueFullError(Exception):
    """The queue holds max_queue images already: answer 503 with Retry-After."""


class DeadlineExceededError(Exception):
    """The request waited longer than its deadline: answer 504."""


class BatcherClosedError(Exception):
    """The batcher is shutting down and accepts nothing new: answer 503."""


class BatchObserver(Protocol):
    """Where the batcher reports what it does (the service's metrics); every method must be cheap."""

    def queued(self, images: int) -> None: ...
    def batch_done(self, images: int, waits: Sequence[float], seconds: float) -> None: ...
    def rejected(self, reason: str) -> None: ...


@dataclass
class _Item(Generic[P, R]):
    payload: P
    size: int
    future: asyncio.Future[R]
    enqueued: float
    deadline: float


def _expire(future: asyncio.Future[R], timeout: float) -> None:
    if not future.done():
        future.set_exception(DeadlineExceededError(f"no result within {timeout:g} s"))


class MicroBatcher(Generic[P, R]):
    """Groups concurrent requests into batched calls of `infer`, at most `max_in_flight` calls at a time.

    Everything here runs on the event loop: `infer` is a coroutine function that hands the batch to where the
    forward pass runs (the inference worker process, see service/serving/worker.py, or a thread) and awaits the result, so
    the loop keeps accepting requests meanwhile. The dispatcher takes the oldest request, then every queued
    request that still fits in `max_batch_size` images. With `max_batch_delay` = 0 it never waits: at low load a
    request runs alone at once, and under load the queue fills while the previous batch runs, so batches grow by
    themselves. A positive delay makes it wait up to that long for a fuller batch.

    `infer` gets the payloads of one batch, in queue order, and returns one result per payload. If it raises,
    every request in that batch gets the exception.

    With `max_in_flight` = 2 the next batch is handed over while one still runs, so the model goes from one batch
    straight to the next instead of idling until the event loop has answered the last one and formed the next.
    `infer` must then accept overlapping calls
    and run them in order (the worker process queues them). The second batch only goes early once it holds as many
    images as the running one (or a full batch), so batches do not shrink to the first request that turns up.
    And (without a delay) a batch takes at most its lane's share of the images the server has held at once lately
    (queued and running, the most in the last 1-2 s, divided by `max_in_flight`), so the lanes stay balanced rather
    than alternating one full batch with a one-image one. The measurements behind each rule: bench/HISTORY.md.

    >>> async def double(xs: list[int]) -> list[int]:
    ...     return [x * 2 for x in xs]
    >>> batcher = MicroBatcher(double, max_batch_size=32)
    >>> batcher.start()
    >>> await batcher.submit(21, size=1, timeout=1.0)
    42
    >>> await batcher.stop()
    """

    def __init__(
        self,
        infer: Callable[[list[P]], Awaitable[Sequence[R]]],
        *,
        max_batch_size: int,
        max_batch_delay: float = 0.0,
        max_queue: int = 1024,
        max_in_flight: int = 1,
        observer: BatchObserver | None = None,
        name: str = "batcher",
    ) -> None:
        if max_batch_size <= 0:
            raise ValueError("max_batch_size must be > 0")
        if max_batch_delay < 0:
            raise ValueError("max_batch_delay must be >= 0")
        if max_queue < max_batch_size:
            raise ValueError("max_queue must be >= max_batch_size")
        if max_in_flight <= 0:
            raise ValueError("max_in_flight must be > 0")
        self.infer = infer
        self.max_batch_size = max_batch_size
        self.max_batch_delay = max_batch_delay
        self.max_queue = max_queue
        self.max_in_flight = max_in_flight
        self.observer = observer
        self.name = name
        self._queue: deque[_Item[P, R]] = deque()
        self._queued_images = 0
        self._closed = False
        self._wake: asyncio.Future[None] | None = None  # what waiting lanes await (see _wait_for_requests)
        self._task: asyncio.Task[None] | None = None
        self._running = 0  # batches in infer
        self._running_images = 0  # images in those batches
        self._taking = False  # a lane is gathering a batch
        self._last_size = 0  # images of the batch taken last
        # the most images held at once (queued + running) in this window and in the one before (see lane_share)
        self._held_peak, self._held_peak_before, self._held_window_ends = 0, 0, 0.0

    @property
    def lane_share(self) -> int:
        """The most images one batch takes: max_batch_size, or, when batches may overlap and nothing asks for a
        delay, 1/max_in_flight of the most images the server held at once lately (at least 1)."""
        if self.max_in_flight == 1 or self.max_batch_delay > 0:
            return self.max_batch_size
        held = max(self._held_peak, self._held_peak_before)
        return max(1, min(self.max_batch_size, -(-held // self.max_in_flight)))

    def _note_held(self, now: float) -> None:
        held = self._queued_images + self._running_images
        if now >= self._held_window_ends:  # a new window; the last one counts only if it has just ended
            recent = now < self._held_window_ends + HELD_WINDOW
            self._held_peak_before, self._held_peak = (self._held_peak if recent else 0), held
            self._held_window_ends = now + HELD_WINDOW
        elif held > self._held_peak:
            self._held_peak = held

    def start(self) -> None:
        """Start the dispatcher on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def submit(self, payload: P, *, size: int, timeout: float) -> R:
        """Queue one request of `size` images and wait for its result, at most `timeout` seconds."""
        if self._closed:
            self._reject("shutting_down")
            raise BatcherClosedError("the server is shutting down")
        if self._queued_images + size > self.max_queue:
            self._reject("queue_full")
            raise QueueFullError(f"the inference queue is full ({self._queued_images} images waiting)")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        item: _Item[P, R] = _Item(payload, size, loop.create_future(), now, now + timeout)
        self._queue.append(item)
        self._queued_images += size
        self._note_held(now)
        self._notify()
        if self.observer:
            self.observer.queued(self._queued_images)
        # One timer per request, not wait_for + shield (three futures and a callback chain per request).
        timer = loop.call_later(timeout, _expire, item.future, timeout)
        try:
            return await item.future  # the dispatcher skips a future that is done (expired) or cancelled
        except DeadlineExceededError:
            self._reject("deadline")
            raise
        finally:
            timer.cancel()

    async def stop(self) -> None:
        """Stop accepting, finish everything already accepted, then end the dispatcher."""
        self._closed = True
        self._notify()
        if self._task is not None:
            await self._task

    def _reject(self, reason: str) -> None:
        if self.observer:
            self.observer.rejected(reason)

    def _notify(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def _wait_for_requests(self, timeout: float | None = None) -> None:
        """Until a request arrives, a batch finishes or the batcher stops (every waiting lane wakes)."""
        if self._wake is None or self._wake.done():
            self._wake = asyncio.get_running_loop().create_future()
        await asyncio.wait([self._wake], timeout=timeout)  # never cancels the shared future

    async def _take_batch(self) -> list[_Item[P, R]]:
        """(The queue is not empty.) The oldest request and every queued one that still fits in a batch, after
        waiting up to max_batch_delay for more.

        With no batch running and no delay, it takes at most half of what is queued, so that another lane can hand
        the rest over at once and the model never waits for the event loop. Without that, at c=32 all 32 requests
        could arrive between two batches and the server settled into one batch of 32 at a time: the model idle
        while the loop answered and parsed 32, the loop idle while the model ran, at 0.6–0.7 of the throughput
        (bench/README.md).
        """
        self._taking = True
        try:
            batch = [self._queue.popleft()]
            images = batch[0].size
            limit = self.lane_share
            if self._running == 0 and self.max_in_flight > 1 and self.max_batch_delay == 0:
                limit = min(limit, max(images, -(-self._queued_images // 2)))
            gather_until = time.monotonic() + self.max_batch_delay
            while images < limit:
                if self._queue:
                    if images + self._queue[0].size > limit:
                        break
                    item = self._queue.popleft()
                    batch.append(item)
                    images += item.size
                    continue
                remaining = gather_until - time.monotonic()
                if remaining <= 0 or self._closed:
                    break
                await self._wait_for_requests(remaining)
            self._queued_images -= images
            self._last_size = images
            return batch
        finally:
            self._taking = False

    async def _run(self) -> None:
        """One lane per batch that may be in flight; each takes a batch, runs it, answers it and takes the next in
        the same step, so a finished batch hands over to the next without an extra turn of the event loop."""
        await asyncio.gather(*(self._lane() for _ in range(self.max_in_flight)))

    async def _lane(self) -> None:
        while (batch := await self._next_batch()) is not None:
            try:
                await self._process(batch)
            except asyncio.CancelledError:
                raise
            except BaseException:  # the dispatcher must outlive any batch
                logger.exception("batch dispatch failed")
            finally:
                self._notify()  # a lane waiting to go early re-checks: the running batch is done

    async def _next_batch(self) -> list[_Item[P, R]] | None:
        while True:
            if self._queue and not self._taking and (self._running == 0 or self._may_go_early()):
                return await self._take_batch()
            if self._closed and not self._queue:
                return None
            await self._wait_for_requests()  # a request, a finished batch, or stop() wakes it

    def _may_go_early(self) -> bool:
        """(A batch is running.) Whether to hand over the next batch now rather than when the running one ends."""
        if self._running >= self.max_in_flight:
            return False
        return self._queued_images >= min(self.lane_share, self._last_size) or self._closed

    async def _process(self, batch: list[_Item[P, R]]) -> None:
        now = time.monotonic()
        live = [it for it in batch if not it.future.done() and it.deadline > now]
        if self.observer:
            self.observer.queued(self._queued_images)
        if not live:
            return
        started = time.perf_counter()
        images = sum(it.size for it in live)
        self._running += 1
        self._running_images += images
        if self._queue:
            self._notify()  # another lane may hand over the rest now (see _take_batch)
        try:
            results = await self.infer([it.payload for it in live])
            if len(results) != len(live):
                raise RuntimeError(f"infer returned {len(results)} results for {len(live)} requests")
        except Exception as exc:  # every request of the batch gets the error
            logger.error("batched forward pass failed for %d requests: %s", len(live), exc, exc_info=exc)
            for it in live:
                if not it.future.done():
                    it.future.set_exception(exc)
        else:
            for it, result in zip(live, results, strict=True):
                if not it.future.done():  # the waiter gave up (deadline) or went away (cancelled)
                    it.future.set_result(result)
        finally:
            self._running -= 1
            self._running_images -= images
        if self.observer:
            self.observer.batch_done(images, [now - it.enqueued for it in live], time.perf_counter() - started)
