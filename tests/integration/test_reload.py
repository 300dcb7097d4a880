"""Hot reload of a real server under load: atomic swaps, refused corrupt artifacts, metrics, and the file watch."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from model.artifact import WEIGHTS_FILE, Artifact, load_artifact, save_artifact
from model.net import build_net
from tests.support import ADMIN_TOKEN, ServerProcess, direct_probabilities, metric, train_smoke

pytestmark = pytest.mark.integration
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
IMAGES_PER_REQUEST = 4


@pytest.fixture(scope="module")
def versions(tiny_artifact_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Artifact]:
    """Two real models with different versions: a copy of the session's tiny model, and one more trained here."""
    root = tmp_path_factory.mktemp("reload")
    a = load_artifact(shutil.copytree(tiny_artifact_dir, root / "A"))
    b = load_artifact(train_smoke(root / "B", seed=2, version="B"))
    assert a.meta.version != b.meta.version and a.sha256 != b.sha256
    return {a.meta.version: a, b.meta.version: b}


def publish(src: Path, live: Path) -> None:
    """Replace the served directory the way save_artifact does: copy beside it, then rename-swap."""
    staged = live.with_name(f".{live.name}.staged")
    old = live.with_name(f".{live.name}.old")
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(src, staged)  # copy2 keeps the files' mtimes
    if live.exists():
        os.replace(live, old)
    os.replace(staged, live)
    shutil.rmtree(old, ignore_errors=True)


def corrupt_weights(src: Path, out: Path) -> Path:
    """A copy of `src` with one flipped byte in the weights (model.json untouched, so its hash no longer fits)."""
    shutil.copytree(src, out)
    weights = out / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    return out


def wrong_input_artifact(like: Artifact, out: Path) -> Path:
    """A well-formed, correctly hashed artifact whose network takes 3-channel images: only a forward pass shows it."""
    config = dataclasses.replace(like.config, in_channels=3)
    save_artifact(
        out, build_net(config).eval(), config, name=like.meta.name, normalization=like.normalization,
        metrics=dict(like.meta.metrics), data_fingerprint=like.meta.data.fingerprint, data_source="test",
        calibration=like.calibration, version="rgb",
    )  # fmt: skip
    return out


