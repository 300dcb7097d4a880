"""The v1 HTTP API of a real server (uvicorn subprocess), hit with httpx."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from model.artifact import Artifact
from tests.support import ADMIN_TOKEN, ServerProcess, direct_probabilities, metric

pytestmark = pytest.mark.integration
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def test_predictions_equal_a_direct_forward_pass(server: ServerProcess, tiny_artifact: Artifact, test_images) -> None:  # type: ignore[no-untyped-def]
    images, labels = test_images
    batch = images[:16]
    r = httpx.post(f"{server.url}/v1/predict", json={"instances": batch.reshape(16, -1).tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == {"name": tiny_artifact.meta.name, "version": "tiny-v1"}
    got = np.array([p["probabilities"] for p in body["predictions"]])
    np.testing.assert_allclose(got, direct_probabilities(tiny_artifact, batch), rtol=1e-5, atol=1e-6)
    assert [p["label"] for p in body["predictions"]] == got.argmax(1).tolist()
    assert all(p["class_name"] == str(p["label"]) for p in body["predictions"])
    assert np.mean(got.argmax(1) == labels[:16]) >= 0.75, "even the smoke model reads most digits"


def test_nested_28x28_equals_flat(server: ServerProcess, test_images) -> None:  # type: ignore[no-untyped-def]
    images, _ = test_images
    flat = httpx.post(f"{server.url}/v1/predict", json={"instances": images[:2].reshape(2, -1).tolist()}).json()
    nested = httpx.post(f"{server.url}/v1/predict", json={"instances": images[:2].tolist()}).json()
    assert flat["predictions"] == nested["predictions"]


async def test_concurrent_clients_get_lone_forward_probabilities(
    server: ServerProcess, tiny_artifact: Artifact, test_images
) -> None:  # type: ignore[no-untyped-def]
    """Batch composition must not change any client's answer: 64 clients at once, each checked exactly."""
    images, _ = test_images
    expected = direct_probabilities(tiny_artifact, images[:64])
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30) as client:

        async def one(i: int) -> list[float]:
            r = await client.post("/v1/predict", json={"instances": [images[i].reshape(-1).tolist()]})
            assert r.status_code == 200, r.text
            return r.json()["predictions"][0]["probabilities"]

        got = await asyncio.gather(*(one(i) for i in range(64)))
    np.testing.assert_allclose(np.array(got), expected, rtol=1e-5, atol=1e-6)
    metrics = httpx.get(f"{server.url}/metrics").text
    assert metric(metrics, "bnserve_batch_size_images_count") > 0


