"""Tests for model/bnstats.py: BN-input moments, the recorder hooks and the drift maths, against plain numpy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from model.bnstats import (
    BnStatsRecorder,
    LayerReference,
    Moments,
    drift_from_sums,
    layer_references,
    per_image_moments,
    window_scores,
)
from model.net import NetConfig, bn_layers, build_net, fold_batchnorm
from tests.reference import reference_drift

EPS = 1e-5


# --- the plain numpy reference: DESIGN.md "BN drift: definitions", written out the obvious way ---


def gaussian_kl(mu_l: float, var_l: float, mu_r: float, var_r: float) -> float:
    """KL(N(mu_l, var_l) ‖ N(mu_r, var_r)) in its textbook closed form."""
    return 0.5 * (var_l / var_r + (mu_l - mu_r) ** 2 / var_r - 1.0 - np.log(var_l / var_r))


def reference(channels: int, rng: np.random.Generator, eps: float = EPS) -> LayerReference:
    return LayerReference(
        name="layer", mean=rng.normal(0.0, 2.0, channels), var=rng.uniform(0.2, 3.0, channels), eps=eps
    )


def live_data(shape: tuple[int, ...], ref: LayerReference, rng: np.random.Generator) -> np.ndarray:
    """Raw BN inputs near the reference, with a different, random mean and scale per channel."""
    c = shape[1]
    bshape = (1, c) + (1,) * (len(shape) - 2)
    mean = ref.mean + rng.normal(0.0, 0.3, c) * np.sqrt(ref.var)
    std = np.sqrt(ref.var) * rng.uniform(0.7, 1.4, c)
    return mean.reshape(bshape) + std.reshape(bshape) * rng.standard_normal(shape)


def sums_of(x: np.ndarray, ref: LayerReference) -> tuple[np.ndarray, np.ndarray, int]:
    """Window sums from the project's per-image moments: Σ over images of s1, s2, and the element count."""
    m = per_image_moments(torch.from_numpy(x), torch.from_numpy(ref.mean))
    return m.s1.sum(axis=0), m.s2.sum(axis=0), x.shape[0] * m.per_image


def assert_drift_equal(got, want: tuple[np.ndarray, np.ndarray, np.ndarray], rtol: float = 1e-9) -> None:  # type: ignore[no-untyped-def]
    d, r, kl = want
    atol = 1e-12 if rtol <= 1e-9 else 1e-8
    np.testing.assert_allclose(got.d, d, rtol=rtol, atol=atol)
    np.testing.assert_allclose(got.r, r, rtol=rtol, atol=atol)
    np.testing.assert_allclose(got.kl, kl, rtol=rtol, atol=atol * 1e-3)
    assert got.score == pytest.approx(kl.mean(), rel=rtol)
    assert got.mean_shift_rms == pytest.approx(np.sqrt(np.mean(d**2)), rel=rtol)
    assert got.log_var_ratio_mean_abs == pytest.approx(np.mean(np.abs(r)), rel=rtol)


SHAPES = [(300, 7), (40, 5, 6, 6)]


# --- per-image moments ---


