"""The serving engines: onnxruntime must give torch's probabilities and drift moments, whatever the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.artifact import Artifact
from model.bnstats import BnStatsRecorder
from model.net import NetConfig, build_net, fold_batchnorm
from service.inference.engine import OrtEngine, TorchEngine, build_engine
from service.wire import ENGINES


def _served(net: torch.nn.Module) -> tuple[torch.nn.Module, BnStatsRecorder]:
    net = net.eval().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    fold_batchnorm(net)
    return net, BnStatsRecorder(net)


@pytest.fixture(scope="module")
def engines(tiny_artifact: Artifact) -> tuple[OrtEngine, TorchEngine]:
    net, recorder = _served(tiny_artifact.net)
    mean, std = float(tiny_artifact.normalization.mean), float(tiny_artifact.normalization.std)
    return OrtEngine(net, mean, std, recorder, threads=1), TorchEngine(net, mean, std, recorder)


@pytest.mark.parametrize("n", [1, 5, 64])
def test_onnxruntime_gives_torchs_probabilities_and_moments(engines, test_images, n: int) -> None:  # type: ignore[no-untyped-def]
    ort_engine, torch_engine = engines
    x = np.ascontiguousarray(test_images[0][:n, None])
    want = torch_engine.forward(x)
    np.testing.assert_allclose(ort_engine.forward(x), want, rtol=1e-5, atol=1e-6)
    probs, moments = ort_engine.forward_with_moments(x)
    np.testing.assert_allclose(probs, want, rtol=1e-5, atol=1e-6)
    _, expected = torch_engine.forward_with_moments(x)
    assert list(moments) == list(expected)
    for name, m in moments.items():
        e = expected[name]
        assert m.per_image == e.per_image and m.s1.shape == e.s1.shape == (n, e.s1.shape[1])
        assert m.s1.dtype == m.s2.dtype == np.float64
        for got, exp in ((m.s1, e.s1), (m.s2, e.s2)):  # float32 sums in another order: ~1e-7 of the largest
            np.testing.assert_allclose(got, exp, rtol=0, atol=1e-5 * np.abs(exp).max())


def test_onnxruntime_answers_do_not_depend_on_the_batch(engines, test_images) -> None:  # type: ignore[no-untyped-def]
    ort_engine, _ = engines
    x = np.ascontiguousarray(test_images[0][:64, None])
    together = ort_engine.forward(x)
    alone = np.concatenate([ort_engine.forward(x[i : i + 1]) for i in range(64)])
    shuffled = ort_engine.forward(x[::-1].copy())[::-1]
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(shuffled, alone, rtol=1e-5, atol=1e-6)


def test_onnxruntime_serves_every_architecture(test_images) -> None:  # type: ignore[no-untyped-def]
    """The seed MLP (a BN1d layer only), with running statistics that are not the defaults."""
    torch.manual_seed(0)
    net = build_net(NetConfig.seed_mlp())
    with torch.no_grad():
        for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm1d)):
            bn.running_mean.uniform_(-1, 1)  # type: ignore[union-attr]
            bn.running_var.uniform_(0.5, 2)  # type: ignore[union-attr]
    net, recorder = _served(net)
    x = np.ascontiguousarray(test_images[0][:3, None])
    ort_engine, torch_engine = (
        build_engine("onnxruntime", net, 0.1, 0.3, recorder, threads=1),
        TorchEngine(net, 0.1, 0.3, recorder),
    )
    np.testing.assert_allclose(ort_engine.forward(x), torch_engine.forward(x), rtol=1e-5, atol=1e-6)
    (_, got), (_, want) = ort_engine.forward_with_moments(x), torch_engine.forward_with_moments(x)
    for name in want:
        for g, w in ((got[name].s1, want[name].s1), (got[name].s2, want[name].s2)):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * np.abs(w).max())


def test_an_engine_without_a_recorder_serves_but_has_no_moments(tiny_artifact: Artifact, test_images) -> None:  # type: ignore[no-untyped-def]
    net, _ = _served(tiny_artifact.net)
    x = np.ascontiguousarray(test_images[0][:2, None])
    for name in ENGINES:
        engine = build_engine(name, net, 0.1307, 0.3081, None, threads=1)
        assert engine.name == name and engine.forward(x).shape == (2, 10)
        with pytest.raises(RuntimeError, match="without a drift recorder"):
            engine.forward_with_moments(x)
    with pytest.raises(ValueError, match="unknown engine"):
        build_engine("tensorrt", net, 0.0, 1.0, None, threads=1)  # type: ignore[arg-type]
