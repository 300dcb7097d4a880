"""The inference worker process: map the shared pixels, load the model, answer one message at a time.

`service/serving/worker.py` starts it (`WorkerHandle.start`) and says why it exists; `service/wire.py` holds what
both sides speak.
"""

from __future__ import annotations

import gc
import logging
import signal
from multiprocessing.connection import Connection

import orjson

from model.artifact import ArtifactError
from service.inference.predictor import load_predictor
from service.wire import DRIFT, FAILED, OK, PREDICT, QUIT, READY, RESET, ModelConfig, map_pixels

logger = logging.getLogger("service.worker")


def worker_main(conn: Connection, pixels_path: str, config: ModelConfig) -> None:
    """The worker process: load the model, then answer one message at a time until QUIT or the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    logging.basicConfig(level=config.log_level.upper(), format="%(levelname)s:     [inference worker] %(message)s")
    try:
        _region, pixels = map_pixels(pixels_path, config.slots, config.capacity, create=False)
    except FileNotFoundError:  # the parent stopped waiting for this worker (it shut down while we started)
        logger.info("the shared pixel region is gone: the server stopped before this worker started; exiting")
        return
    try:
        predictor = load_predictor(config)
    except (ArtifactError, ValueError, OSError) as exc:
        conn.send_bytes(FAILED + str(exc).encode())
        return
    info = {"name": predictor.name, "version": predictor.version, "sha256": predictor.artifact.sha256,
            "class_names": predictor.class_names}  # fmt: skip
    gc.collect()
    gc.freeze()  # the model's long-lived objects leave the GC's scans
    conn.send_bytes(READY + orjson.dumps(info))
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):  # the parent is gone
            return
        op = message[:1]
        try:
            if op == PREDICT:
                images, slot = int.from_bytes(message[1:5], "little"), message[5]
                conn.send_bytes(OK + predictor.predict(pixels[slot, :images]).tobytes())
            elif op == DRIFT:
                report = predictor.drift_report()
                conn.send_bytes(OK + orjson.dumps(None if report is None else report.to_wire()))
            elif op == RESET:
                predictor.reset_drift()
                conn.send_bytes(OK)
            elif op == QUIT:
                conn.send_bytes(OK)
                return
            else:
                conn.send_bytes(FAILED + f"unknown operation {op!r}".encode())
        except (BrokenPipeError, ConnectionError):  # the parent is gone
            return
        except Exception as exc:  # a failed forward pass fails its batch, not the worker
            logger.exception("inference worker call %r failed", op)
            conn.send_bytes(FAILED + f"{type(exc).__name__}: {exc}".encode())
