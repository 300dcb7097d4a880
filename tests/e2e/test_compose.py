"""The docker compose stack for real: stand-in base images, the project image, trainer -> api -> Prometheus."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NoReturn

import httpx
import numpy as np
import pytest

from tests.support import REPO, free_port
from tests.tools import in_ci
from training.data import MnistSplits

# Cold cache (debootstrap + the torch/dependency layers) takes ~10 min on 2 cores, warm ~3 min.
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]

DOCKER_DIR = REPO / "deploy" / "docker"
STANDINS = ("python:3.11-slim", "prom/prometheus:v2.42.0")  # the tags deploy/docker/build-standins.sh provides
BATCH = 64  # the service's default max_instances
DRIFT_WINDOW = 256  # the service's default drift window, in images
WAIT_S = 120.0  # bound on each wait for the stack or Prometheus


def unavailable(reason: str) -> NoReturn:
    """Docker cannot be had here: a skip on a workstation, a failure under CI (where this test must run)."""
    if in_ci():
        pytest.fail(f"{reason}; CI is set, so this test must run", pytrace=False)
    pytest.skip(reason)


def run(cmd: list[str], *, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command from the repository root, output captured; never raises on a non-zero exit."""
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def tail(proc: subprocess.CompletedProcess[str], lines: int = 40) -> str:
    return "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-lines:])


def wait_for(what: str, probe: Callable[[], Any], timeout: float = WAIT_S, every: float = 1.0) -> Any:
    """Call `probe` until it returns something truthy; fail with `what` and the last answer after `timeout`."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except httpx.TransportError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(every)
    pytest.fail(f"{what}: not within {timeout:.0f} s (last: {last!r})")


def compose_command() -> list[str]:
    """`docker compose` (v2 plugin) where it works, else the standalone `docker-compose`."""
    if run(["docker", "compose", "version"], timeout=30).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    unavailable("neither `docker compose` nor `docker-compose` works")


@pytest.fixture(scope="module")
def docker() -> list[str]:
    """A Docker engine with the stand-in base images cached; returns the compose command."""
    if shutil.which("docker") is None and os.geteuid() != 0:
        unavailable("no `docker` on PATH, and only root may install and start it")
    started = time.monotonic()
    proc = run([str(DOCKER_DIR / "build-standins.sh")], timeout=1500)
    print(f"build-standins.sh: exit {proc.returncode} in {time.monotonic() - started:.0f} s\n{tail(proc)}")
    if run(["docker", "info"], timeout=30).returncode != 0:
        unavailable(f"no Docker engine could be made available:\n{tail(proc)}")
    # With an engine up, a failing stand-in build is a defect, not a missing tool.
    assert proc.returncode == 0, f"build-standins.sh failed:\n{tail(proc)}"
    return compose_command()


@pytest.fixture(scope="module")
def image(docker: list[str]) -> Iterator[str]:
    """The project image, built with the local torch wheel; removed afterwards, its cached layers kept."""
    tag = f"bnserve-e2e:{uuid.uuid4().hex[:10]}"
    started = time.monotonic()
    proc = run([str(DOCKER_DIR / "build-image.sh"), tag], timeout=1500)
    print(f"build-image.sh {tag}: exit {proc.returncode} in {time.monotonic() - started:.0f} s\n{tail(proc, 5)}")
    assert proc.returncode == 0, f"image build failed:\n{tail(proc, 60)}"
    yield tag
    # --no-prune: the untagged parent layers stay as the build cache of the next run.
    run(["docker", "rmi", "--no-prune", tag], timeout=120)


@dataclass
class Stack:
    """One `docker compose -p <project>` instance of docker-compose.yml on free loopback ports."""

    compose: list[str]
    project: str
    env: dict[str, str]
    api_url: str
    prometheus_url: str
    down_done: bool = field(default=False)

    def __call__(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return run([*self.compose, "-p", self.project, *args], timeout=timeout, env=self.env)

    def logs(self) -> str:
        return tail(self("logs", "--no-color", "--tail", "40", timeout=60), 120)

    def container(self, service: str) -> dict[str, Any]:
        """`docker inspect` of the service's (first) container."""
        ids = self("ps", "-a", "-q", service, timeout=60).stdout.split()
        assert ids, f"no {service} container:\n{self.logs()}"
        return json.loads(run(["docker", "inspect", ids[0]], timeout=60).stdout)[0]

    def down(self) -> subprocess.CompletedProcess[str]:
        self.down_done = True
        return self("down", "-v", "--remove-orphans", "--timeout", "20", timeout=300)


