"""The predictor's drift bookkeeping: the window must not depend on how requests were batched, or on the engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.artifact import load_artifact
from service.inference.predictor import Predictor
from service.inference.sampling import IDLE_GAP, SHARE_HORIZON, DriftSampler


def _window(report) -> list[tuple[str, float | None]]:  # type: ignore[no-untyped-def]
    return [(layer.name, layer.score) for layer in report.layers]


def test_drift_window_is_the_same_for_any_batching_and_either_engine(tiny_artifact_dir: Path, test_images) -> None:  # type: ignore[no-untyped-def]
    images = test_images[0][:80, None]  # (80, 1, 28, 28)
    reference = Predictor(load_artifact(tiny_artifact_dir), drift_window=64, engine="torch")
    reference.predict(images)  # torch: moments in the recorder's hooks
    reports = [reference.drift_report()]
    for engine in ("onnxruntime", "torch"):
        one_batch = Predictor(load_artifact(tiny_artifact_dir), drift_window=64, engine=engine)
        singles = Predictor(load_artifact(tiny_artifact_dir), drift_window=64, engine=engine)
        mixed = Predictor(load_artifact(tiny_artifact_dir), drift_window=64, engine=engine)
        one_batch.predict(images)
        for i in range(80):
            singles.predict(images[i : i + 1])
        for lo, hi in ((0, 3), (3, 40), (40, 41), (41, 80)):
            mixed.predict(images[lo:hi])
        reports += [p.drift_report() for p in (one_batch, singles, mixed)]
    assert all(r is not None and r.images == 64 and r.images_seen == 80 for r in reports)
    expected = _window(reports[0])
    for report in reports[1:]:
        for (name, score), (exp_name, exp_score) in zip(_window(report), expected, strict=True):
            assert name == exp_name
            assert score is not None and exp_score is not None
            # onnxruntime sums each image's positions in its own order (float32, as torch does): 1e-7 relative
            np.testing.assert_allclose(score, exp_score, rtol=1e-5)


def test_a_report_counts_every_answered_image_and_a_reset_empties_the_window(
    tiny_artifact_dir: Path, test_images
) -> None:  # type: ignore[no-untyped-def]
    images = test_images[0][:, None]
    p = Predictor(load_artifact(tiny_artifact_dir), drift_window=16)
    for i in range(5):
        p.predict(images[i : i + 1])
    report = p.drift_report()
    assert report is not None and report.images_seen == report.images == 5
    p.predict(images[:3])
    p.reset_drift()
    after = p.drift_report()
    assert after is not None and after.images == 0


def test_without_monitoring_there_is_nothing_to_record(tiny_artifact_dir: Path, test_images) -> None:  # type: ignore[no-untyped-def]
    p = Predictor(load_artifact(tiny_artifact_dir), drift_window=None)
    assert p.predict(test_images[0][:2, None]).shape == (2, 10)
    p.reset_drift()
    assert p.drift_report() is None


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_window_that_is_not_full_sees_every_batch() -> None:
    clock = FakeClock()
    sampler = DriftSampler(0.05, clock=clock)
    for _ in range(50):  # back to back: no idle time, and far past the share
        assert sampler.decide(8, window_full=False)
        sampler.done(8, monitored=True)


def test_after_an_idle_gap_a_batch_is_monitored() -> None:
    clock = FakeClock()
    sampler = DriftSampler(0.05, clock=clock)
    sampler.done(32, monitored=True)
    assert not sampler.decide(32, window_full=True), "back to back, past its share: not monitored"
    clock.now += IDLE_GAP / 2
    assert not sampler.decide(32, window_full=True)
    clock.now += IDLE_GAP
    assert sampler.decide(32, window_full=True), "the worker had been idle: the drift work costs nothing"


@pytest.mark.parametrize("share", [0.02, 0.05, 0.25])
def test_under_saturating_load_the_monitored_share_holds_and_the_window_keeps_refreshing(share: float) -> None:
    clock = FakeClock()
    sampler = DriftSampler(share, clock=clock)
    monitored_images, gaps, since = 0, [], 0
    for i in range(20_000):
        clock.now += 0.0005  # busy: a batch starts as the last one ends
        monitored = sampler.decide(16, window_full=i > 0)
        sampler.done(16, monitored=monitored)
        monitored_images += 16 * monitored
        since = 0 if monitored else since + 1
        gaps.append(since)
    assert monitored_images / (16 * 20_000) == pytest.approx(share, rel=0.05)
    assert max(gaps[1000:]) <= round(1 / share) + 1, "monitored batches are spread evenly, never in long droughts"


def test_a_burst_monitored_while_idle_does_not_starve_the_window_later() -> None:
    clock = FakeClock()
    sampler = DriftSampler(0.05, clock=clock)
    for _ in range(200):  # light traffic: each batch after an idle gap, all monitored
        clock.now += 0.1
        sampler.decide(4, window_full=True)
        sampler.done(4, monitored=True)
    monitored = []
    for _ in range(2000):  # then saturating load
        clock.now += 0.0005
        m = sampler.decide(32, window_full=True)
        sampler.done(32, monitored=m)
        monitored.append(m)
    first = monitored.index(True)
    assert first * 32 < 2 * SHARE_HORIZON, "the share forgets the light spell within a couple of horizons"


def test_images_past_the_sample_go_unmonitored_and_are_counted(tiny_artifact_dir: Path, test_images) -> None:  # type: ignore[no-untyped-def]
    images = test_images[0][:, None]
    p = Predictor(load_artifact(tiny_artifact_dir), drift_window=16, drift_sample=0.05)
    for i in range(0, 512, 4):  # back to back: the worker is never idle for 10 ms
        p.predict(images[i : i + 4])
    report = p.drift_report()
    assert report is not None and report.images == 16
    assert report.images_unmonitored > 0
    assert report.images_seen + report.images_unmonitored == 512
    assert report.images_seen < 512 * 0.5, "past the full window, about 5 % of the images are monitored"


def test_with_a_full_share_every_image_is_monitored(tiny_artifact_dir: Path, test_images) -> None:  # type: ignore[no-untyped-def]
    images = test_images[0][:, None]
    p = Predictor(load_artifact(tiny_artifact_dir), drift_window=16, drift_sample=1.0)
    for i in range(0, 256, 4):
        p.predict(images[i : i + 4])
    report = p.drift_report()
    assert report is not None and (report.images_seen, report.images_unmonitored) == (256, 0)
