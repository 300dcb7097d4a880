"""What crosses between the server process and the inference worker: the config, the messages, the pixel slots.

Both sides import this module, so it imports neither torch nor onnxruntime. `run_worker` is the process's entry
point: it imports the worker loop (and with it torch) only in the child.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Literal

import numpy as np

from model.preprocess import IMAGE_SIDE

EngineName = Literal["onnxruntime", "torch"]
ENGINES: tuple[EngineName, ...] = ("onnxruntime", "torch")
IMAGE_FLOATS = IMAGE_SIDE * IMAGE_SIDE
META_FILE = "model.json"  # model.artifact.META_FILE: that module imports torch, the server's process does not

# One byte of operation, then its arguments; replies are OK or FAILED + a message.
PREDICT, DRIFT, RESET, QUIT = b"P", b"D", b"R", b"Q"
READY, OK, FAILED = b"r", b"o", b"f"


@dataclass(frozen=True)
class ModelConfig:
    """What it takes to load the served model, wherever it runs. Plain values: it crosses to the worker."""

    artifact_dir: str
    drift_window: int | None
    top_channels: int
    torch_threads: int
    capacity: int  # most images in one forward pass (each slot of the shared region holds this many)
    log_level: str = "info"
    slots: int = 1  # batches that may be in flight at once (the batcher's max_in_flight)
    drift_sample: float = 1.0  # the share of images the drift window sees under load (1: every image)
    call_timeout: float = 30.0  # a worker silent this long is taken for hung: killed, then replaced
    engine: EngineName = "onnxruntime"  # what runs the forward pass (service/inference/engine.py)
    expect_sha256: str | None = None  # load only weights with this hash (a restarted worker: the served model)


def map_pixels(path: str, slots: int, capacity: int, *, create: bool) -> tuple[mmap.mmap, np.ndarray]:
    """The shared region as (slots, capacity, 1, 28, 28) float32."""
    size = slots * capacity * IMAGE_FLOATS * 4
    fd = os.open(path, os.O_RDWR)
    try:
        if create:
            os.ftruncate(fd, size)
        region = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    return region, np.frombuffer(region, np.float32).reshape(slots, capacity, 1, IMAGE_SIDE, IMAGE_SIDE)


def run_worker(conn: Connection, pixels_path: str, config: ModelConfig) -> None:
    """The inference worker process's target (see service/inference/worker.py)."""
    from service.inference.worker import worker_main  # torch is imported in the child only

    worker_main(conn, pixels_path, config)