@pytest.fixture(scope="module")
def stack(docker: list[str], image: str) -> Iterator[Stack]:
    """The compose stack up and healthy: a --smoke trainer run, the api and Prometheus; always torn down."""
    api_port, prometheus_port = free_port(), free_port()
    while prometheus_port == api_port:
        prometheus_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BNSERVE_")}
    env.update(
        BNSERVE_IMAGE=image,
        BNSERVE_BIND="127.0.0.1",
        BNSERVE_HOST_PORT=str(api_port),
        PROMETHEUS_BIND="127.0.0.1",
        PROMETHEUS_HOST_PORT=str(prometheus_port),
        TRAIN_ARGS="--smoke",
    )
    s = Stack(
        compose=docker,
        project=f"bnserve-e2e-{uuid.uuid4().hex[:8]}",
        env=env,
        api_url=f"http://127.0.0.1:{api_port}",
        prometheus_url=f"http://127.0.0.1:{prometheus_port}",
    )
    try:
        started = time.monotonic()
        up = s("up", "-d", "--no-build", timeout=900)
        print(f"compose up: exit {up.returncode} in {time.monotonic() - started:.0f} s")
        assert up.returncode == 0, f"compose up failed:\n{tail(up)}\n{s.logs()}"
        wait_for("api /readyz via the published port", lambda: httpx.get(f"{s.api_url}/readyz", timeout=5).is_success)
        yield s
    finally:
        if not s.down_done:
            down = s.down()
            left = containers_volumes_networks(s.project)
            assert down.returncode == 0 and not any(left.values()), f"teardown left {left}:\n{tail(down)}"


def containers_volumes_networks(project: str) -> dict[str, list[str]]:
    """Whatever Docker still holds with this compose project's label."""
    label = f"label=com.docker.compose.project={project}"
    found = {}
    for kind, cmd in {
        "containers": ["docker", "ps", "-a", "-q", "--filter", label],
        "volumes": ["docker", "volume", "ls", "-q", "--filter", label],
        "networks": ["docker", "network", "ls", "-q", "--filter", label],
    }.items():
        proc = run(cmd, timeout=60)
        assert proc.returncode == 0, tail(proc)
        found[kind] = proc.stdout.split()
    return found


def predict(stack: Stack, images: np.ndarray) -> list[int]:
    """Labels from POST /v1/predict, in batches the service accepts."""
    labels: list[int] = []
    for start in range(0, len(images), BATCH):
        batch = images[start : start + BATCH]
        r = httpx.post(
            f"{stack.api_url}/v1/predict", json={"instances": batch.reshape(len(batch), -1).tolist()}, timeout=30
        )
        assert r.status_code == 200, r.text
        labels += [p["label"] for p in r.json()["predictions"]]
    return labels


