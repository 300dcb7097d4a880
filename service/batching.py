"""The micro-batcher: one bounded queue, one inference thread, results back through futures."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

logger = logging.getLogger("service.batching")

P = TypeVar("P")
R = TypeVar("R")


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
    loop: asyncio.AbstractEventLoop
    enqueued: float
    deadline: float


def _expire(future: asyncio.Future[R], timeout: float) -> None:
    if not future.done():
        future.set_exception(DeadlineExceededError(f"no result within {timeout:g} s"))


def _resolve(future: asyncio.Future[R], result: R | None, error: BaseException | None) -> None:
    if future.done():  # the waiter gave up (deadline) or was cancelled (client went away)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]


class MicroBatcher(Generic[P, R]):
    """Groups concurrent requests into batched calls of `infer`, run on one dedicated thread.

    The worker takes the oldest request, then every queued request that still fits in `max_batch_size` images.
    With `max_batch_delay` = 0 it never waits: at low load a request runs alone at once, and under load the
    queue fills while the previous batch runs, so batches grow by themselves. A positive delay makes the worker
    wait up to that long for a fuller batch.

    `infer` gets the payloads of one batch, in queue order, and returns one result per payload. If it raises,
    every request in that batch gets the exception. `after_batch`, if given, runs on the worker thread once the
    batch's results are on their way to the waiters, so work there (drift statistics) adds no latency.

    >>> batcher = MicroBatcher(lambda xs: [x * 2 for x in xs], max_batch_size=32)
    >>> batcher.start()
    >>> await batcher.submit(21, size=1, timeout=1.0)
    42
    >>> await batcher.stop()
    """

    def __init__(
        self,
        infer: Callable[[list[P]], Sequence[R]],
        *,
        max_batch_size: int,
        max_batch_delay: float = 0.0,
        max_queue: int = 1024,
        observer: BatchObserver | None = None,
        after_batch: Callable[[], None] | None = None,
        name: str = "inference",
    ) -> None:
        if max_batch_size <= 0:
            raise ValueError("max_batch_size must be > 0")
        if max_batch_delay < 0:
            raise ValueError("max_batch_delay must be >= 0")
        if max_queue < max_batch_size:
            raise ValueError("max_queue must be >= max_batch_size")
        self.infer = infer
        self.max_batch_size = max_batch_size
        self.max_batch_delay = max_batch_delay
        self.max_queue = max_queue
        self.observer = observer
        self.after_batch = after_batch
        self._queue: deque[_Item[P, R]] = deque()
        self._queued_images = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def queued_images(self) -> int:
        return self._queued_images

    def start(self) -> None:
        self._thread.start()

    async def submit(self, payload: P, *, size: int, timeout: float) -> R:
        """Queue one request of `size` images and wait for its result, at most `timeout` seconds."""
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        item: _Item[P, R] = _Item(payload, size, loop.create_future(), loop, now, now + timeout)
        with self._cond:
            if self._closed:
                self._reject("shutting_down")
                raise BatcherClosedError("the server is shutting down")
            if self._queued_images + size > self.max_queue:
                self._reject("queue_full")
                raise QueueFullError(f"the inference queue is full ({self._queued_images} images waiting)")
            self._queue.append(item)
            self._queued_images += size
            self._cond.notify()
        if self.observer:
            self.observer.queued(self._queued_images)
        # One timer per request, not wait_for + shield (three futures and a callback chain per request).
        timer = loop.call_later(timeout, _expire, item.future, timeout)
        try:
            return await item.future  # the worker skips a future that is done (expired) or cancelled
        except DeadlineExceededError:
            self._reject("deadline")
            raise
        finally:
            timer.cancel()

    async def stop(self) -> None:
        """Stop accepting, finish everything already accepted, then end the worker thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join)

    def _reject(self, reason: str) -> None:
        if self.observer:
            self.observer.rejected(reason)

    def _take_batch(self) -> list[_Item[P, R]] | None:
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            batch = [self._queue.popleft()]
            images = batch[0].size
            gather_until = time.monotonic() + self.max_batch_delay
            while images < self.max_batch_size:
                if self._queue:
                    if images + self._queue[0].size > self.max_batch_size:
                        break
                    item = self._queue.popleft()
                    batch.append(item)
                    images += item.size
                    continue
                remaining = gather_until - time.monotonic()
                if remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            self._queued_images -= images
            return batch

    def _run(self) -> None:
        while (batch := self._take_batch()) is not None:
            self._process(batch)

    def _process(self, batch: list[_Item[P, R]]) -> None:
        now = time.monotonic()
        live = [it for it in batch if not it.future.done() and it.deadline > now]
        if self.observer:
            self.observer.queued(self._queued_images)
        if not live:
            return
        started = time.perf_counter()
        try:
            results = list(self.infer([it.payload for it in live]))
            if len(results) != len(live):
                raise RuntimeError(f"infer returned {len(results)} results for {len(live)} requests")
            outcomes: list[tuple[R | None, BaseException | None]] = [(r, None) for r in results]
        except Exception as exc:  # every request of the batch gets the error
            logger.exception("batched forward pass failed for %d requests", len(live))
            outcomes = [(None, exc)] * len(live)
        if self.observer:
            waits = [now - it.enqueued for it in live]
            self.observer.batch_done(sum(it.size for it in live), waits, time.perf_counter() - started)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[R], R | None, BaseException | None]]] = {}
        for it, (res, err) in zip(live, outcomes, strict=True):
            by_loop.setdefault(it.loop, []).append((it.future, res, err))
        for loop, settle in by_loop.items():  # one wake-up of each event loop per batch
            with contextlib.suppress(RuntimeError):  # a closed loop has nobody waiting any more
                loop.call_soon_threadsafe(_settle_all, settle)
        if self.after_batch is not None:
            try:
                self.after_batch()
            except Exception:  # bookkeeping must never stop the worker
                logger.exception("after-batch work failed")


def _settle_all(settle: list[tuple[asyncio.Future[R], R | None, BaseException | None]]) -> None:
    for future, result, error in settle:
        _resolve(future, result, error)
