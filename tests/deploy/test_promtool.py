"""The Prometheus deployment files pass promtool, and the live /metrics of the real service passes its linter."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from tests.support import REPO, ServerProcess
from tests.tools import require_binary

PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
ALERTS = ("BnserveLayerDrift", "BnserveModelDrift", "BnserveNotReady", "BnserveHigh5xxRate", "BnserveHighP99Latency")


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [require_binary("promtool"), *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )
    print(f"$ promtool {' '.join(args)}  -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_prometheus_config_is_valid() -> None:
    proc = promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "alerts.yml" in proc.stdout  # the rule file was found and checked along with the config
    assert "SUCCESS: 5 rules found" in proc.stdout


def test_alert_rules_are_valid() -> None:
    proc = promtool("check", "rules", str(PROMETHEUS_DIR / "alerts.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 5 rules found" in proc.stdout


def test_alert_rule_unit_tests_pass() -> None:
    proc = promtool("test", "rules", str(PROMETHEUS_DIR / "alerts_test.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_alert_has_unit_tests_that_fire_it_and_keep_it_quiet() -> None:
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert alerts == set(ALERTS)
    cases = [case for test in yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
             for case in test.get("alert_rule_test", [])]  # fmt: skip
    for alert in ALERTS:
        expected = [case["exp_alerts"] for case in cases if case["alertname"] == alert]
        assert any(expected), f"{alert}: no unit test shows it firing"
        assert not all(expected), f"{alert}: no unit test shows it staying quiet"


@pytest.mark.integration
def test_live_metrics_pass_promtool_lint(server: ServerProcess, test_images: tuple[np.ndarray, np.ndarray]) -> None:
    images, _ = test_images
    # 128 images > the fixture's window of 64: the drift gauges leave warm-up and every histogram has samples.
    for start in range(0, 128, 64):
        r = httpx.post(f"{server.url}/v1/predict", json={"instances": images[start : start + 64].tolist()}, timeout=30)
        assert r.status_code == 200, r.text
    assert httpx.post(f"{server.url}/v1/predict", json={"instances": [[0.5]]}, timeout=30).status_code == 422
    r = httpx.get(f"{server.url}/metrics", timeout=30)
    assert r.status_code == 200
    exposition = r.text
    for family in (
        "bnserve_http_request_duration_seconds_bucket",
        "bnserve_drift_score{",
        "bnserve_drift_model_statistic",
        "bnserve_model_ready 1.0",
        'status="422"',
    ):
        assert family in exposition, f"{family} missing from /metrics, so it was not linted"

    proc = promtool("check", "metrics", stdin=exposition)
    assert proc.returncode == 0, f"promtool check metrics failed:\n{proc.stdout}{proc.stderr}"
    assert (proc.stdout + proc.stderr).strip() == "", f"lint problems:\n{proc.stdout}{proc.stderr}"


def test_require_binary_fails_under_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = "bnserve-no-such-binary"
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        require_binary(missing)
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="not on PATH"):
        require_binary(missing)
    assert Path(require_binary("sh")).is_file()
