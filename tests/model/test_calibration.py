"""Tests for model/calibration.py: threshold interpolation, serialisation, and calibrated false-alarm rates."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from model.bnstats import LayerReference, Moments, window_scores
from model.calibration import CALIBRATION_WINDOWS, Calibration, calibrate, random_windows

SIZES = (16, 64, 256)


def table(**overrides: object) -> Calibration:
    kwargs: dict[str, object] = {
        "window_sizes": SIZES,
        "quantile": 0.99,
        "windows_per_size": 500,
        "layer_thresholds": {"a": (0.1, 0.02, 0.004), "b": (0.3, 0.3, 0.1)},
        "model_thresholds": (1.5, 1.3, 1.2),
        "null_score_median": {"a": (0.05, 0.01, 0.002), "b": (0.1, 0.1, 0.05)},
    }
    kwargs.update(overrides)
    return Calibration(**kwargs)  # type: ignore[arg-type]


# --- interpolation ---


def test_threshold_is_exact_at_calibrated_window_sizes() -> None:
    cal = table()
    for i, w in enumerate(SIZES):
        for layer, row in cal.layer_thresholds.items():
            assert cal.layer_threshold(layer, w) == pytest.approx(row[i], rel=1e-12)
        assert cal.model_threshold(w) == pytest.approx(cal.model_thresholds[i], rel=1e-12)


def test_threshold_interpolates_in_log_log_and_is_monotone_between() -> None:
    cal = table()
    # geometric midpoint of 16 and 64 is 32: log-log linear gives the geometric mean of the thresholds
    assert cal.layer_threshold("a", 32) == pytest.approx(np.sqrt(0.1 * 0.02), rel=1e-12)
    assert cal.model_threshold(128) == pytest.approx(np.sqrt(1.3 * 1.2), rel=1e-12)
    a = [cal.layer_threshold("a", w) for w in range(16, 257)]
    assert all(x > y for x, y in itertools.pairwise(a))  # strictly decreasing row → strictly decreasing
    b = [cal.layer_threshold("b", w) for w in range(16, 257)]
    assert all(x >= y for x, y in itertools.pairwise(b))
    assert b[:49] == pytest.approx([0.3] * 49, rel=1e-12)  # flat segment stays flat
    for w in range(17, 64):
        assert 0.02 < cal.layer_threshold("a", w) < 0.1
    rising = table(model_thresholds=(1.0, 2.0, 4.0))
    m = [rising.model_threshold(w) for w in range(16, 257)]
    assert all(x < y for x, y in itertools.pairwise(m))


def test_power_law_thresholds_are_interpolated_exactly() -> None:
    """Null scores fall like 1/W; a c/W row is a straight line in log-log, so any W in range is exact."""
    cal = table(layer_thresholds={"a": tuple(3.0 / w for w in SIZES), "b": (1.0, 1.0, 1.0)})
    for w in (17, 50, 100, 200, 255):
        assert cal.layer_threshold("a", w) == pytest.approx(3.0 / w, rel=1e-12)


@pytest.mark.parametrize("w", [15, 1, 0, -3])
def test_window_below_smallest_calibrated_raises(w: int) -> None:
    cal = table()
    with pytest.raises(ValueError, match="below the smallest calibrated window"):
        cal.layer_threshold("a", w)
    with pytest.raises(ValueError, match="below the smallest calibrated window"):
        cal.model_threshold(w)
    with pytest.raises(ValueError, match=f"window size {w} is below"):
        cal.check_window(w)


@pytest.mark.parametrize("w", [257, 1000, 65536])
def test_window_above_largest_uses_largest(w: int) -> None:
    cal = table()
    assert cal.layer_threshold("a", w) == pytest.approx(0.004, rel=1e-12)
    assert cal.layer_threshold("b", w) == pytest.approx(0.1, rel=1e-12)
    assert cal.model_threshold(w) == pytest.approx(1.2, rel=1e-12)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"window_sizes": ()}, "window_sizes must be non-empty"),
        ({"window_sizes": (64, 16, 256)}, "unique and increasing"),
        ({"window_sizes": (16, 16, 256)}, "unique and increasing"),
        ({"model_thresholds": (1.0, 1.0)}, "one value per window size"),
        ({"layer_thresholds": {"a": (0.1, 0.02)}}, "one value per window size"),
        ({"quantile": 0.5}, "quantile must be in"),
        ({"quantile": 1.0}, "quantile must be in"),
    ],
)
def test_inconsistent_tables_are_rejected(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        table(**overrides)


def test_to_dict_from_dict_round_trip_through_json() -> None:
    cal = table()
    data = json.loads(json.dumps(cal.to_dict()))
    back = Calibration.from_dict(data)
    assert back == cal
    assert back.layer_threshold("a", 100) == cal.layer_threshold("a", 100)
    assert data["window_sizes"] == list(SIZES)
    assert data["quantile"] == 0.99
    older = {k: v for k, v in data.items() if k != "null_score_median"}  # an artifact without medians
    assert Calibration.from_dict(older).null_score_median == {}


# --- random windows ---


def test_random_windows_are_distinct_indices_in_range() -> None:
    w = random_windows(100, 30, 50, np.random.default_rng(0))
    assert w.shape == (50, 30)
    assert w.min() >= 0
    assert w.max() < 100
    assert all(len(set(row)) == 30 for row in w)
    assert len({tuple(row) for row in w}) == 50
    with pytest.raises(ValueError, match="larger than"):
        random_windows(10, 11, 1, np.random.default_rng(0))


# --- calibrate() on synthetic null moments ---


def null_moments(
    n_images: int, refs: dict[str, LayerReference], per_image: dict[str, int], rng: np.random.Generator
) -> dict[str, Moments]:
    """Per-image moments of images whose BN inputs are i.i.d. N(μ_r, σ²_r): the null hypothesis exactly."""
    out = {}
    for name, ref in refs.items():
        z = rng.standard_normal((n_images, ref.channels, per_image[name])) * np.sqrt(ref.var)[:, None]  # x − μ_r
        out[name] = Moments(z.sum(axis=2), (z**2).sum(axis=2), per_image[name])
    return out


REFS = {
    "conv": LayerReference("conv", mean=np.linspace(-1, 1, 4), var=np.linspace(0.5, 2, 4), eps=1e-5),
    "head": LayerReference("head", mean=np.zeros(6), var=np.linspace(0.1, 3, 6), eps=1e-5),
}
PER_IMAGE = {"conv": 9, "head": 1}


@pytest.fixture(scope="module")
def null_calibration() -> Calibration:
    moments = null_moments(20_000, REFS, PER_IMAGE, np.random.default_rng(11))
    return calibrate(moments, REFS, window_sizes=(16, 32, 64), windows_per_size=2000, quantile=0.95, seed=3)


def test_calibrate_table_shape_and_null_levels(null_calibration: Calibration) -> None:
    cal = null_calibration
    assert cal.window_sizes == (16, 32, 64)
    assert cal.quantile == 0.95
    assert cal.windows_per_size == 2000
    assert set(cal.layer_thresholds) == set(cal.null_score_median) == set(REFS)
    for name in REFS:
        n = np.array(cal.window_sizes) * PER_IMAGE[name]
        median = np.array(cal.null_score_median[name])
        # E[KL] ≈ 1/n per channel; the median of the mean over a few channels sits a little below it
        assert np.all((0.5 / n < median) & (median < 1.2 / n)), (name, median * n)
        thr = np.array(cal.layer_thresholds[name])
        assert np.all(thr > median)
        assert np.all(np.diff(thr) < 0)
    assert all(t > 1.0 for t in cal.model_thresholds)  # max of two ratios exceeds 1 more often than either


def test_calibrated_false_alarm_rates_hold_on_fresh_null_windows(null_calibration: Calibration) -> None:
    """Fresh images from the null: each layer, and the whole model, alarm in ≈ 1 − quantile of windows."""
    cal = null_calibration
    rng = np.random.default_rng(12345)  # independent of the calibration draws
    k = 4000  # windows per size: binomial sd of a 5% rate is 0.34%; the threshold's own error adds ~0.5%
    model_alarms, any_layer_alarms = [], []
    for w in cal.window_sizes:
        fresh = null_moments(k * w, REFS, PER_IMAGE, rng)
        windows = np.arange(k * w).reshape(k, w)  # disjoint windows of never-seen images
        scores = window_scores(fresh, REFS, windows)
        for name in REFS:
            layer_rate = np.mean(scores[name] > cal.layer_threshold(name, w))
            assert layer_rate == pytest.approx(0.05, abs=0.025), (name, w, layer_rate)
        stat = cal.model_statistic(scores, w)
        np.testing.assert_allclose(stat, np.maximum(*(scores[n] / cal.layer_threshold(n, w) for n in REFS)), rtol=1e-12)
        model_alarms.append(stat > cal.model_threshold(w))
        any_layer_alarms.append(stat > 1.0)
        assert np.mean(model_alarms[-1]) == pytest.approx(0.05, abs=0.025), (w, np.mean(model_alarms[-1]))
    model_rate = np.mean(model_alarms)
    assert model_rate == pytest.approx(0.05, abs=0.015)  # 12000 windows: ~3 sd
    # without the whole-model threshold, "any layer over its threshold" would alarm about 1 − 0.95² ≈ 9.75%
    assert np.mean(any_layer_alarms) > 0.08


def test_calibrated_thresholds_detect_a_shift(null_calibration: Calibration) -> None:
    cal = null_calibration
    rng = np.random.default_rng(7)
    shifted = null_moments(64 * 200, REFS, PER_IMAGE, rng)
    sd = np.sqrt(REFS["head"].var + REFS["head"].eps)
    head, a = shifted["head"], 0.5 * sd  # every head element (per_image = 1) moves by 0.5 σ: Σ(z + a)²
    shifted["head"] = Moments(head.s1 + a, head.s2 + 2 * a * head.s1 + a**2, head.per_image)
    scores = window_scores(shifted, REFS, np.arange(64 * 200).reshape(200, 64))
    assert np.all(cal.model_statistic(scores, 64) > cal.model_threshold(64))


def test_calibrate_rejects_too_few_windows() -> None:
    moments = null_moments(300, REFS, PER_IMAGE, np.random.default_rng(0))
    with pytest.raises(ValueError, match="windows_per_size"):
        calibrate(moments, REFS, window_sizes=(16,), windows_per_size=199)
    cal = calibrate(moments, REFS, window_sizes=(16, 32), windows_per_size=200)
    assert cal.windows_per_size == 200
    assert len(cal.model_thresholds) == 2


def test_calibrate_is_deterministic_for_a_seed() -> None:
    moments = null_moments(500, REFS, PER_IMAGE, np.random.default_rng(1))
    a = calibrate(moments, REFS, window_sizes=(16, 32), windows_per_size=200, seed=5)
    b = calibrate(moments, REFS, window_sizes=(16, 32), windows_per_size=200, seed=5)
    c = calibrate(moments, REFS, window_sizes=(16, 32), windows_per_size=200, seed=6)
    assert a == b
    assert a != c


def test_default_window_sizes_match_design() -> None:
    assert CALIBRATION_WINDOWS == (16, 32, 64, 128, 256, 512, 1024)
