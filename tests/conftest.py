"""Shared fixtures: real MNIST, a tiny model trained for real, and a real server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from model.artifact import Artifact, load_artifact
from tests.support import ADMIN_TOKEN, ServerProcess, train_smoke
from training.data import MnistSplits, default_cache_dir, load_mnist


@pytest.fixture(scope="session")
def mnist() -> MnistSplits:
    """Real MNIST (cached under ./data after the first run)."""
    return load_mnist(default_cache_dir())


@pytest.fixture(scope="session")
def tiny_artifact_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BN CNN trained for real by `python -m training --smoke` (a few seconds)."""
    return train_smoke(tmp_path_factory.mktemp("artifacts") / "tiny", seed=0, version="tiny-v1")


@pytest.fixture(scope="session")
def tiny_artifact(tiny_artifact_dir: Path) -> Artifact:
    return load_artifact(tiny_artifact_dir)


@pytest.fixture(scope="session")
def test_images(mnist: MnistSplits) -> tuple[np.ndarray, np.ndarray]:
    """512 MNIST test images as float32 (N, 28, 28) in [0, 1], with labels: a seeded random sample, never a
    prefix, because the test split is ordered by writer group and a prefix is itself a (small) shift."""
    idx = np.random.default_rng(0).choice(len(mnist.test_x), size=512, replace=False)
    return mnist.test_x[idx].astype(np.float32) / 255.0, mnist.test_y[idx]


@pytest.fixture(scope="session")
def server(tiny_artifact_dir: Path) -> Iterator[ServerProcess]:
    """The real service (uvicorn subprocess) on a free loopback port, ready, with admin enabled.

    It monitors every image (drift sample 1): tests on it count what reaches the drift window, which under the default
    share depends on the load. The sampling rule has its own tests (tests/integration/test_drift_sampling.py).
    """
    with ServerProcess(tiny_artifact_dir, admin_token=ADMIN_TOKEN, drift_window=64, drift_sample=1.0) as srv:
        yield srv
