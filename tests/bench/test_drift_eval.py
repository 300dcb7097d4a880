"""The drift evaluation in --fast mode against a real (tiny) trained model: BN detection beats chance widely."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import drift_eval


@pytest.mark.slow
def test_fast_eval_detects_shifts_and_writes_reports(tiny_artifact_dir: Path, tmp_path: Path) -> None:
    # W=10 is below the tiny model's smallest calibrated window (16): the eval must calibrate it itself.
    argv = ["--artifact", str(tiny_artifact_dir), "--fast", "--windows", "10,200", "--out", str(tmp_path)]
    assert drift_eval.main(argv) == 0

    res = json.loads((tmp_path / "drift_eval.json").read_text())
    assert res["setup"]["windows"] == [10, 200]
    assert res["setup"]["calibration"]["eval_calibrated_windows"] == [10]
    assert set(res["shifts"]) == set(drift_eval.FAST_SHIFTS)
    for name, shift in res["shifts"].items():
        assert shift["bn"]["200"]["n"] == drift_eval.FAST_TRIALS
        assert shift["bn"]["200"]["rate"] >= 0.9, name
        assert set(shift["layers"]["200"]) == set(res["false_alarm"]["layers"]["200"])
    for w in ("10", "200"):
        clean = res["false_alarm"]["bn"][w]
        assert clean["n"] == drift_eval.FAST_CLEAN_WINDOWS
        assert clean["rate"] <= 0.05, w
        low, high = clean["ci95"]
        assert low <= clean["rate"] <= high
        assert 0.0 <= res["false_alarm"]["bbsd"][w]["rate"] <= 0.05

    md = (tmp_path / "drift_eval.md").read_text()
    assert "| invert | " in md and "| **false alarm, clean** | " in md
    assert "## Targets" in md
    assert (tmp_path / "drift_eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rejects_bad_window_list() -> None:
    with pytest.raises(SystemExit):
        drift_eval.parse_args(["--windows", "1,abc"])
