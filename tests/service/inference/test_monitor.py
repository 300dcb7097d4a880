"""Tests for service/drift.py: the DriftMonitor's window against a plain numpy reference, its states and its locking."""

from __future__ import annotations

import json
import sys
import threading

import numpy as np
import pytest
import torch

from model.bnstats import BnStatsRecorder, LayerReference, Moments, per_image_moments
from model.calibration import Calibration
from model.net import NetConfig, bn_layers, build_net
from service.drift_report import DriftReport
from service.inference.monitor import DriftMonitor
from tests.reference import reference_drift

SIZES = (16, 32, 64, 128)


def calibration_for(layers: list[str], model: tuple[float, ...] = (1.2, 1.1, 1.0, 1.0)) -> Calibration:
    """Thresholds c / W (null scores fall like 1/W), well above the null level of the data used here."""
    return Calibration(
        window_sizes=SIZES,
        quantile=0.99,
        windows_per_size=500,
        layer_thresholds={name: tuple(5.0 / w for w in SIZES) for name in layers},
        model_thresholds=model,
    )


REFS = {
    "conv": LayerReference("conv", mean=np.linspace(-2, 2, 5), var=np.linspace(0.3, 3, 5), eps=1e-5),
    "head": LayerReference("head", mean=np.linspace(1, 0, 8), var=np.linspace(2, 0.1, 8), eps=1e-3),
}
SHAPES = {"conv": (5, 3, 3), "head": (8,)}  # per-image shapes: (C, H, W) and (C,)


def raw_stream(n: int, rng: np.random.Generator, shift: float = 0.0) -> dict[str, np.ndarray]:
    """n images of raw BN inputs near the references; `shift` moves the head layer by that many σ_r."""
    out = {}
    for name, ref in REFS.items():
        shape = (n, *SHAPES[name])
        b = (1, ref.channels) + (1,) * (len(shape) - 2)
        mean = ref.mean + 0.05 * np.sqrt(ref.var) * np.arange(ref.channels)
        if name == "head":
            mean = mean + shift * np.sqrt(ref.var + ref.eps)
        out[name] = mean.reshape(b) + np.sqrt(ref.var).reshape(b) * rng.standard_normal(shape)
    return out


def moments_of(raw: dict[str, np.ndarray], lo: int, hi: int) -> dict[str, Moments]:
    return {
        name: per_image_moments(torch.from_numpy(x[lo:hi]), torch.from_numpy(REFS[name].mean))
        for name, x in raw.items()
    }


def push(monitor: DriftMonitor, raw: dict[str, np.ndarray], sizes: list[int]) -> None:
    """Feed the stream in forward batches of the given sizes, in order."""
    lo = 0
    for n in sizes:
        monitor.update(moments_of(raw, lo, lo + n))
        lo += n
    assert lo == next(iter(raw.values())).shape[0]


def assert_report_matches(
    report: DriftReport,
    monitor: DriftMonitor,
    window_raw: dict[str, np.ndarray],
    refs: dict[str, LayerReference],
    rtol: float = 1e-9,
) -> None:
    """Every number in the report equals the reference computed on exactly these raw window inputs."""
    w = monitor.window
    assert report.images == w
    assert report.window == w
    assert report.status in ("ok", "drift")
    ratios = []
    for layer in report.layers:
        ref = refs[layer.name]
        x = window_raw[layer.name]
        assert x.shape[0] == w
        d, r, kl = reference_drift(x, ref.mean, ref.var, ref.eps)
        assert layer.images == w
        assert layer.score == pytest.approx(kl.mean(), rel=rtol)
        assert layer.mean_shift_rms == pytest.approx(np.sqrt(np.mean(d**2)), rel=rtol)
        assert layer.log_var_ratio_mean_abs == pytest.approx(np.mean(np.abs(r)), rel=rtol)
        assert layer.threshold == pytest.approx(monitor.calibration.layer_threshold(layer.name, w), rel=1e-12)
        assert layer.ratio == pytest.approx(layer.score / layer.threshold, rel=1e-12)
        assert layer.status == ("drift" if layer.score > layer.threshold else "ok")
        top = layer.top_channels
        assert len(top) == min(monitor.top_channels, ref.channels)
        kth = np.sort(kl)[::-1][len(top) - 1] if top else 0.0
        if rtol <= 1e-9:
            assert [t["channel"] for t in top] == list(np.argsort(-kl)[: len(top)])
        else:  # float32 activations: near-ties may swap, but the channels must be the top ones
            assert all(kl[int(t["channel"])] >= kth * (1 - 1e-4) for t in top)
        assert [t["kl"] for t in top] == sorted((t["kl"] for t in top), reverse=True)
        for t in top:
            c = int(t["channel"])
            assert t["kl"] == pytest.approx(kl[c], rel=rtol)
            assert t["mean_shift"] == pytest.approx(d[c], rel=rtol, abs=1e-12 if rtol <= 1e-9 else 1e-8)
            assert t["log_var_ratio"] == pytest.approx(r[c], rel=rtol, abs=1e-12 if rtol <= 1e-9 else 1e-8)
        ratios.append(layer.ratio)
    assert report.model_statistic == pytest.approx(max(ratios), rel=1e-12)
    assert report.model_threshold == pytest.approx(monitor.calibration.model_threshold(w), rel=1e-12)
    assert report.status == ("drift" if report.model_statistic > report.model_threshold else "ok")


