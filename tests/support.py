"""Test support: a real uvicorn server in a subprocess on a free loopback port, and small helpers."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from types import TracebackType

import httpx
import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

from model.artifact import Artifact

REPO = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "test-admin-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`python -m service` as a child process, configured through BNSERVE_* variables.

    >>> with ServerProcess(artifact_dir) as srv:
    ...     httpx.get(f"{srv.url}/readyz")
    """

    def __init__(self, artifact_dir: Path, *, wait_ready: bool = True, **settings: object) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.wait_ready = wait_ready
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BNSERVE_")}
        self.env.update(
            {"BNSERVE_ARTIFACT_DIR": str(artifact_dir), "BNSERVE_PORT": str(self.port), "BNSERVE_HOST": "127.0.0.1"}
        )
        self.env.update({f"BNSERVE_{k.upper()}": str(v) for k, v in settings.items()})
        self.env.setdefault("PYTHONPATH", str(REPO))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bnserve-test-{self.port}.log"

    def start(self) -> ServerProcess:
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=REPO, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.wait_until("/healthz" if not self.wait_ready else "/readyz", timeout=60)
        return self

    def wait_until(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(self.url + path, timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{path} not 200 within {timeout} s:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


def train_smoke(out: Path, *, seed: int = 0, version: str | None = None, arch: str = "bn-cnn") -> Path:
    """Train a real (tiny) model with the real CLI; seconds on a CPU."""
    cmd = [sys.executable, "-m", "training", "--smoke", "--seed", str(seed), "--out", str(out), "--arch", arch]
    if version:
        cmd += ["--version", version]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return out


def direct_probabilities(art: Artifact, images: np.ndarray) -> np.ndarray:
    """A lone forward pass of the loaded artifact: the ground truth a server's response must reproduce."""
    x = art.normalization.apply(torch.from_numpy(images.reshape(-1, 1, 28, 28).astype(np.float32)))
    with torch.inference_mode():
        return torch.softmax(art.net(x), 1).numpy()


def metric(text: str, name: str, /, **labels: str) -> float:
    """One sample's value from Prometheus text (parsed by prometheus_client), or 0 when absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_claiming(width: int, height: int, *, pixel_bytes: int = 1000) -> bytes:
    """A valid PNG header that claims width × height 8-bit grey pixels, with almost no pixel data behind it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * pixel_bytes)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
