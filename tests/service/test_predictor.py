"""The predictor's drift bookkeeping: the window must not depend on how requests were batched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.predictor import DRIFT_CHUNK, DriftBudget, Predictor


def _window(report) -> list[tuple[str, float | None]]:  # type: ignore[no-untyped-def]
    return [(layer.name, layer.score) for layer in report.layers]


def test_drift_window_is_the_same_for_any_batching(tiny_artifact_dir: Path, test_images) -> None:  # type: ignore[no-untyped-def]
    images = test_images[0][:80, None]  # (80, 1, 28, 28)
    one_batch = Predictor.load(tiny_artifact_dir, drift_window=64)
    singles = Predictor.load(tiny_artifact_dir, drift_window=64)
    mixed = Predictor.load(tiny_artifact_dir, drift_window=64)
    one_batch.predict(images)  # moments in the hooks
    for i in range(80):  # moments deferred and computed per DRIFT_CHUNK images
        singles.predict(images[i : i + 1])
        singles.record_drift()
    for lo, hi in ((0, 3), (3, 40), (40, 41), (41, 80)):  # both kinds, interleaved
        mixed.predict(images[lo:hi])
        mixed.record_drift()
    reports = [p.drift_report() for p in (one_batch, singles, mixed)]
    assert all(r is not None and r.images == 64 and r.images_seen == 80 for r in reports)
    expected = _window(reports[0])
    for report in reports[1:]:
        for (name, score), (exp_name, exp_score) in zip(_window(report), expected, strict=True):
            assert name == exp_name
            assert score is not None and exp_score is not None
            np.testing.assert_allclose(score, exp_score, rtol=1e-6)


def test_a_report_counts_every_answered_image_and_a_reset_drops_the_pending_ones(
    tiny_artifact_dir: Path, test_images
) -> None:  # type: ignore[no-untyped-def]
    images = test_images[0][:, None]
    p = Predictor.load(tiny_artifact_dir, drift_window=16)
    for i in range(DRIFT_CHUNK // 4):  # fewer than a chunk: none folded in yet by record_drift
        p.predict(images[i : i + 1])
        p.record_drift()
    report = p.drift_report()
    assert report is not None and report.images_seen == DRIFT_CHUNK // 4
    p.predict(images[:3])
    p.reset_drift()
    after = p.drift_report()
    assert after is not None and after.images == 0


def test_without_monitoring_there_is_nothing_to_record(tiny_artifact_dir: Path, test_images) -> None:  # type: ignore[no-untyped-def]
    p = Predictor.load(tiny_artifact_dir, drift_window=None)
    assert p.predict(test_images[0][:2, None]).shape == (2, 10)
    p.record_drift()
    p.reset_drift()
    assert p.drift_report() is None


def test_drift_budget_keeps_drift_time_within_its_fraction_of_forward_time() -> None:
    budget = DriftBudget(0.1)
    forward, drift, monitored = 0.0, 0.0, 0
    for _ in range(1000):  # batches of 10 ms forward; monitoring one costs 3 ms (30 %, over the 10 % budget)
        if budget.allows():
            monitored += 1
            budget.account(0.010, 0.003)
            drift += 0.003
        else:
            budget.account(0.010, 0.0)
        forward += 0.010
    assert drift <= 0.1 * forward + 0.003, "within the fraction, give or take one batch"
    assert monitored >= 320, "and it spends what it earns: about a third of the batches are monitored"
    assert DriftBudget(1.0).unlimited
    with pytest.raises(ValueError, match="drift budget"):
        DriftBudget(0.0)


def test_under_load_past_the_budget_images_go_unmonitored_and_are_counted(tiny_artifact_dir: Path, test_images) -> None:  # type: ignore[no-untyped-def]
    images = test_images[0][:, None]
    p = Predictor.load(tiny_artifact_dir, drift_window=16, drift_budget=0.001)
    served = 0
    for n in (32, 32, 32, 4, 4, 4, 32, 1):  # inline and deferred batches
        probs = p.predict(images[:n], under_load=True)
        np.testing.assert_allclose(probs, p.predict(images[:n]), atol=1e-6)  # answers never change
        p.record_drift()
        served += 2 * n
    report = p.drift_report()
    assert report is not None
    assert report.images_unmonitored > 0, "a 0.1 % budget cannot pay for every batch's moments"
    assert report.images_seen + report.images_unmonitored == served
    assert report.to_dict()["images_unmonitored"] == report.images_unmonitored


def test_without_load_or_with_a_full_budget_every_image_is_monitored(tiny_artifact_dir: Path, test_images) -> None:  # type: ignore[no-untyped-def]
    images = test_images[0][:, None]
    idle = Predictor.load(tiny_artifact_dir, drift_window=16, drift_budget=0.001)
    unlimited = Predictor.load(tiny_artifact_dir, drift_window=16, drift_budget=1.0)
    for n in (32, 4, 32, 1):
        idle.predict(images[:n])
        unlimited.predict(images[:n], under_load=True)
    for p in (idle, unlimited):
        report = p.drift_report()
        assert report is not None and (report.images_seen, report.images_unmonitored) == (69, 0)