# --- the window is exactly the last W images ---


@pytest.mark.parametrize(
    "sizes",
    [
        [7, 13, 30],  # exactly W over several forward batches
        [7, 13, 30, 11, 4, 29],  # more than W: the oldest are evicted
        [130],  # one batch larger than W
        [20, 130],  # a batch larger than W when the ring head is not at 0
        [20, 130, 7, 3],  # ... and the batches after it evict the oldest of those
        [49, 1, 1],
        [3] * 40,  # many small batches, the ring wraps more than twice
        [50, 50, 50],
    ],
    ids=lambda s: "+".join(map(str, s)) if len(s) < 8 else f"{len(s)}x{s[0]}",
)
def test_report_equals_reference_on_exactly_the_last_w_images(sizes: list[int]) -> None:
    w = 50
    raw = raw_stream(sum(sizes), np.random.default_rng(len(sizes) + sum(sizes)))
    monitor = DriftMonitor(REFS, calibration_for(list(REFS)), window=w, top_channels=3)
    push(monitor, raw, sizes)
    report = monitor.report()
    assert report.images_seen == sum(sizes)
    assert_report_matches(report, monitor, {k: x[-w:] for k, x in raw.items()}, REFS)
    # and not on any other 50 consecutive images
    other = monitor.report().layers[1].score
    older = reference_drift(raw["head"][-w - 1 : -1], REFS["head"].mean, REFS["head"].var, REFS["head"].eps)[2]
    if sum(sizes) > w:
        assert other != pytest.approx(older.mean(), rel=1e-9)


def small_net() -> torch.nn.Module:
    """A small bn-cnn in eval mode with randomised running statistics."""
    torch.manual_seed(0)
    net = build_net(NetConfig(conv_channels=(4, 8), hidden=16, dropout=0.0)).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn in bn_layers(net).values():
            bn.running_mean.copy_(0.3 * torch.randn(bn.num_features, generator=gen))
            bn.running_var.copy_(0.5 + torch.rand(bn.num_features, generator=gen))
    return net


def test_monitor_fed_by_a_real_net_matches_reference_on_raw_bn_inputs() -> None:
    net = small_net()
    recorder = BnStatsRecorder(net)
    raw: dict[str, list[np.ndarray]] = {}

    def keep(name: str):  # type: ignore[no-untyped-def]
        def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            raw.setdefault(name, []).append(args[0].detach().double().numpy().copy())

        return hook

    handles = [bn.register_forward_pre_hook(keep(name)) for name, bn in bn_layers(net).items()]
    monitor = DriftMonitor(recorder.references, calibration_for(list(recorder.references)), window=50)
    rng = np.random.default_rng(2)
    with torch.inference_mode():
        for n in (7, 13, 30, 20):
            with recorder.capture() as moments:
                net(torch.from_numpy(rng.random((n, 1, 28, 28), dtype=np.float32)))
            monitor.update(moments)
    for h in handles:
        h.remove()
    window_raw = {name: np.concatenate(parts)[-50:] for name, parts in raw.items()}
    assert window_raw["features.0.1"].ndim == 4
    assert window_raw["head.2"].ndim == 2
    report = monitor.report()
    assert report.images_seen == 70
    assert_report_matches(report, monitor, window_raw, recorder.references, rtol=1e-5)  # float32 activations


# --- states ---