def prometheus_query(stack: Stack, promql: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{stack.prometheus_url}/api/v1/query", params={"query": promql}, timeout=10)
    assert r.status_code == 200, r.text
    return list(r.json()["data"]["result"])


def test_api_runs_hardened_as_configured(stack: Stack, image: str) -> None:
    api = stack.container("api")
    assert api["Config"]["Image"] == image
    assert api["Config"]["User"] == "10001:10001"
    assert api["HostConfig"]["ReadonlyRootfs"] is True
    assert api["Path"] == "/usr/bin/tini", "tini is PID 1 so SIGTERM reaches uvicorn"
    assert api["State"]["Health"]["Status"] == "healthy"
    assert "/readyz" in " ".join(api["Config"]["Healthcheck"]["Test"]), "compose keeps the image's check"
    published = api["NetworkSettings"]["Ports"]["8000/tcp"]
    assert {p["HostIp"] for p in published} == {"127.0.0.1"}, "loopback only by default"
    mounts = {m["Destination"]: m for m in api["Mounts"]}
    assert mounts["/artifacts"]["RW"] is False
    trainer = stack.container("trainer")
    assert trainer["State"]["Status"] == "exited"
    assert trainer["State"]["ExitCode"] == 0


def test_api_predicts_real_mnist_through_the_published_port(stack: Stack, mnist: MnistSplits) -> None:
    ready = httpx.get(f"{stack.api_url}/readyz", timeout=5).json()
    assert ready["status"] == "ready"
    assert ready["model"]["name"] == "mnist-bn"
    images = mnist.test_x[:512].astype(np.float32) / 255.0
    labels = predict(stack, images)
    accuracy = float(np.mean(np.array(labels) == mnist.test_y[:512]))
    assert accuracy >= 0.9, f"the --smoke model reads {accuracy:.1%} of MNIST test digits"


def test_prometheus_scrapes_the_api_and_its_drift_series(stack: Stack, mnist: MnistSplits) -> None:
    # Fill the drift window with clean traffic: the drift score gauges exist only once it is full. Paced like light
    # traffic: back to back, the drift budget (1 % of the time, 10 ms of saved credit) monitors only the first
    # batches of 64 (a monitored pass of 64 images costs several ms more than a plain one).
    # Until the window is full, whatever share of the batches the budget monitors on this machine.
    clean = mnist.test_x[1000:4000].astype(np.float32) / 255.0
    for start in range(0, len(clean), BATCH):
        predict(stack, clean[start : start + BATCH])
        if httpx.get(f"{stack.api_url}/v1/drift", timeout=10).json()["window_images"] >= DRIFT_WINDOW:
            break
        time.sleep(1.0)
    else:
        pytest.fail("the drift window did not fill from 3000 clean images sent 1 s apart")
    up = wait_for(
        "Prometheus sees the api target up",
        lambda: [s for s in prometheus_query(stack, 'up{job="bnserve"}') if s["value"][1] == "1"],
    )
    assert up[0]["metric"]["instance"] == "api:8000"
    drift = wait_for(
        "Prometheus holds bnserve_drift_score for the BN layers",
        lambda: prometheus_query(stack, "bnserve_drift_score"),
    )
    assert {s["metric"]["layer"] for s in drift}, drift
    names = {s["metric"]["__name__"] for s in prometheus_query(stack, '{__name__=~"bnserve_drift_.+"}')}
    assert {"bnserve_drift_score", "bnserve_drift_threshold", "bnserve_drift_window_size"} <= names, names
    groups = httpx.get(f"{stack.prometheus_url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    assert any(g["file"].startswith("/etc/prometheus/") and g["rules"] for g in groups), "alert rules were mounted"


def test_trainer_rerun_keeps_the_existing_artifact(stack: Stack) -> None:
    before = httpx.get(f"{stack.api_url}/readyz", timeout=5).json()["model"]["version"]
    started = time.monotonic()
    proc = stack("run", "--rm", "-T", "trainer", timeout=300)
    assert proc.returncode == 0, tail(proc)
    assert "wrote /artifacts" not in proc.stdout + proc.stderr, "an existing artifact must not be retrained"
    assert time.monotonic() - started < 60
    assert httpx.get(f"{stack.api_url}/readyz", timeout=5).json()["model"]["version"] == before


def test_sigterm_reaches_uvicorn_through_tini(stack: Stack) -> None:
    started = time.monotonic()
    proc = stack("stop", "--timeout", "30", "api", timeout=120)
    assert proc.returncode == 0, tail(proc)
    assert time.monotonic() - started < 20, "stopped by SIGTERM, not killed after the grace period"
    api = stack.container("api")
    assert api["State"]["ExitCode"] == 0, "a drained uvicorn exits 143, which tini -e 143 reports as 0"
    assert "Application shutdown complete" in stack("logs", "--no-color", "api", timeout=60).stdout


def test_down_removes_the_project_and_keeps_the_standins(stack: Stack, image: str) -> None:
    assert any(containers_volumes_networks(stack.project).values()), "the stack was up"
    proc = stack.down()
    assert proc.returncode == 0, tail(proc)
    assert containers_volumes_networks(stack.project) == {"containers": [], "volumes": [], "networks": []}
    proc = run(["docker", "rmi", "--no-prune", image], timeout=120)
    assert proc.returncode == 0, tail(proc)
    assert run(["docker", "image", "inspect", image], timeout=60).returncode != 0
    for tag in STANDINS:
        assert run(["docker", "image", "inspect", tag], timeout=60).returncode == 0, f"stand-in {tag} stays cached"
