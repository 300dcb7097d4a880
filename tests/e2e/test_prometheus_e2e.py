"""A real Prometheus scrapes the real service, sees clean traffic below the drift thresholds and fires on a shift."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from tests.support import ADMIN_TOKEN, REPO, ServerProcess, free_port
from tests.tools import require_binary
from training.data import MnistSplits

pytestmark = pytest.mark.e2e

WINDOW = 128  # drift window of the service under test, in images
BATCH = 64  # images per /v1/predict request
WAIT_S = 60.0  # bound on every wait for Prometheus to see something
ALERT_FOR = "2s"  # replaces every `for:` of deploy/prometheus/alerts.yml in the test copy
# Inversion (1 - x) moves every BN layer's inputs far past its threshold with the smoke model (score/threshold
# from ~60 in head.2 to ~1500 in features.0.1 at W=128), so all of them must fire.
ALERTS = ("BnserveLayerDrift", "BnserveModelDrift", "BnserveNotReady", "BnserveHigh5xxRate", "BnserveHighP99Latency")
INVERSION_LAYERS = {"features.0.1", "features.1.1", "features.2.1", "head.2"}


def alerts_for_test(source: Path, hold: str) -> dict[str, Any]:
    """deploy/prometheus/alerts.yml with every `for:` set to `hold`; expressions, labels, annotations untouched."""
    rules = yaml.safe_load(source.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = hold
    return rules


class PrometheusProcess:
    """A real Prometheus server on a free loopback port, with its config, rules and TSDB in `workdir`."""

    def __init__(self, workdir: Path, target: str, rules: dict[str, Any]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        (workdir / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": ["alerts.yml"],
            "scrape_configs": [{"job_name": "bnserve", "static_configs": [{"targets": [target]}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, binary: str) -> PrometheusProcess:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={self.workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"prometheus not ready within {WAIT_S} s:\n{self.logs()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def api(self, path: str, **params: str) -> Any:
        r = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=5.0)
        r.raise_for_status()
        body = r.json()
        assert body["status"] == "success", body
        return body["data"]

    def by_label(self, query: str, label: str) -> dict[str, float]:
        """Instant query → {value of `label`: sample value}."""
        return {s["metric"].get(label, ""): float(s["value"][1]) for s in self.api("query", query=query)["result"]}

    def alerts(self, state: str) -> list[dict[str, Any]]:
        return [a for a in self.api("alerts")["alerts"] if a["state"] == state]


@pytest.fixture(scope="module")
def service(tiny_artifact_dir: Path) -> Iterator[ServerProcess]:
    # every image monitored (as for the shared test server): this tests the scrape and the alerts, not sampling,
    # and the windows are sent back to back, which the default share would sample
    with ServerProcess(tiny_artifact_dir, admin_token=ADMIN_TOKEN, drift_window=WINDOW, drift_sample=1.0) as srv:
        yield srv


@pytest.fixture(scope="module")
def prometheus(service: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusProcess]:
    binary = require_binary("prometheus")
    rules = alerts_for_test(REPO / "deploy" / "prometheus" / "alerts.yml", ALERT_FOR)
    prom = PrometheusProcess(tmp_path_factory.mktemp("prometheus"), f"127.0.0.1:{service.port}", rules)
    try:
        yield prom.start(binary)
    finally:
        prom.stop()


def wait_for(what: str, check: Callable[[], tuple[bool, object]], logs: Callable[[], str]) -> object:
    """Poll `check` (→ done, detail) until done or WAIT_S; on timeout fail with the last detail and the logs."""
    deadline = time.monotonic() + WAIT_S
    detail: object = None
    while time.monotonic() < deadline:
        done, detail = check()
        if done:
            return detail
        time.sleep(0.25)
    pytest.fail(f"timed out after {WAIT_S:g} s waiting for {what}; last seen: {detail}\n{logs()}")


def send(service: ServerProcess, images: np.ndarray) -> None:
    for start in range(0, len(images), BATCH):
        batch = images[start : start + BATCH].astype(np.float32)
        r = httpx.post(f"{service.url}/v1/predict", json={"instances": batch.tolist()}, timeout=30)
        assert r.status_code == 200, r.text


def test_prometheus_sees_clean_traffic_then_fires_on_inverted_images(
    service: ServerProcess, prometheus: PrometheusProcess, mnist: MnistSplits
) -> None:
    def logs() -> str:
        return f"--- prometheus log ---\n{prometheus.logs()}\n--- service log ---\n{service.logs()[-6000:]}"

    loaded = {r["name"]: r["health"] for g in prometheus.api("rules")["groups"] for r in g["rules"]}
    assert set(loaded) == set(ALERTS), loaded
    assert "err" not in loaded.values(), loaded
    layers = {layer["layer"] for layer in httpx.get(f"{service.url}/v1/drift", timeout=10).json()["layers"]}
    assert layers == INVERSION_LAYERS, "the smoke model's BN layers changed: re-check which layers fire"

    # (a) Clean traffic: a seeded random sample of the MNIST test split. Random, not the first WINDOW images:
    # consecutive MNIST images share writers, and such a window is a real (writer) shift that the
    # thresholds, calibrated on random clean windows, flag most of the time.
    rng = np.random.default_rng(0)
    clean = mnist.test_x[rng.choice(len(mnist.test_x), WINDOW, replace=False)].astype(np.float32) / 255.0
    send(service, clean)

    def clean_scores() -> tuple[bool, object]:
        up = prometheus.by_label('up{job="bnserve"}', "job")
        scores = prometheus.by_label("bnserve_drift_score", "layer")
        return up == {"bnserve": 1.0} and set(scores) == layers, {"up": up, "scores": scores}

    wait_for("the clean window's drift scores of every layer, and up == 1", clean_scores, logs)
    scores = prometheus.by_label("bnserve_drift_score", "layer")
    thresholds = prometheus.by_label("bnserve_drift_threshold", "layer")
    report = {lay["layer"]: lay for lay in httpx.get(f"{service.url}/v1/drift", timeout=10).json()["layers"]}
    print("clean: score / threshold", {k: round(scores[k] / thresholds[k], 3) for k in sorted(layers)})
    for layer in layers:
        assert scores[layer] == pytest.approx(report[layer]["score"], rel=1e-9), "scraped value is not the report's"
        assert scores[layer] < thresholds[layer], f"{layer}: clean window over threshold\n{logs()}"
    time.sleep(3.5)  # > `for` (2s) + one evaluation (1s): a drift alert would be firing by now
    drift_alerts = [a for a in prometheus.api("alerts")["alerts"] if a["labels"]["alertname"].endswith("Drift")]
    assert drift_alerts == [], f"drift alerts on clean traffic: {drift_alerts}"

    # (b) A fresh window of inverted images (white background, black ink).
    r = httpx.post(f"{service.url}/v1/drift/reset", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)
    assert r.status_code == 200, r.text
    send(service, 1.0 - clean)

    def drifted() -> tuple[bool, object]:
        scores = prometheus.by_label("bnserve_drift_score", "layer")
        over = {k for k, v in scores.items() if v > thresholds[k]}
        firing = prometheus.alerts("firing")
        layer_alerts = {a["labels"]["layer"] for a in firing if a["labels"]["alertname"] == "BnserveLayerDrift"}
        model_alert = any(a["labels"]["alertname"] == "BnserveModelDrift" for a in firing)
        done = over == INVERSION_LAYERS and layer_alerts == INVERSION_LAYERS and model_alert
        return done, {"over threshold": sorted(over), "firing": [a["labels"] for a in firing], "scores": scores}

    seen = wait_for("every layer over its threshold and BnserveLayerDrift + BnserveModelDrift firing", drifted, logs)
    print("inverted:", seen)
    stat = prometheus.by_label("bnserve_drift_model_statistic", "job")["bnserve"]
    model_threshold = prometheus.by_label("bnserve_drift_model_threshold", "job")["bnserve"]
    assert stat > model_threshold
    # The annotation templates run for real: the description quotes the threshold it looked up with `query`.
    (model_alert,) = [a for a in prometheus.alerts("firing") if a["labels"]["alertname"] == "BnserveModelDrift"]
    assert f"above its calibrated threshold {model_threshold:.3g} " in model_alert["annotations"]["description"]