def test_warming_up_until_full_then_ok_or_drift() -> None:
    w = 50
    cal = calibration_for(list(REFS))
    monitor = DriftMonitor(REFS, cal, window=w)
    rng = np.random.default_rng(3)
    null = raw_stream(w, rng)

    empty = monitor.report()
    assert empty.status == "warming_up"
    assert empty.images == 0
    assert empty.warming_up

    push(monitor, {k: x[: w - 1] for k, x in null.items()}, [20, 29])
    report = monitor.report()
    assert report.status == "warming_up"
    assert report.warming_up
    assert report.model_statistic is None
    assert report.images == w - 1
    assert report.images_seen == w - 1
    assert report.model_threshold == pytest.approx(cal.model_threshold(w))
    for layer in report.layers:
        assert layer.status == "warming_up"
        assert layer.score is None
        assert layer.ratio is None
        assert layer.images == w - 1
        assert layer.top_channels == []
        assert layer.threshold == pytest.approx(cal.layer_threshold(layer.name, w))
    body = json.loads(json.dumps(report.to_dict()))
    assert body["status"] == "warming_up"
    assert body["whole_model"]["statistic"] is None
    assert all(layer["score"] is None and layer["ratio"] is None for layer in body["layers"])

    monitor.update(moments_of(null, w - 1, w))
    report = monitor.report()
    assert report.status == "ok"
    assert not report.warming_up
    assert [layer.status for layer in report.layers] == ["ok", "ok"]
    assert report.model_statistic is not None
    assert report.model_statistic < 0.5 * report.model_threshold

    shifted = raw_stream(w, rng, shift=1.0)  # the head layer's mean moves by 1 σ
    push(monitor, shifted, [25, 25])
    report = monitor.report()
    assert report.status == "drift"
    by_name = {layer.name: layer for layer in report.layers}
    assert by_name["head"].status == "drift"
    assert by_name["conv"].status == "ok"
    assert by_name["head"].ratio is not None
    assert by_name["head"].ratio > 3.0
    assert report.model_statistic == pytest.approx(by_name["head"].ratio)
    assert_report_matches(report, monitor, shifted, REFS)

    body = json.loads(json.dumps(report.to_dict()))
    assert body["status"] == "drift"
    assert body["window"] == w
    assert body["window_images"] == w
    assert body["images_seen"] == 2 * w
    assert [layer["layer"] for layer in body["layers"]] == ["conv", "head"]
    assert body["layers"][1]["ratio"] == pytest.approx(body["layers"][1]["score"] / body["layers"][1]["threshold"])
    assert body["layers"][1]["top_channels"][0]["kl"] == max(t["kl"] for t in body["layers"][1]["top_channels"])

    push(monitor, raw_stream(w, rng), [w])  # clean traffic evicts the shifted images entirely
    assert monitor.report().status == "ok"


def test_reset_starts_a_new_window_that_warms_up_again() -> None:
    w = 32
    monitor = DriftMonitor(REFS, calibration_for(list(REFS)), window=w)
    rng = np.random.default_rng(4)
    push(monitor, raw_stream(45, rng, shift=2.0), [45])
    assert monitor.report().status == "drift"
    monitor.reset()
    report = monitor.report()
    assert report.status == "warming_up"
    assert report.images == 0
    assert all(layer.score is None for layer in report.layers)
    fresh = raw_stream(w, rng)
    push(monitor, {k: x[:10] for k, x in fresh.items()}, [10])
    assert monitor.report().status == "warming_up"
    assert monitor.report().images == 10
    push(monitor, {k: x[10:] for k, x in fresh.items()}, [w - 10])
    report = monitor.report()
    assert report.status == "ok"
    assert_report_matches(report, monitor, fresh, REFS)  # nothing of the drifted traffic is left


def test_empty_batch_changes_nothing() -> None:
    monitor = DriftMonitor(REFS, calibration_for(list(REFS)), window=16)
    raw = raw_stream(16, np.random.default_rng(5))
    push(monitor, raw, [16])
    before = monitor.report()
    monitor.update(moments_of(raw, 0, 0))
    after = monitor.report()
    assert after.images_seen == before.images_seen == 16
    assert [layer.score for layer in after.layers] == [layer.score for layer in before.layers]


# --- construction ---