@pytest.mark.parametrize("shape", SHAPES, ids=["NC", "NCHW"])
def test_per_image_moments_are_centred_sums_per_image(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(1)
    ref = reference(shape[1], rng)
    x = live_data(shape, ref, rng)
    m = per_image_moments(torch.from_numpy(x), torch.from_numpy(ref.mean))
    centred = np.moveaxis(x, 1, -1).reshape(shape[0], -1, shape[1]) - ref.mean  # (N, H·W, C)
    assert m.per_image == int(np.prod(shape[2:]))
    assert m.s1.dtype == np.float64
    assert m.s1.shape == (shape[0], shape[1])
    np.testing.assert_allclose(m.s1, centred.sum(axis=1), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(m.s2, (centred**2).sum(axis=1), rtol=1e-9, atol=1e-12)


def test_per_image_moments_accumulate_float32_inputs_in_float64() -> None:
    x32 = torch.full((3, 2), 1.0 + 2.0**-20, dtype=torch.float32)  # exactly representable in float32
    m = per_image_moments(x32, torch.ones(2, dtype=torch.float32))
    assert m.s1.dtype == np.float64
    np.testing.assert_array_equal(m.s1, np.full((3, 2), 2.0**-20))
    np.testing.assert_array_equal(m.s2, np.full((3, 2), 2.0**-40))


@pytest.mark.parametrize("shape", [(4,), (4, 3, 5), (2, 3, 4, 4, 4)])
def test_per_image_moments_rejects_other_ranks(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="BN input"):
        per_image_moments(torch.zeros(shape), torch.zeros(3))


def test_moments_concat_stacks_images() -> None:
    rng = np.random.default_rng(2)
    parts = [Moments(rng.random((n, 3)), rng.random((n, 3)), 4) for n in (2, 5)]
    m = Moments.concat(parts)
    assert m.per_image == 4
    assert m.s1.shape == (7, 3)
    np.testing.assert_array_equal(m.s2[2:], parts[1].s2)


# --- the recorder on a real network ---


def small_net(seed: int = 0) -> torch.nn.Module:
    """A small bn-cnn in eval mode (BatchNorm2d and BatchNorm1d layers) with randomised running statistics."""
    torch.manual_seed(seed)
    net = build_net(NetConfig(conv_channels=(4, 8), hidden=16, dropout=0.0)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in bn_layers(net).values():
            c = bn.num_features
            bn.running_mean.copy_(0.3 * torch.randn(c, generator=gen))
            bn.running_var.copy_(0.5 + torch.rand(c, generator=gen))
    return net


class RawInputs:
    """The test's own forward pre-hooks: a float64 copy of every BN layer's raw input, per forward pass."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.inputs: dict[str, list[np.ndarray]] = {}
        self._handles = [bn.register_forward_pre_hook(self._hook(name)) for name, bn in bn_layers(net).items()]

    def _hook(self, name: str):  # type: ignore[no-untyped-def]
        def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            self.inputs.setdefault(name, []).append(args[0].detach().double().numpy().copy())

        return hook

    def all(self, name: str) -> np.ndarray:
        return np.concatenate(self.inputs[name])

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def images(n: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random((n, 1, 28, 28), dtype=np.float32))


def test_layer_references_are_float64_copies_of_running_buffers() -> None:
    net = small_net()
    refs = layer_references(net)
    bns = bn_layers(net)
    assert list(refs) == list(bns) == ["features.0.1", "features.1.1", "head.2"]
    for name, bn in bns.items():
        assert refs[name].mean.dtype == np.float64
        assert refs[name].channels == bn.num_features
        np.testing.assert_array_equal(refs[name].mean, bn.running_mean.double().numpy())
        np.testing.assert_array_equal(refs[name].var, bn.running_var.double().numpy())
        assert refs[name].eps == bn.eps
    with torch.no_grad():
        bns["head.2"].running_mean.add_(1.0)
    assert not np.array_equal(refs["head.2"].mean, bns["head.2"].running_mean.double().numpy())


def test_layer_references_need_running_stats() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="running statistics"):
        layer_references(net)


def test_recorder_moments_match_raw_bn_inputs_of_a_real_net() -> None:
    net = small_net()
    recorder = BnStatsRecorder(net)
    raw = RawInputs(net)
    parts: dict[str, list[Moments]] = {}
    with torch.inference_mode():
        for n, seed in ((7, 1), (13, 2), (30, 3)):  # one window over several forward batches
            with recorder.capture() as captured:
                net(images(n, seed))
            for name, m in captured.items():
                parts.setdefault(name, []).append(m)
    raw.remove()

    assert set(parts) == set(recorder.references)
    for name, ref in recorder.references.items():
        x = raw.all(name)  # (50, C) or (50, C, H, W)
        m = Moments.concat(parts[name])
        assert m.s1.shape == (50, ref.channels)
        assert m.per_image == int(np.prod(x.shape[2:]))
        centred = np.moveaxis(x, 1, -1).reshape(50, -1, ref.channels) - ref.mean
        # A real net's activations are float32: the per-image reduction runs in float32 (relative error ~1e-7).
        np.testing.assert_allclose(m.s1, centred.sum(axis=1), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(m.s2, (centred**2).sum(axis=1), rtol=1e-5, atol=1e-4)
        got = drift_from_sums(m.s1.sum(axis=0), m.s2.sum(axis=0), 50 * m.per_image, ref)
        assert_drift_equal(got, reference_drift(x, ref.mean, ref.var, ref.eps), rtol=1e-5)
        assert got.score > 0.0


@pytest.mark.parametrize("from_sums", [False, True])
def test_a_folded_net_records_the_moments_of_the_unfolded_bn_inputs(from_sums: bool) -> None:
    """fold_batchnorm moves each BN into the layer before it; the drift moments must not notice."""
    x = images(9, 4)
    unfolded, folded = small_net(), small_net()
    with torch.no_grad():
        for bn in bn_layers(folded).values():  # affine parameters away from (1, 0), so the map back is not trivial
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.normal_()
    unfolded.load_state_dict(folded.state_dict())
    fold_batchnorm(folded)
    expected = BnStatsRecorder(unfolded)
    recorder = BnStatsRecorder(folded)
    with torch.inference_mode():
        with expected.capture() as want:
            unfolded(x)
        if from_sums:  # sums of what the folded layers output, centred on `centre`, computed outside the recorder
            seen: dict[str, torch.Tensor] = {}
            hooks = [bn.register_forward_pre_hook(lambda _m, a, n=n: seen.__setitem__(n, a[0].clone())) for n, bn in bn_layers(folded).items()]  # fmt: skip
            folded(x)
            for hook in hooks:
                hook.remove()
            got = {}
            for name, y in seen.items():
                centred = (y - recorder.centre(name)).double()
                dims = (2, 3) if y.dim() == 4 else ()
                s1, s2 = (centred.sum(dims), (centred**2).sum(dims)) if dims else (centred, centred**2)
                got[name] = recorder.moments_from_sums(name, s1.float().numpy(), s2.float().numpy(), y[0, 0].numel())
        else:
            with recorder.capture() as got:
                folded(x)
    assert set(got) == set(want) == set(recorder.references)
    for name in want:
        scale = want[name].s2.sum(axis=0) / (want[name].per_image * len(x))  # per-channel mean square, for atol
        np.testing.assert_allclose(got[name].s1, want[name].s1, rtol=1e-4, atol=1e-5 * np.sqrt(scale).max() * 784)
        np.testing.assert_allclose(got[name].s2, want[name].s2, rtol=1e-4, atol=1e-5 * scale.max() * 784)


def test_recorder_records_nothing_outside_capture() -> None:
    net = small_net()
    recorder = BnStatsRecorder(net)
    with torch.inference_mode():
        with recorder.capture() as first:
            net(images(3, 1))
        kept = {name: m.s1.copy() for name, m in first.items()}
        net(images(5, 2))  # outside capture: must not touch `first` nor fail
        with recorder.capture() as empty:
            pass
    assert empty == {}
    assert set(first) == set(kept) == set(recorder.references)
    for name, s1 in kept.items():
        np.testing.assert_array_equal(first[name].s1, s1)
        assert first[name].s1.shape[0] == 3


def test_recorder_capture_ends_even_when_the_forward_pass_raises() -> None:
    net = small_net()
    recorder = BnStatsRecorder(net)
    with pytest.raises(RuntimeError), recorder.capture() as captured:
        net(torch.zeros(2, 3, 28, 28))  # wrong channel count: the first conv raises before any BN
    with torch.inference_mode():
        net(images(2, 1))
    assert captured == {}


def test_recorder_hooks_exist_only_while_capturing() -> None:
    net = small_net()
    recorder = BnStatsRecorder(net)

    def hooks() -> list[int]:
        return [len(bn._forward_pre_hooks) for bn in bn_layers(net).values()]

    assert hooks() == [0, 0, 0], "an unmonitored forward pass takes PyTorch's fast call path"
    with torch.inference_mode(), recorder.capture() as captured:
        assert hooks() == [1, 1, 1]
        logits = net(images(4, 1))
    assert hooks() == [0, 0, 0] and set(captured) == set(recorder.references)
    assert logits.shape == (4, 10)
    with torch.inference_mode():
        net(images(4, 1))
    assert hooks() == [0, 0, 0], "a forward pass outside capture adds none"


# --- drift_from_sums and window_scores against the reference ---


@pytest.mark.parametrize("shape", SHAPES, ids=["NC", "NCHW"])
def test_drift_from_sums_matches_reference(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(3)
    ref = reference(shape[1], rng)
    x = live_data(shape, ref, rng)
    s1, s2, n = sums_of(x, ref)
    assert_drift_equal(drift_from_sums(s1, s2, n, ref), reference_drift(x, ref.mean, ref.var, ref.eps))


@pytest.mark.parametrize("shape", SHAPES, ids=["NC", "NCHW"])
def test_drift_from_sums_broadcasts_over_windows(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(4)
    ref = reference(shape[1], rng)
    xs = [live_data((k, *shape[1:]), ref, rng) for k in (5, 17, 40)]  # windows of different sizes
    sums = [sums_of(x, ref) for x in xs]
    got = drift_from_sums(
        np.stack([s[0] for s in sums]), np.stack([s[1] for s in sums]), np.array([s[2] for s in sums]), ref
    )
    assert got.kl.shape == (3, shape[1])
    for i, x in enumerate(xs):
        d, r, kl = reference_drift(x, ref.mean, ref.var, ref.eps)
        np.testing.assert_allclose(got.d[i], d, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got.r[i], r, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got.kl[i], kl, rtol=1e-9, atol=1e-15)


def test_window_scores_match_reference_per_window() -> None:
    rng = np.random.default_rng(5)
    refs = {"a": reference(6, rng), "b": reference(3, rng)}
    raw = {"a": live_data((60, 6), refs["a"], rng), "b": live_data((60, 3, 4, 4), refs["b"], rng)}
    moments = {k: per_image_moments(torch.from_numpy(x), torch.from_numpy(refs[k].mean)) for k, x in raw.items()}
    windows = np.stack([rng.choice(60, size=16, replace=False) for _ in range(9)])
    scores = window_scores(moments, refs, windows)
    assert set(scores) == {"a", "b"}
    for k, ref in refs.items():
        want = [reference_drift(raw[k][w], ref.mean, ref.var, ref.eps)[2].mean() for w in windows]
        np.testing.assert_allclose(scores[k], want, rtol=1e-9)


def test_top_channels_are_sorted_by_kl() -> None:
    rng = np.random.default_rng(6)
    ref = reference(12, rng)
    x = live_data((200, 12), ref, rng)
    drift = drift_from_sums(*sums_of(x, ref), ref)
    _, _, kl = reference_drift(x, ref.mean, ref.var, ref.eps)
    top = drift.top_channels(4)
    assert [t["channel"] for t in top] == list(np.argsort(-kl)[:4])
    assert [t["kl"] for t in top] == sorted((t["kl"] for t in top), reverse=True)
    c = int(top[0]["channel"])
    assert top[0]["mean_shift"] == drift.d[c]
    assert top[0]["log_var_ratio"] == drift.r[c]
    assert len(drift.top_channels(50)) == 12


# --- the KL formula ---


def sums_for(mu_l: np.ndarray, var_l: np.ndarray, ref: LayerReference, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Centred sums of n elements whose mean is mu_l and unbiased variance var_l."""
    shift = mu_l - ref.mean
    return n * shift, (n - 1) * var_l + n * shift**2


def test_kl_is_zero_when_window_matches_reference_exactly() -> None:
    ref = LayerReference("l", mean=np.array([0.0, -3.0, 1000.0]), var=np.array([1.0, 0.25, 4.0]), eps=EPS)
    s1, s2 = sums_for(ref.mean, ref.var, ref, 1000)
    drift = drift_from_sums(s1, s2, 1000, ref)
    np.testing.assert_array_equal(drift.d, 0.0)
    np.testing.assert_allclose(drift.r, 0.0, atol=1e-15)
    np.testing.assert_allclose(drift.kl, 0.0, atol=1e-28)
    assert drift.score == pytest.approx(0.0, abs=1e-28)


@pytest.mark.parametrize(
    ("shift_sd", "var_factor"),
    [(0.1, 1.0), (-0.1, 1.0), (0.0, 1.01), (0.0, 0.99), (0.0, 3.0), (2.0, 0.5), (1e-4, 1.0), (0.0, 1.0 + 1e-6)],
)
def test_kl_is_positive_when_mean_or_variance_moves(shift_sd: float, var_factor: float) -> None:
    ref = LayerReference("l", mean=np.array([0.5]), var=np.array([2.0]), eps=EPS)
    sd = np.sqrt(ref.var + ref.eps)
    var_l = var_factor * (ref.var + ref.eps) - ref.eps  # so that (σ²_l + eps) / (σ²_r + eps) = var_factor
    s1, s2 = sums_for(ref.mean + shift_sd * sd, var_l, ref, 500)
    drift = drift_from_sums(s1, s2, 500, ref)
    assert drift.d[0] == pytest.approx(shift_sd, rel=1e-9, abs=1e-15)
    assert drift.r[0] == pytest.approx(np.log(var_factor), rel=1e-6, abs=1e-15)
    assert drift.kl[0] > 0.0
    # small moves: KL ≈ ½ d² + ¼ r² to leading order
    if abs(shift_sd) < 0.2 and abs(np.log(var_factor)) < 0.02:
        approx = 0.5 * shift_sd**2 + 0.25 * np.log(var_factor) ** 2
        assert drift.kl[0] == pytest.approx(approx, rel=0.02)


def test_kl_matches_closed_form_gaussian_kl_with_eps() -> None:
    rng = np.random.default_rng(7)
    eps = 1e-3  # large enough that forgetting it anywhere would show
    ref = LayerReference("l", mean=rng.normal(0, 1, 20), var=rng.uniform(0.01, 2, 20), eps=eps)
    mu_l = ref.mean + rng.normal(0, 1, 20)
    var_l = ref.var * rng.uniform(0.2, 5, 20)
    n = 777
    drift = drift_from_sums(*sums_for(mu_l, var_l, ref, n), n, ref)
    want = [gaussian_kl(mu_l[c], var_l[c] + eps, ref.mean[c], ref.var[c] + eps) for c in range(20)]
    np.testing.assert_allclose(drift.kl, want, rtol=1e-9)


@pytest.mark.parametrize(("mu_l", "var_l"), [(1.0, 1.0), (0.0, 4.0), (0.7, 0.3)])
def test_kl_direction_is_live_relative_to_reference(mu_l: float, var_l: float) -> None:
    """∫ p_live log(p_live / p_ref) by quadrature: the score is KL(live ‖ reference), not the reverse."""
    ref = LayerReference("l", mean=np.array([0.0]), var=np.array([1.0 - 1e-12]), eps=1e-12)
    drift = drift_from_sums(*sums_for(np.array([mu_l]), np.array([var_l - 1e-12]), ref, 100), 100, ref)
    live, base = stats.norm(mu_l, np.sqrt(var_l)), stats.norm(0.0, 1.0)
    kl, _ = integrate.quad(lambda t: live.pdf(t) * (live.logpdf(t) - base.logpdf(t)), -30, 30)
    reverse, _ = integrate.quad(lambda t: base.pdf(t) * (base.logpdf(t) - live.logpdf(t)), -30, 30)
    assert drift.kl[0] == pytest.approx(kl, rel=1e-7)
    if var_l != 1.0:
        assert abs(drift.kl[0] - reverse) > 0.05


# --- numerical stability ---


def test_tiny_variance_channel_with_large_mean_is_stable() -> None:
    """Mean 1000, std 1e-4, reference identical: the centred float64 sums give ~0; naive float32 sums do not."""
    rng = np.random.default_rng(8)
    n = 4096
    mean, std = 1000.0, 1e-4
    x32 = (mean + std * rng.standard_normal((n, 1))).astype(np.float32)  # what a float32 network feeds the BN
    truth = x32.astype(np.float64)
    var_true = truth.var(ddof=1)
    for eps in (1e-5, 1e-14):  # the layer default, and one so small that eps cannot hide an error
        ref = LayerReference("l", mean=np.array([mean]), var=np.array([var_true]), eps=eps)
        m = per_image_moments(torch.from_numpy(x32), torch.tensor([mean], dtype=torch.float32))
        drift = drift_from_sums(m.s1.sum(axis=0), m.s2.sum(axis=0), n, ref)
        assert np.all(np.isfinite(drift.kl))
        assert drift.kl[0] >= 0.0
        assert drift.score < 5.0 / n  # sampling level ~ 1/(2n): the window *is* the reference
        d, r, _ = reference_drift(truth, ref.mean, ref.var, eps)
        np.testing.assert_allclose(drift.r, r, atol=1e-9)  # so σ²_l is right to ~1e-9 relative
        np.testing.assert_allclose(drift.d, d, rtol=1e-6, atol=1e-9)

    # the textbook one-pass formula in float32 loses everything: 1e9-sized sums, 1e-8-sized difference
    s1, s2 = np.float32(0.0), np.float32(0.0)
    for v in x32[:, 0]:
        s1, s2 = s1 + v, s2 + v * v
    naive_var = (s2 - s1 * s1 / np.float32(n)) / np.float32(n - 1)
    assert not abs(float(naive_var) - var_true) < 0.5 * var_true
    naive_r = np.log((max(float(naive_var), 0.0) + 1e-14) / (var_true + 1e-14))
    assert 0.5 * (np.expm1(naive_r) - naive_r) > 1.0  # a false alarm, where the centred sums gave ~0


def test_variance_never_negative_from_rounding() -> None:
    """Σ(x − μ)² − (Σ(x − μ))²/n can round a hair below zero for a constant channel; it must not go negative."""
    ref = LayerReference("l", mean=np.array([0.0, 0.0]), var=np.array([1e-20, 1e-20]), eps=1e-30)
    s1 = np.array([3.0, 0.3])
    s2 = np.nextafter(s1 * s1 / 3, 0.0)  # one ulp below s1²/n, as rounding in the sums can leave it
    drift = drift_from_sums(s1, s2, 3, ref)
    assert np.all(np.isfinite(drift.r))
    assert np.all(np.isfinite(drift.kl))
    assert np.all(drift.kl >= 0.0)
    np.testing.assert_allclose(drift.r, np.log(1e-30 / (1e-20 + 1e-30)))  # σ²_l is 0, not negative


# --- zero drift on the reference distribution, and detection grows with the shift ---


def null_window(shape: tuple[int, ...], ref: LayerReference, rng: np.random.Generator) -> np.ndarray:
    bshape = (1, shape[1]) + (1,) * (len(shape) - 2)
    return ref.mean.reshape(bshape) + np.sqrt(ref.var).reshape(bshape) * rng.standard_normal(shape)


@pytest.mark.parametrize("shape", [(4096, 256), (256, 256, 4, 4)], ids=["NC", "NCHW"])
def test_score_on_reference_distribution_is_at_sampling_level(shape: tuple[int, ...]) -> None:
    """With n elements per channel, E[d²] ≈ 1/n and E[e^r − 1 − r] ≈ Var(r)/2 ≈ 1/(n−1), so E[KL] ≈ 1/n."""
    rng = np.random.default_rng(9)
    ref = reference(shape[1], rng, eps=1e-12)
    x = null_window(shape, ref, rng)
    s1, s2, n = sums_of(x, ref)
    null = drift_from_sums(s1, s2, n, ref).score
    assert 0.75 / n < null < 1.25 / n  # 256 channels: the mean KL is within ~6% (1 sd) of 1/n

    shifted = x + 0.5 * np.sqrt(ref.var).reshape((1, -1) + (1,) * (len(shape) - 2))
    shift_score = drift_from_sums(*sums_of(shifted, ref), ref).score
    assert shift_score == pytest.approx(0.125, rel=0.1)  # ½ d² with d = 0.5
    assert shift_score > 100 * null  # orders of magnitude above the null level


def test_score_is_monotone_in_mean_shift_and_scale() -> None:
    rng = np.random.default_rng(10)
    ref = reference(32, rng)
    x = null_window((512, 32), ref, rng)
    sd = np.sqrt(ref.var)
    by_shift = [drift_from_sums(*sums_of(x + k * sd, ref), ref).score for k in (0.0, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in itertools.pairwise(by_shift)), by_shift
    centred = x - ref.mean
    by_scale = [drift_from_sums(*sums_of(ref.mean + f * centred, ref), ref).score for f in (1.0, 1.1, 1.25, 1.5, 2.0)]
    assert all(a < b for a, b in itertools.pairwise(by_scale)), by_scale
    shrink = [drift_from_sums(*sums_of(ref.mean + f * centred, ref), ref).score for f in (1.0, 0.9, 0.75, 0.5)]
    assert all(a < b for a, b in itertools.pairwise(shrink)), shrink
