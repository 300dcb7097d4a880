"""The inference worker process, driven directly with no HTTP: same answers as a lone forward pass, the same drift
window as an in-process predictor, refusals with the loader's message, and a death that fails only the call in
flight."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from model.artifact import WEIGHTS_FILE, Artifact, load_artifact
from service.inference.predictor import Predictor
from service.serving.handle import LocalHandle, ModelHandle, ModelLoadError
from service.serving.worker import WorkerDiedError, WorkerHandle
from service.wire import ModelConfig, run_worker
from tests.support import direct_probabilities

pytestmark = pytest.mark.integration  # starts real processes (~2 s each)

WINDOW = 16


def _config(artifact_dir: Path, capacity: int = 16) -> ModelConfig:
    return ModelConfig(str(artifact_dir), drift_window=WINDOW, top_channels=3, torch_threads=1, capacity=capacity)


@pytest.mark.parametrize("kind", [WorkerHandle, LocalHandle])
async def test_answers_match_a_lone_forward_pass_and_the_drift_window_matches_in_process(
    kind: type[WorkerHandle] | type[LocalHandle], tiny_artifact_dir: Path, tiny_artifact: Artifact, test_images
) -> None:  # type: ignore[no-untyped-def]
    x = test_images[0][:40, None].astype(np.float32)  # (40, 1, 28, 28)
    model: ModelHandle = await kind.start(_config(tiny_artifact_dir))
    try:
        assert model.name == tiny_artifact.meta.name and model.sha256 == tiny_artifact.sha256
        probs = await model.predict([x[:3], x[3:10]])  # two requests in one batch
        np.testing.assert_allclose(probs, direct_probabilities(tiny_artifact, x[:10]), atol=1e-6)
        big = await model.predict([x[10:40]])  # 30 images: more than the capacity of 16, run in parts
        np.testing.assert_allclose(big, direct_probabilities(tiny_artifact, x[10:40]), atol=1e-6)

        reference = Predictor(load_artifact(tiny_artifact_dir), drift_window=WINDOW, top_channels=3)
        reference.predict(x)
        expected = reference.drift_report()
        report = await model.drift_report()
        assert report is not None and expected is not None
        assert (report.images, report.images_seen, report.status) == (WINDOW, 40, expected.status)
        for got, want in zip(report.layers, expected.layers, strict=True):
            assert got.name == want.name
            assert [c["channel"] for c in got.top_channels] == [c["channel"] for c in want.top_channels]
            assert got.score == pytest.approx(want.score, rel=1e-5)

        await model.reset_drift()
        after = await model.drift_report()
        assert after is not None and after.images == 0 and after.status == "warming_up"
    finally:
        await model.close()
    if isinstance(model, WorkerHandle):
        assert not model.alive and model._process.exitcode == 0, "the worker exits cleanly on close"


async def test_a_corrupt_artifact_is_refused_with_the_loaders_message(tmp_path: Path, tiny_artifact_dir: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny_artifact_dir, bad)
    (bad / WEIGHTS_FILE).write_bytes(b"\0" * 64)
    with pytest.raises(ModelLoadError, match="hash mismatch"):
        await WorkerHandle.start(_config(bad))


async def test_a_dead_worker_fails_the_call_in_flight_and_reports_its_exit(
    tiny_artifact_dir: Path, test_images
) -> None:  # type: ignore[no-untyped-def]
    exits: list[WorkerHandle] = []
    model = await WorkerHandle.start(_config(tiny_artifact_dir), on_exit=exits.append)
    x = test_images[0][:4, None].astype(np.float32)
    assert (await model.predict([x])).shape == (4, 10)
    os.kill(model.pid, signal.SIGKILL)

    async def predict_until_the_death_is_seen() -> None:  # on the send, or as EOF while waiting for the reply
        for _ in range(200):
            await model.predict([x])
            await asyncio.sleep(0.01)

    with pytest.raises(WorkerDiedError, match=f"pid {model.pid}"):
        await predict_until_the_death_is_seen()
    assert exits == [model] and not model.alive
    with pytest.raises(WorkerDiedError):
        await model.drift_report()
    await model.close()  # reaps it; no error
    assert exits == [model], "the owner hears about one death once"


@pytest.mark.parametrize("kind", [WorkerHandle, LocalHandle])
async def test_overlapping_calls_are_answered_in_order_each_from_its_own_slot(
    kind: type[WorkerHandle] | type[LocalHandle], tiny_artifact_dir: Path, tiny_artifact: Artifact, test_images
) -> None:  # type: ignore[no-untyped-def]
    x = test_images[0][:48, None].astype(np.float32)
    model: ModelHandle = await kind.start(replace(_config(tiny_artifact_dir), slots=2))
    try:
        parts = [x[i : i + 8] for i in range(0, 48, 8)]
        # six calls at once over two slots: each waits for a free slot, none reads another's pixels
        results = await asyncio.gather(*(model.predict([p]) for p in parts))
        np.testing.assert_allclose(np.concatenate(results), direct_probabilities(tiny_artifact, x), atol=1e-6)
        cancelled = asyncio.create_task(model.predict([x[:16]]))  # a caller that goes away mid-call
        await asyncio.sleep(0)
        cancelled.cancel()
        again = await model.predict([x[16:24]])  # its reply is not taken for this call's
        np.testing.assert_allclose(again, direct_probabilities(tiny_artifact, x[16:24]), atol=1e-6)
        report = await model.drift_report()
        assert report is not None and report.images_seen + report.images_unmonitored >= 56
    finally:
        await model.close()


def test_a_worker_whose_server_stopped_while_it_started_exits_quietly(tmp_path: Path) -> None:
    """A server shut down during startup removes the shared region before the worker maps it: the worker leaves
    with a log line, not a traceback, and sends nothing."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    worker = ctx.Process(target=run_worker, args=(child, str(tmp_path / "gone"), _config(tmp_path)))
    worker.start()
    worker.join(60)
    assert worker.exitcode == 0, "an uncaught exception exits 1"
    assert not parent.poll()