@dataclass
class Load:
    """Closed-loop clients sending real MNIST images; every answer is kept with its send and receive times."""

    url: str
    images: np.ndarray  # (N, 28, 28) float32
    # (sent, received, index of the first image, model version, probabilities)
    answers: list[tuple[float, float, int, str, np.ndarray]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stopping: bool = False

    async def client(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(base_url=self.url, limits=limits, timeout=30) as client:
            while not self.stopping and len(self.failures) < 100:
                start = int(rng.integers(0, len(self.images) - IMAGES_PER_REQUEST))
                batch = self.images[start : start + IMAGES_PER_REQUEST].reshape(IMAGES_PER_REQUEST, -1)
                body = orjson.dumps({"instances": batch.tolist()})
                sent = time.monotonic()
                try:
                    r = await client.post("/v1/predict", content=body, headers={"Content-Type": "application/json"})
                except httpx.HTTPError as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                if r.status_code != 200:
                    self.failures.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                out = r.json()
                probs = np.array([p["probabilities"] for p in out["predictions"]])
                self.answers.append((sent, time.monotonic(), start, out["model"]["version"], probs))

    async def wait_for_answers(self, count: int, timeout: float = 30) -> None:
        target = len(self.answers) + count
        deadline = time.monotonic() + timeout
        while len(self.answers) < target and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert len(self.answers) >= target, f"the load stalled: {len(self.answers)} answers, {self.failures[:3]}"


def served(report: dict[str, int]) -> int:
    """Images the reporting model has answered since it was loaded (monitored or not)."""
    return report["images_seen"] + report["images_unmonitored"]


def check_answers(load: Load, versions: dict[str, Artifact], live: list[tuple[float, float, str]]) -> None:
    """Every answer carries a version that may have been live while it was in flight, and that version's exact
    probabilities. `live` lists (from, until, version): the times in which that version may have served."""
    expected = {v: direct_probabilities(art, load.images) for v, art in versions.items()}
    assert load.answers
    for sent, got, start, version, probs in load.answers:
        possible = {v for lo, hi, v in live if lo <= got and sent <= hi}
        assert version in possible, f"answer in [{sent:.3f}, {got:.3f}] from {version}, live then: {possible}"
        want = expected[version][start : start + IMAGES_PER_REQUEST]
        np.testing.assert_allclose(probs, want, rtol=1e-5, atol=1e-6, err_msg=f"answer from {version}")


async def test_reloads_under_load_lose_nothing_and_switch_models_atomically(
    versions: dict[str, Artifact], test_images: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    (a, art_a), (b, art_b) = versions.items()
    live_dir = tmp_path / "current"
    publish(art_a.path, live_dir)
    refused = {  # artifact, what the 422 must say
        "bad-hash": (corrupt_weights(art_b.path, tmp_path / "bad-hash"), "hash mismatch"),
        "bad-input": (wrong_input_artifact(art_b, tmp_path / "bad-input"), "self-test forward pass"),
    }
    # A big drift window that only fills slowly, so a fresh window is visible as a small image count.
    with ServerProcess(live_dir, admin_token=ADMIN_TOKEN, drift_window=4096, access_log="false") as srv:
        load = Load(srv.url, test_images[0])
        clients = [asyncio.create_task(load.client(seed)) for seed in range(16)]
        live: list[tuple[float, float, str]] = []  # closed when the next swap is confirmed
        since, current = 0.0, a
        ok = failed = 0
        try:
            async with httpx.AsyncClient(base_url=srv.url, headers=AUTH, timeout=60) as admin:
                for target in (b, a, "bad-hash", b, "bad-input", a, b):
                    await load.wait_for_answers(100)
                    before = (await admin.get("/v1/drift")).json()
                    assert before["model"]["version"] == current
                    publish(refused[target][0] if target in refused else versions[target].path, live_dir)
                    started = time.monotonic()
                    r = await admin.post("/v1/admin/reload")
                    done = time.monotonic()
                    after = (await admin.get("/v1/drift")).json()
                    metrics = (await admin.get("/metrics")).text
                    if target in refused:
                        failed += 1
                        assert r.status_code == 422, f"{r.text}\n{srv.logs()[-3000:]}"
                        err = r.json()
                        assert err["code"] == "reload_failed"
                        assert refused[target][1] in err["error"] and "keeps serving" in err["error"]
                        assert after["model"]["version"] == current
                        assert after["window_images"] >= before["window_images"], "the window must go on"
                        await load.wait_for_answers(100)  # the old model keeps serving
                    else:
                        ok += 1
                        assert r.status_code == 200, r.text
                        art = versions[target]
                        assert r.json()["model"] == {"name": art.meta.name, "version": target, "sha256": art.sha256}
                        assert after["model"]["version"] == target
                        # A new model starts a new window: it has served only the requests since the swap, the old
                        # one at least 100 (the window itself fills from a budgeted sample under this load).
                        assert served(after) < served(before), (before, after)
                        live.append((since, done, current))
                        since, current = started, target
                    info = {"name": versions[current].meta.name, "version": current, "sha256": versions[current].sha256}
                    assert metric(metrics, "bnserve_model_info", **info) == 1.0
                    assert metric(metrics, "bnserve_model_reloads_total", result="success") == ok
                    assert metric(metrics, "bnserve_model_reloads_total", result="failure") == failed
                await load.wait_for_answers(100)
        finally:
            load.stopping = True
            await asyncio.wait_for(asyncio.gather(*clients), timeout=60)
        live.append((since, float("inf"), current))
        logs = srv.logs()
    assert not load.failures, f"{len(load.failures)} failed requests: {load.failures[:5]}\n{logs[-3000:]}"
    assert logs.count("reload refused") == 2 and "Traceback" not in logs, logs[-3000:]
    check_answers(load, versions, live)
    by_version = {v for *_, v, _ in load.answers}
    assert by_version == {a, b}


# A swap is picked up within one poll, then a new inference worker starts: it imports torch (3 s on an idle 2-core
# VM), loads and warms the model. Under this test's load that took 5.1 s once (a CI run of a 5-s bound failed).
# How fast is the benchmark's business; this bound only says the swap was seen, not left to a later event.
RELOAD_SEEN_WITHIN = 30.0


async def wait_for_version(client: httpx.AsyncClient, version: str, timeout: float = RELOAD_SEEN_WITHIN) -> float:
    """Poll predictions until they come from `version`; returns when that was (time.monotonic())."""
    deadline = time.monotonic() + timeout
    body = {"instances": [[0.0] * 784]}
    while time.monotonic() < deadline:
        r = await client.post("/v1/predict", json=body)
        assert r.status_code == 200, r.text
        if r.json()["model"]["version"] == version:
            return time.monotonic()
        await asyncio.sleep(0.05)
    raise AssertionError(f"still not serving {version} after {timeout} s")


async def test_file_watch_reloads_on_a_swap_and_refuses_a_corrupt_artifact(
    versions: dict[str, Artifact], test_images: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    (a, art_a), (b, art_b) = versions.items()
    live_dir = tmp_path / "current"
    publish(art_a.path, live_dir)
    with ServerProcess(live_dir, reload_poll_seconds=0.2, access_log="false") as srv:
        load = Load(srv.url, test_images[0])
        clients = [asyncio.create_task(load.client(seed)) for seed in range(4)]
        try:
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
                await load.wait_for_answers(20)
                published_b = time.monotonic()
                publish(art_b.path, live_dir)
                seen_b = await wait_for_version(client, b)
                assert seen_b - published_b < RELOAD_SEEN_WITHIN
                # A's model.json (copied with its mtime) over corrupted weights: refused, B keeps serving.
                publish(corrupt_weights(art_a.path, tmp_path / "bad"), live_dir)
                deadline = time.monotonic() + 10
                while "reload refused" not in srv.logs() and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                metrics = (await client.get("/metrics")).text
                assert metric(metrics, "bnserve_model_reloads_total", result="failure") == 1, srv.logs()[-3000:]
                assert (await client.get("/readyz")).status_code == 200
                await load.wait_for_answers(20)
                assert load.answers[-1][3] == b, "the served model must not change on a refused artifact"
                # The good A again: its model.json has the same bytes and mtime as the refused one's, and is
                # still a new file that must be picked up.
                published_a = time.monotonic()
                publish(art_a.path, live_dir)
                seen_a = await wait_for_version(client, a)
                assert seen_a - published_a < RELOAD_SEEN_WITHIN
                metrics = (await client.get("/metrics")).text
                assert metric(metrics, "bnserve_model_reloads_total", result="success") == 2
                await load.wait_for_answers(20)
        finally:
            load.stopping = True
            await asyncio.wait_for(asyncio.gather(*clients), timeout=60)
        logs = srv.logs()
    assert not load.failures, f"{len(load.failures)} failed requests: {load.failures[:5]}\n{logs[-3000:]}"
    assert logs.count("artifact changed on disk") == 3, logs[-3000:]
    check_answers(load, versions, [(0.0, seen_b, a), (published_b, seen_a, b), (published_a, float("inf"), a)])


def test_file_watch_retries_a_copy_that_lands_model_json_before_the_weights(
    versions: dict[str, Artifact], tmp_path: Path
) -> None:
    (a, art_a), (b, art_b) = versions.items()
    live_dir = shutil.copytree(art_a.path, tmp_path / "current")
    with ServerProcess(live_dir, reload_poll_seconds=0.1, access_log="false") as srv:
        shutil.copy(art_b.path / "model.json", live_dir / "model.json")  # B's metadata over A's weights: refused
        deadline = time.monotonic() + 30
        while "reload refused" not in srv.logs() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "reload refused" in srv.logs() and "hash mismatch" in srv.logs()
        assert httpx.get(f"{srv.url}/readyz").json()["model"]["version"] == a
        shutil.copy(art_b.path / WEIGHTS_FILE, live_dir / WEIGHTS_FILE)  # the weights land: retried, served
        while time.monotonic() < deadline + 30:
            if httpx.get(f"{srv.url}/readyz").json()["model"]["version"] == b:
                break
            time.sleep(0.1)
        text = httpx.get(f"{srv.url}/metrics").text
        assert metric(text, "bnserve_model_reloads_total", result="success") == 1, srv.logs()[-3000:]
        assert metric(text, "bnserve_model_reloads_total", result="failure") == 1


def test_a_restarted_worker_serves_the_served_model_or_refuses(versions: dict[str, Artifact], tmp_path: Path) -> None:
    """Another artifact on disk (not reloaded) must not be picked up silently when the worker dies and restarts."""
    (_, art_a), (b, art_b) = versions.items()
    live_dir = shutil.copytree(art_a.path, tmp_path / "current")
    with ServerProcess(live_dir, admin_token=ADMIN_TOKEN) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        publish(art_b.path, live_dir)  # no file watch: B is on disk, A is served
        os.kill(worker_pid(srv), 9)
        deadline = time.monotonic() + 30
        while "not the served model" not in srv.logs() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "not the served model" in srv.logs(), srv.logs()[-3000:]
        r = c.post("/v1/predict", json={"instances": [[0.0] * 784]})
        assert r.status_code == 503 and r.json()["code"] == "worker_restarting"
        assert c.post("/v1/admin/reload", headers=AUTH).status_code == 200, "an explicit reload serves B"
        r = c.post("/v1/predict", json={"instances": [[0.0] * 784]})
        assert r.status_code == 200 and r.json()["model"]["version"] == b


def worker_pid(srv: ServerProcess) -> int:
    assert srv.proc is not None
    children = " ".join(p.read_text() for p in Path(f"/proc/{srv.proc.pid}/task").glob("*/children"))
    [pid] = [int(p) for p in children.split() if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
    return pid