def test_monitor_validates_its_window_and_calibration() -> None:
    cal = calibration_for(list(REFS))
    with pytest.raises(ValueError, match="window must be > 0"):
        DriftMonitor(REFS, cal, window=0)
    with pytest.raises(ValueError, match="below the smallest calibrated window"):
        DriftMonitor(REFS, cal, window=15)
    with pytest.raises(ValueError, match="no thresholds for layers"):
        DriftMonitor(REFS, calibration_for(["conv"]), window=16)
    big = DriftMonitor(REFS, cal, window=1000)  # above the largest calibrated W: the largest W's thresholds
    assert big.report().model_threshold == pytest.approx(cal.model_threshold(128))


# --- memory and threads ---


def test_ring_memory_is_bounded() -> None:
    w = 64
    monitor = DriftMonitor(REFS, calibration_for(list(REFS)), window=w)
    rings = {name: (monitor._s1[name], monitor._s2[name]) for name in REFS}
    expected = {name: (w, ref.channels) for name, ref in REFS.items()}
    raw = raw_stream(10_000 + 777, np.random.default_rng(6))
    one = moments_of(raw, 0, 10_000)  # per-image moments, pushed one image at a time
    for i in range(10_000):
        monitor.update({name: Moments(m.s1[i : i + 1], m.s2[i : i + 1], m.per_image) for name, m in one.items()})
    push(monitor, {k: x[10_000:] for k, x in raw.items()}, [777])  # and one batch much larger than the window
    for name in REFS:
        s1, s2 = monitor._s1[name], monitor._s2[name]
        assert s1 is rings[name][0]
        assert s2 is rings[name][1]
        assert s1.shape == s2.shape == expected[name]
        assert s1.nbytes == s2.nbytes == w * REFS[name].channels * 8
    report = monitor.report()
    assert report.images_seen == 10_777
    assert report.images == w
    assert_report_matches(report, monitor, {k: x[-w:] for k, x in raw.items()}, REFS)


def test_concurrent_updates_and_reports_are_consistent() -> None:
    """Writers push identical moments to two identical layers; every report must see them in step."""
    ref = LayerReference("a", mean=np.zeros(4), var=np.ones(4), eps=1e-5)
    refs = {"a": ref, "b": LayerReference("b", mean=ref.mean, var=ref.var, eps=ref.eps)}
    monitor = DriftMonitor(refs, calibration_for(["a", "b"]), window=64)
    writers, updates_each = 4, 1000
    pushed = [0] * writers
    errors: list[BaseException] = []
    done = threading.Event()
    start = threading.Barrier(writers + 2)
    reports: list[list[DriftReport]] = [[], []]

    def write(i: int) -> None:
        rng = np.random.default_rng(100 + i)
        try:
            start.wait()
            for _ in range(updates_each):
                n = int(rng.integers(1, 10))
                s1 = rng.normal(0.0, 1.0, (n, 4)) * rng.uniform(0.5, 2.0)
                s2 = s1**2 + rng.uniform(0.0, 3.0, (n, 4))
                m = Moments(s1, s2, 2)
                monitor.update({"a": m, "b": m})
                pushed[i] += n
        except BaseException as exc:  # collected and re-raised in the test thread
            errors.append(exc)

    def read(j: int) -> None:
        try:
            start.wait()
            while not done.is_set():
                reports[j].append(monitor.report())
        except BaseException as exc:
            errors.append(exc)

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, so interleavings actually happen
    try:
        threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
        readers = [threading.Thread(target=read, args=(j,)) for j in range(2)]
        for t in threads + readers:
            t.start()
        for t in threads:
            t.join(timeout=30)
        done.set()
        for t in readers:
            t.join(timeout=30)
    finally:
        sys.setswitchinterval(old_interval)

    assert not errors, errors
    assert not any(t.is_alive() for t in threads + readers)
    final = monitor.report()
    assert final.images_seen == sum(pushed)
    assert final.images == 64
    all_reports = reports[0] + reports[1]
    assert len(all_reports) > 10
    for j in range(2):
        seen = [r.images_seen for r in reports[j]]
        assert seen == sorted(seen)
    scored = 0
    for r in all_reports:
        assert 0 <= r.images <= 64
        assert r.images <= r.images_seen <= sum(pushed)
        a, b = r.layers
        assert a.images == b.images == r.images
        assert a.score == b.score  # a torn snapshot (one layer updated, the other not) would differ
        if a.score is not None:
            scored += 1
            assert np.isfinite(a.score)
            assert a.score >= 0.0
            assert r.model_statistic == pytest.approx(a.score / a.threshold)
    assert scored > 0
