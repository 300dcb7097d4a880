"""The predictor's drift bookkeeping: the window must not depend on how requests were batched, or on the engine."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from service.predictor import (
    PLAIN_REFRESH,
    PLAIN_REFRESH_BATCHES,
    PLAIN_SAMPLES,
    DriftBudget,
    PlainPassTimes,
    Predictor,
)


def _window(report) -> list[tuple[str, float | None]]:  # type: ignore[no-untyped-def]
    return [(layer.name, layer.score) for layer in report.layers]


def test_drift_window_is_the_same_for_any_batching_and_either_engine(tiny_artifact_dir: Path, test_images) -> None:  # type: ignore[no-untyped-def]
    images = test_images[0][:80, None]  # (80, 1, 28, 28)
    reference = Predictor.load(tiny_artifact_dir, drift_window=64, engine="torch")
    reference.predict(images)  # torch: moments in the recorder's hooks
    reports = [reference.drift_report()]
    for engine in ("onnxruntime", "torch"):
        one_batch = Predictor.load(tiny_artifact_dir, drift_window=64, engine=engine)
        singles = Predictor.load(tiny_artifact_dir, drift_window=64, engine=engine)
        mixed = Predictor.load(tiny_artifact_dir, drift_window=64, engine=engine)
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
    p = Predictor.load(tiny_artifact_dir, drift_window=16)
    for i in range(5):
        p.predict(images[i : i + 1])
    report = p.drift_report()
    assert report is not None and report.images_seen == report.images == 5
    p.predict(images[:3])
    p.reset_drift()
    after = p.drift_report()
    assert after is not None and after.images == 0


def test_without_monitoring_there_is_nothing_to_record(tiny_artifact_dir: Path, test_images) -> None:  # type: ignore[no-untyped-def]
    p = Predictor.load(tiny_artifact_dir, drift_window=None)
    assert p.predict(test_images[0][:2, None]).shape == (2, 10)
    p.reset_drift()
    assert p.drift_report() is None


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_drift_budget_keeps_drift_work_within_its_fraction_of_wall_clock_time() -> None:
    clock = FakeClock()
    budget = DriftBudget(0.1, clock=clock)
    start, drift, monitored = clock.now, 0.0, 0
    for _ in range(1000):  # back to back: a batch every 10 ms; monitoring one takes 3 ms (30 %, over the 10 % budget)
        if budget.allows():
            monitored += 1
            budget.spend(0.003)
            drift += 0.003
        clock.now += 0.010
    assert drift <= 0.1 * (clock.now - start) + 0.1 + 0.003, "its fraction, the credit it started with, one batch"
    assert 330 <= monitored <= 370, "and it spends what it earns: about a third of the batches are monitored"


def test_drift_budget_monitors_everything_at_low_traffic_and_caps_the_credit_of_a_quiet_spell() -> None:
    clock = FakeClock()
    budget = DriftBudget(0.02, clock=clock)  # 2 % of 1 s banked at most: 20 ms
    for _ in range(100):  # one batch every 200 ms costing 3 ms: 1.5 % of the time, within the budget
        assert budget.allows()
        budget.spend(0.003)
        clock.now += 0.200
    clock.now += 3600.0  # an hour idle banks no more than the cap
    burst = 0
    while budget.allows():
        budget.spend(0.003)
        burst += 1
    assert burst == 7, "20 ms of credit pays for 7 batches of 3 ms, then the burst is sampled"
    assert DriftBudget(1.0).unlimited and DriftBudget(1.0).allows()
    with pytest.raises(ValueError, match="drift budget"):
        DriftBudget(0.0)


def test_past_the_budget_images_go_unmonitored_and_are_counted(tiny_artifact_dir: Path, test_images) -> None:  # type: ignore[no-untyped-def]
    images = test_images[0][:, None]
    p = Predictor.load(tiny_artifact_dir, drift_window=16, drift_budget=0.001)  # 1 ms of credit, then 0.1 %
    served = 0
    for n in (32, 32, 32, 4, 4, 4, 32, 1) * 3:  # back to back
        probs = p.predict(images[:n])
        np.testing.assert_allclose(probs, p.predict(images[:n]), atol=1e-6)  # answers never change
        served += 2 * n
    report = p.drift_report()
    assert report is not None
    assert report.images_unmonitored > 0, "a 0.1 % budget cannot pay for every batch's moments"
    assert report.images_seen + report.images_unmonitored == served
    assert report.to_dict()["images_unmonitored"] == report.images_unmonitored


def test_at_low_traffic_or_with_a_full_budget_every_image_is_monitored(tiny_artifact_dir: Path, test_images) -> None:  # type: ignore[no-untyped-def]
    images = test_images[0][:, None]
    spaced = Predictor.load(tiny_artifact_dir, drift_window=16, drift_budget=0.2)
    unlimited = Predictor.load(tiny_artifact_dir, drift_window=16, drift_budget=1.0)
    for n in (32, 4, 32, 1):
        spaced.predict(images[:n])
        time.sleep(0.1)  # earns 20 ms: far more than the tiny model's moments of 32 images take
        for _ in range(20):  # back to back
            unlimited.predict(images[:n])
    for p, served in ((spaced, 69), (unlimited, 20 * 69)):
        report = p.drift_report()
        assert report is not None and (report.images_seen, report.images_unmonitored) == (served, 0)


def test_a_monitored_pass_is_charged_what_it_took_beyond_a_plain_one(tiny_artifact_dir: Path, test_images) -> None:  # type: ignore[no-untyped-def]
    """The drift work of a batch is what its monitored pass took beyond a plain pass of its size, and the update."""
    images = test_images[0][:4, None]
    p = Predictor.load(tiny_artifact_dir, drift_window=16, drift_budget=1e-3)
    full = p._budget.balance  # the 1-s cap: 1 ms of drift work

    def monitored_pass_charges(usual: float | None, images_measured: int = 4) -> float:
        if usual is not None:
            p._plain_times = PlainPassTimes()
            p._plain_times.add(images_measured, usual, time.perf_counter())
        p._budget.balance = full
        p.predict(images)
        return full - p._budget.balance  # credit earned meanwhile is capped at `full`: only charges show

    p._plain_times = PlainPassTimes()  # the warm-up's measures gone
    assert monitored_pass_charges(None) > 0, "no plain pass seen yet: the whole monitored pass counts"
    p._budget.balance = -1.0  # unmonitored: shows what a plain pass takes
    p.predict(images)
    assert p._plain_times.estimate(4) > 0
    assert monitored_pass_charges(0.0) > 0, "as if a plain pass took no time: the whole pass is drift work"
    assert monitored_pass_charges(1e9) == 0.0, "as if a plain pass took forever: monitoring added nothing"
    assert monitored_pass_charges(1e9, images_measured=2) == 0.0, "none of 4 images: one of 2, scaled, estimates it"


def test_the_measure_of_a_plain_pass_errs_low() -> None:
    """A plain pass slowed by the scheduler, a busy warm-up or a graph gone cold must not make monitored passes look
    cheap: the fastest of the last PLAIN_SAMPLES passes of a size."""
    times = PlainPassTimes()
    assert times.estimate(8) == 0.0 and times.measured_at(8) is None
    times.add(8, 1.0, now=100.0)  # a busy warm-up
    assert times.estimate(8) == 1.0
    times.add(8, 0.5, now=110.0)
    assert times.estimate(8) == 0.5, "a faster pass: the machine was busy before, not now"
    times.add(8, 3.0, now=111.0)
    assert times.estimate(8) == 0.5, "a slow one leaves it alone"
    assert times.estimate(16) == 1.0, "a size larger than any measured: the largest, scaled up"
    times.add(32, 1.6, now=111.5)
    assert times.estimate(16) == pytest.approx(0.8), "a size not measured: the next larger one, scaled down"
    for i in range(PLAIN_SAMPLES - 1):
        times.add(8, 0.75, now=112.0 + i)
    assert times.estimate(8) == 0.75, "the fastest of the last PLAIN_SAMPLES: 1.0 and 0.5 have left"
    assert times.measured_at(8) == 112.0 + PLAIN_SAMPLES - 2


def test_a_stale_measure_of_a_plain_pass_is_taken_again(tiny_artifact_dir: Path, test_images) -> None:  # type: ignore[no-untyped-def]
    """A plain pass measured while the machine was busy would make monitored passes look free, and with every batch
    then monitored, nothing would correct it: under sustained load, one batch per size and PLAIN_REFRESH seconds
    runs plain."""
    images = test_images[0][:4, None]
    p = Predictor.load(tiny_artifact_dir, drift_window=16, drift_budget=0.5)
    p._plain_times = PlainPassTimes()
    p._plain_times.add(4, 10.0, time.perf_counter())  # busy: 10 s for 4 images
    p.predict(images)
    assert p.images_unmonitored == 0, "a fresh measure, and budget to spare: monitored"
    p._plain_times = PlainPassTimes()
    p._plain_times.add(4, 10.0, time.perf_counter() - PLAIN_REFRESH - 1)
    p.predict(images)
    assert p.images_unmonitored == 0, "a stale measure, but a short burst: monitored"
    p._monitored_in_a_row[4] = PLAIN_REFRESH_BATCHES
    p.predict(images)
    assert p.images_unmonitored == 4, "a stale measure after many monitored batches: this batch runs plain"
    assert p._plain_times.estimate(4) < 1.0, "and the plain pass replaces the stale measure"
    p.predict(images)
    assert p.images_unmonitored == 4, "fresh again"
    p._since -= PLAIN_REFRESH + 1
    p._monitored_in_a_row[3] = PLAIN_REFRESH_BATCHES
    p.predict(images[:3])
    assert p.images_unmonitored == 7, "a size never measured, once the predictor has run PLAIN_REFRESH seconds"
    unlimited = Predictor.load(tiny_artifact_dir, drift_window=16, drift_budget=1.0)
    unlimited._since -= PLAIN_REFRESH + 1
    unlimited._monitored_in_a_row[4] = PLAIN_REFRESH_BATCHES
    unlimited.predict(images)
    assert unlimited.images_unmonitored == 0, "without a budget nothing is measured against"