BAD_INPUTS = [
    (b"{not json", 400, "not valid JSON"),
    (b'{"instances": []}', 422, "at least one instance"),
    (b'{"instances": 5}', 422, "instances"),
    (b'{"images": [[0.5]]}', 422, "instances"),
    (b"[0.1, 0.2]", 422, "object"),
    (b'{"instances": [[' + b",".join([b"0.5"] * 783) + b"]]}", 422, "784 numbers or 28×28 nested lists, got 783"),
    (b'{"instances": [[' + b",".join([b"0.5"] * 785) + b"]]}", 422, "got 785"),
    (b'{"instances": [[' + b",".join([b"0.5"] * 784) + b"], [0.5]]}", 422, "instances[1]: expected 784 values, got 1"),
    (b'{"instances": [[' + b",".join([b"[" + b",".join([b"0"] * 28) + b"]"] * 27) + b"]]}", 422, "got 27×28"),
    (b'{"instances": [[0.5, "0.5"]]}', 422, "instances[0][1]: Input should be a valid number (got '0.5')"),
    (b'{"instances": [[0.5, true]]}', 422, "got true"),
    (b'{"instances": [[0.5, null]]}', 422, "got null"),
    (b'{"instances": [[NaN, 0.5]]}', 422, "finite"),
    (b'{"instances": [[Infinity]]}', 422, "finite"),
    (
        b'{"instances": [[' + b",".join([b"0.5"] * 783) + b", 1e300]]}",
        422,
        "must be in [0, 1]; found 1e+300 at pixel 783",
    ),
    (b'{"instances": [[' + b",".join([b"-0.5"] * 784) + b"]]}", 422, "found -0.5"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_INPUTS)
def test_bad_input_gets_a_precise_4xx(server: ServerProcess, body: bytes, status: int, message: str) -> None:
    r = httpx.post(f"{server.url}/v1/predict", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()
    assert set(err) <= {"error", "code", "loc"} and isinstance(err["error"], str)
    assert message in err["error"]


def test_limits_and_content_type(server: ServerProcess) -> None:
    too_many = {"instances": [[0.0] * 784] * 65}
    r = httpx.post(f"{server.url}/v1/predict", json=too_many)
    assert r.status_code == 422 and "limit is 64" in r.json()["error"] and r.json()["code"] == "too_many_instances"
    r = httpx.post(
        f"{server.url}/v1/predict", content=b'{"instances": [[0.5]]}', headers={"Content-Type": "text/plain"}
    )
    assert r.status_code == 415 and "application/json" in r.json()["error"]
    r = httpx.post(
        f"{server.url}/v1/predict", content=b"x" * (5 * 1024 * 1024), headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"
    r = httpx.get(f"{server.url}/v1/nothing-here")
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    r = httpx.get(f"{server.url}/v1/predict")
    assert r.status_code == 405 and "error" in r.json()


def test_server_healthy_after_bad_inputs(server: ServerProcess, test_images) -> None:  # type: ignore[no-untyped-def]
    for body, _, _ in BAD_INPUTS:
        httpx.post(f"{server.url}/v1/predict", content=body, headers={"Content-Type": "application/json"})
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    images, _ = test_images
    r = httpx.post(f"{server.url}/v1/predict", json={"instances": images[:8].tolist()})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 8
    assert "unhandled error" not in server.logs(), "no bad input may reach the 500 handler"


def test_metrics_move_after_requests(server: ServerProcess, test_images) -> None:  # type: ignore[no-untyped-def]
    images, _ = test_images
    before = httpx.get(f"{server.url}/metrics").text
    r = httpx.post(f"{server.url}/v1/predict", json={"instances": images[:10].reshape(10, -1).tolist()})
    httpx.post(f"{server.url}/v1/predict", content=b"{", headers={"Content-Type": "application/json"})
    after = httpx.get(f"{server.url}/metrics").text
    labels = [p["label"] for p in r.json()["predictions"]]
    ok = {"route": "/v1/predict", "method": "POST", "status": "200"}
    assert metric(after, "bnserve_http_requests_total", **ok) == metric(before, "bnserve_http_requests_total", **ok) + 1
    bad = {"route": "/v1/predict", "method": "POST", "status": "400"}
    assert (
        metric(after, "bnserve_http_requests_total", **bad) == metric(before, "bnserve_http_requests_total", **bad) + 1
    )
    assert metric(after, "bnserve_http_request_duration_seconds_count", **ok) > metric(
        before, "bnserve_http_request_duration_seconds_count", **ok
    )
    label = str(labels[0])
    delta = metric(after, "bnserve_predictions_total", **{"class": label}) - metric(
        before, "bnserve_predictions_total", **{"class": label}
    )
    assert delta == labels.count(labels[0])
    assert (
        metric(after, "bnserve_prediction_confidence_count")
        == metric(before, "bnserve_prediction_confidence_count") + 10
    )
    assert 'bnserve_model_info{name="' in after and 'version="tiny-v1"' in after
    assert metric(after, "bnserve_model_ready") == 1.0
    httpx.get(f"{server.url}/some/random/path-12345")
    text = httpx.get(f"{server.url}/metrics").text
    assert metric(text, "bnserve_http_requests_total", route="unmatched", method="GET", status="404") >= 1
    assert "path-12345" not in text, "raw paths never become label values"


def test_drift_report_and_admin_auth(server: ServerProcess, test_images) -> None:  # type: ignore[no-untyped-def]
    r = httpx.post(f"{server.url}/v1/drift/reset")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = httpx.post(f"{server.url}/v1/drift/reset", headers={"Authorization": "Bearer wrong-token-wrong-token"})
    assert r.status_code == 401
    assert httpx.post(f"{server.url}/v1/drift/reset", headers=AUTH).status_code == 200
    report = httpx.get(f"{server.url}/v1/drift").json()
    assert report["status"] == "warming_up" and report["window_images"] == 0 and report["model"]["version"] == "tiny-v1"
    images, _ = test_images
    for i in range(0, 128, 32):
        httpx.post(f"{server.url}/v1/predict", json={"instances": images[i : i + 32].tolist()})
    report = httpx.get(f"{server.url}/v1/drift").json()
    assert report["window"] == 64 and report["window_images"] == 64 and report["status"] in ("ok", "drift")
    layer = report["layers"][0]
    assert set(layer) >= {"layer", "status", "score", "threshold", "ratio", "window_images", "top_channels"}
    assert layer["ratio"] == pytest.approx(layer["score"] / layer["threshold"])
    assert len(layer["top_channels"]) == 5


def test_readiness_before_and_after_the_model_loads(tmp_path: Path, tiny_artifact_dir: Path) -> None:
    target = tmp_path / "model"
    with ServerProcess(target, wait_ready=False, admin_token=ADMIN_TOKEN) as srv:
        r = httpx.get(f"{srv.url}/readyz")
        assert r.status_code == 503 and "failed to load" in r.json()["error"]
        assert httpx.get(f"{srv.url}/healthz").status_code == 200
        r = httpx.post(f"{srv.url}/v1/predict", json={"instances": [[0.0] * 784]})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "bnserve_model_ready 0.0" in httpx.get(f"{srv.url}/metrics").text
        shutil.copytree(tiny_artifact_dir, target)
        assert httpx.post(f"{srv.url}/v1/admin/reload", headers=AUTH, timeout=60).status_code == 200
        r = httpx.get(f"{srv.url}/readyz")
        assert r.status_code == 200 and r.json()["model"]["version"] == "tiny-v1"


def test_admin_routes_disabled_without_token(tiny_artifact_dir: Path) -> None:
    with ServerProcess(tiny_artifact_dir) as srv:
        for path in ("/v1/drift/reset", "/v1/admin/reload"):
            r = httpx.post(srv.url + path, headers=AUTH)
            assert r.status_code == 404 and "disabled" in r.json()["error"]
