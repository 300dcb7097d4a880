"""The inference worker process, seen from the server: the default place the forward pass runs
(service/serving/handle.py has the thread kind; service/inference/worker.py is what runs in the process).

Why a process: the event loop (HTTP, JSON, responses) and an inference thread would share one GIL, which every
torch call gives up and takes back, and under load the forward pass then waits for the loop (bench/HISTORY.md).
The worker process owns the model, runs the forward pass (with the drift sums inside it, for the
batches the drift sampling rule picks) and keeps the drift window; the event loop's process only moves bytes:

- pixels: the parent writes each batch into a slot of a shared-memory region (a file in /dev/shm, mapped by both
  sides); there is one slot per batch that may be in flight (`ModelConfig.slots`);
- requests and replies: one pipe, one message each way per batch (`PREDICT n slot` → `OK` + the float32
  probabilities). The parent reads replies from the event loop (`add_reader`), so no thread of its own waits.

The worker answers messages in order, so replies match calls first in, first out, and a second batch sent while
one runs waits in the pipe and starts the moment the first is answered (the batcher's `max_in_flight`). A
monitored batch's moments go into the window before its reply, so a drift report never misses an answered image.
If the worker dies, every call in flight gets `WorkerDiedError` and the owner (ServingState) starts a new worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import multiprocessing
import os
import tempfile
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import orjson

from service.drift_report import DriftReport
from service.serving.handle import ModelHandle, ModelLoadError
from service.wire import DRIFT, FAILED, PREDICT, QUIT, READY, RESET, ModelConfig, map_pixels, run_worker

logger = logging.getLogger("service.worker")

START_TIMEOUT = 120.0  # seconds for the worker to load, verify and warm up the model
STOP_TIMEOUT = 10.0


class WorkerDiedError(RuntimeError):
    """The inference worker process exited; the call that was in flight has no answer."""


class WorkerError(RuntimeError):
    """The worker answered a call with an error (a failed forward pass: a server bug, never the client's input)."""


def _shared_dir() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class WorkerHandle(ModelHandle):
    """The model in an inference worker process; see the module docstring.

    >>> model = await WorkerHandle.start(config, on_exit=lambda m: ...)
    >>> probs = await model.predict([pixels_a, pixels_b])
    >>> await model.close()
    """

    def __init__(
        self, info: dict[str, Any], config: ModelConfig, process: Any, conn: Connection, region: mmap.mmap,
        pixels: np.ndarray, on_exit: Callable[[WorkerHandle], None] | None,
    ) -> None:  # fmt: skip
        super().__init__(info["name"], info["version"], info["sha256"], list(info["class_names"]))
        self.pid: int = process.pid
        self._config = config
        self._process = process
        self._conn = conn
        self._region = region
        self._pixels = pixels
        self._on_exit = on_exit
        self._free_slots: asyncio.Queue[int] = asyncio.Queue()  # pixel slots no call in flight is using
        for slot in range(config.slots):
            self._free_slots.put_nowait(slot)
        self._pending: deque[asyncio.Future[bytes]] = deque()  # one per call sent, in order: replies come in order
        self._alive = True
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(conn.fileno(), self._readable)

    @classmethod
    async def start(cls, config: ModelConfig, on_exit: Callable[[WorkerHandle], None] | None = None) -> WorkerHandle:
        """Start a worker and wait until its model is loaded, verified and warmed up; ModelLoadError if it cannot."""
        ctx = multiprocessing.get_context("spawn")  # never fork a process that runs threads and an event loop
        fd, path = tempfile.mkstemp(prefix="bnserve-pixels-", dir=_shared_dir())
        os.close(fd)
        try:
            region, pixels = map_pixels(path, config.slots, config.capacity, create=True)
            parent, child = ctx.Pipe()
            process = ctx.Process(target=run_worker, args=(child, path, config), name="bnserve-inference", daemon=True)
            await asyncio.to_thread(process.start)
            child.close()  # only the worker holds its end now, so its exit reads as EOF here
            info = await asyncio.to_thread(_await_ready, parent, process)
        finally:
            os.unlink(path)  # both sides have mapped it; the memory lives until both unmap it
        logger.info("inference worker pid %d serves %s version %s", process.pid, info["name"], info["version"])
        return cls(info, config, process, parent, region, pixels, on_exit)

    @property
    def alive(self) -> bool:
        return self._alive

    async def predict(self, payloads: list[np.ndarray]) -> np.ndarray:
        images = sum(len(p) for p in payloads)
        capacity = self._config.capacity
        if images > capacity:  # only when one request holds more images than a batch may: run it in parts
            pixels = np.concatenate(payloads)
            parts = [pixels[i : i + capacity] for i in range(0, images, capacity)]
            return np.concatenate([await self.predict([part]) for part in parts])
        slot = await self._free_slots.get()
        target = self._pixels[slot, :images]
        if len(payloads) == 1:
            target[...] = payloads[0]
        else:
            np.concatenate(payloads, out=target)
        message = PREDICT + images.to_bytes(4, "little") + bytes([slot])
        # the slot is free once the worker has answered (or died), not when this caller stops waiting
        reply = await self._call(message, on_reply=lambda: self._free_slots.put_nowait(slot))
        # a copy: the view at byte offset 1 is unaligned, and numpy takes slow paths on unaligned arrays
        return np.frombuffer(reply, np.float32, offset=1).reshape(images, len(self.class_names)).copy()

    async def drift_report(self) -> DriftReport | None:
        reply = await self._call(DRIFT)
        wire = orjson.loads(reply[1:])
        return None if wire is None else DriftReport.from_wire(wire)

    async def reset_drift(self) -> None:
        await self._call(RESET)

    async def close(self) -> None:
        """Let the calls in flight finish, ask the worker to exit, and make sure it did."""
        self._closing = True
        await self._settle_pending()
        if self._alive:
            with contextlib.suppress(WorkerDiedError, WorkerError, OSError, TimeoutError):
                await asyncio.wait_for(self._call(QUIT), STOP_TIMEOUT)
        self._detach()
        await asyncio.to_thread(self._process.join, STOP_TIMEOUT)
        if self._process.is_alive():
            logger.warning("inference worker pid %d did not exit; killing it", self.pid)
            self._process.kill()
            await asyncio.to_thread(self._process.join, STOP_TIMEOUT)
        self._conn.close()
        with contextlib.suppress(BufferError):  # a view still referenced elsewhere keeps the mapping alive
            del self._pixels
            self._region.close()

    async def _call(self, message: bytes, on_reply: Callable[[], None] | None = None) -> bytes:
        """Send one message and wait for its reply (replies come in the order the messages were sent). `on_reply`
        runs once the call is over for the worker: answered, failed, or never sent."""
        future: asyncio.Future[bytes] = self._loop.create_future()
        future.add_done_callback(_retrieve)  # a call whose caller was cancelled must not log "never retrieved"
        if on_reply is not None:
            future.add_done_callback(lambda _f: on_reply())
        if not self._alive:
            future.cancel()
            raise WorkerDiedError(f"the inference worker (pid {self.pid}) is not running")
        try:
            self._conn.send_bytes(message)
        except OSError:  # a broken pipe: the worker died and its EOF has not been read yet
            future.cancel()
            self._exited()
            raise WorkerDiedError(f"the inference worker (pid {self.pid}) is not running") from None
        self._pending.append(future)
        try:
            # shielded: a caller that is cancelled leaves its future queued, so replies never mismatch
            reply = await asyncio.wait_for(asyncio.shield(future), self._config.call_timeout)
        except TimeoutError:
            logger.error("inference worker pid %d did not answer within %g s: killing it",
                         self.pid, self._config.call_timeout)  # fmt: skip
            self._process.kill()
            self._exited()  # fails every call in flight; the owner starts a replacement
            raise WorkerDiedError(f"the inference worker (pid {self.pid}) hung and was killed") from None
        if reply[:1] == FAILED:
            raise WorkerError(reply[1:].decode(errors="replace"))
        return reply

    async def _settle_pending(self) -> None:
        """Wait for the replies to every call in flight, including those whose callers were cancelled."""
        while self._pending:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._pending[-1])

    def _readable(self) -> None:
        try:
            reply = self._conn.recv_bytes()
        except (EOFError, OSError):
            self._exited()
            return
        if self._pending:
            future = self._pending.popleft()
            if not future.done():
                future.set_result(reply)

    def _detach(self) -> None:
        if self._alive:
            self._alive = False
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self._conn.fileno())

    def _exited(self) -> None:
        if not self._alive:
            return
        self._detach()
        code = self._process.exitcode  # None if not reaped yet: close() joins it later, off the event loop
        error = WorkerDiedError(
            f"the inference worker (pid {self.pid}) exited" + ("" if code is None else f" with code {code}")
        )
        pending, self._pending = self._pending, deque()
        for future in pending:
            if not future.done():
                future.set_exception(error)
        if not self._closing:
            logger.error("%s", error)
            if self._on_exit is not None:
                self._on_exit(self)


def _retrieve(future: asyncio.Future[bytes]) -> None:
    if not future.cancelled():
        future.exception()


def _await_ready(conn: Connection, process: Any) -> dict[str, Any]:
    """(On a thread, at start.) The worker's first message: its model's identity, or why it could not load."""
    try:
        if not conn.poll(START_TIMEOUT):
            raise ModelLoadError(f"the inference worker did not load the model within {START_TIMEOUT:g} s")
        message = conn.recv_bytes()
    except (ModelLoadError, EOFError, OSError) as exc:
        process.kill()
        process.join()
        if isinstance(exc, ModelLoadError):
            raise
        raise ModelLoadError(f"the inference worker exited while loading (exit code {process.exitcode})") from None
    if message[:1] != READY:
        process.join(STOP_TIMEOUT)
        conn.close()
        raise ModelLoadError(message[1:].decode(errors="replace"))
    info: dict[str, Any] = orjson.loads(message[1:])
    return info
