"""The inference worker process behind a real server: a killed worker is replaced while the server keeps answering
(200 or 503 + Retry-After, never a 5xx of another kind or a dropped connection), and no worker outlives its server."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from model.artifact import Artifact
from tests.support import ServerProcess, direct_probabilities, metric

pytestmark = pytest.mark.integration


def worker_pids(srv: ServerProcess) -> list[int]:
    """The server's inference worker processes (not multiprocessing's resource tracker)."""
    assert srv.proc is not None
    children = " ".join(p.read_text() for p in Path(f"/proc/{srv.proc.pid}/task").glob("*/children"))
    pids = []
    for pid in map(int, children.split()):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            pids.append(pid)
    return pids


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphaned zombie may wait for an init that never reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_a_killed_worker_is_replaced_and_the_server_keeps_answering(
    tiny_artifact_dir: Path, tiny_artifact: Artifact, test_images
) -> None:  # type: ignore[no-untyped-def]
    images = test_images[0][:4]
    body = {"instances": images.reshape(4, -1).tolist()}
    expected = direct_probabilities(tiny_artifact, images)
    with ServerProcess(tiny_artifact_dir) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        [old] = worker_pids(srv)
        assert client.post("/v1/predict", json=body).status_code == 200
        os.kill(old, signal.SIGKILL)
        statuses: list[int] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            r = client.post("/v1/predict", json=body)
            statuses.append(r.status_code)
            if r.status_code == 200 and len(statuses) > 1:
                break
            assert r.status_code == 503, r.text
            assert r.json()["code"] == "worker_restarting" and r.headers["retry-after"] == "2"
            time.sleep(0.05)
        assert statuses[-1] == 200, f"not serving again within 60 s: {statuses[-5:]}\n{srv.logs()[-3000:]}"
        got = np.array([p["probabilities"] for p in r.json()["predictions"]])
        np.testing.assert_allclose(got, expected, atol=1e-6)
        [new] = worker_pids(srv)
        assert new != old and not running(old)
        assert client.get("/readyz").status_code == 200
        text = client.get("/metrics").text
        assert metric(text, "bnserve_inference_worker_restarts_total") == 1.0
        assert metric(text, "bnserve_drift_window_images", layer="features.0.1") >= 0  # drift from the new worker
        assert f"inference worker (pid {old}) exited" in srv.logs()


def test_a_hung_worker_is_killed_and_replaced(tiny_artifact_dir: Path, test_images) -> None:  # type: ignore[no-untyped-def]
    body = {"instances": test_images[0][:1].reshape(1, -1).tolist()}
    settings = {"inference_timeout": 2, "request_timeout": 1}
    with ServerProcess(tiny_artifact_dir, **settings) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        [old] = worker_pids(srv)
        os.kill(old, signal.SIGSTOP)  # alive, silent: a hang
        statuses = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            r = client.post("/v1/predict", json=body)
            statuses.append(r.status_code)
            if r.status_code == 200:
                break
            assert r.status_code in (503, 504), r.text  # deadline while hung, then worker_restarting
            time.sleep(0.05)
        assert statuses[-1] == 200 and 504 in statuses, statuses
        [new] = worker_pids(srv)
        assert new != old and not running(old)
        assert f"inference worker pid {old} did not answer within 2 s" in srv.logs()
        assert metric(client.get("/metrics").text, "bnserve_inference_worker_restarts_total") == 1.0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_no_worker_outlives_its_server(tiny_artifact_dir: Path, sig: signal.Signals) -> None:
    srv = ServerProcess(tiny_artifact_dir).start()
    [pid] = worker_pids(srv)
    srv.stop(sig)
    deadline = time.monotonic() + 20
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(pid), f"worker {pid} still running after the server got {sig.name}"


def test_thread_mode_answers_alike_with_no_worker_process(
    tiny_artifact_dir: Path, tiny_artifact: Artifact, test_images
) -> None:  # type: ignore[no-untyped-def]
    images = test_images[0][:8]
    with ServerProcess(tiny_artifact_dir, inference_process="false") as srv:
        assert worker_pids(srv) == []
        r = httpx.post(f"{srv.url}/v1/predict", json={"instances": images.reshape(8, -1).tolist()})
        assert r.status_code == 200
        got = np.array([p["probabilities"] for p in r.json()["predictions"]])
        np.testing.assert_allclose(got, direct_probabilities(tiny_artifact, images), atol=1e-6)
        assert httpx.get(f"{srv.url}/v1/drift").json()["images_seen"] == 8
