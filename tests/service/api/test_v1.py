"""The /v1 API in process (create_app behind httpx.ASGITransport): answers, errors, metrics, drift, admin, readiness."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from model.artifact import WEIGHTS_FILE, Artifact
from tests.inprocess import RunningApp, running_app
from tests.support import ADMIN_TOKEN, direct_probabilities

pytestmark = pytest.mark.asyncio(loop_scope="module")
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
JSON = {"Content-Type": "application/json"}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def app(tiny_artifact_dir: Path) -> AsyncIterator[RunningApp]:
    async with running_app(tiny_artifact_dir, admin_token=ADMIN_TOKEN, drift_window=64, drift_sample=1.0) as a:
        yield a


async def test_predictions_equal_a_direct_forward_pass(app: RunningApp, tiny_artifact: Artifact, test_images) -> None:  # type: ignore[no-untyped-def]
    images, labels = test_images
    batch = images[:16]
    r = await app.client.post("/v1/predict", json={"instances": batch.reshape(16, -1).tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == {"name": tiny_artifact.meta.name, "version": "tiny-v1"}
    got = np.array([p["probabilities"] for p in body["predictions"]])
    np.testing.assert_allclose(got, direct_probabilities(tiny_artifact, batch), rtol=1e-5, atol=1e-6)
    assert [p["label"] for p in body["predictions"]] == got.argmax(1).tolist()
    assert all(p["class_name"] == str(p["label"]) for p in body["predictions"])
    assert np.mean(got.argmax(1) == labels[:16]) >= 0.75, "even the smoke model reads most digits"


async def test_nested_28x28_equals_flat(app: RunningApp, test_images) -> None:  # type: ignore[no-untyped-def]
    images, _ = test_images
    flat = (await app.client.post("/v1/predict", json={"instances": images[:2].reshape(2, -1).tolist()})).json()
    nested = (await app.client.post("/v1/predict", json={"instances": images[:2].tolist()})).json()
    assert flat["predictions"] == nested["predictions"]


async def test_concurrent_clients_get_lone_forward_probabilities(
    app: RunningApp, tiny_artifact: Artifact, test_images
) -> None:  # type: ignore[no-untyped-def]
    """Batch composition must not change any client's answer: 64 clients at once, each checked exactly."""
    images, _ = test_images
    expected = direct_probabilities(tiny_artifact, images[:64])
    batches_before = app.sample("bnserve_batch_size_images_count")

    async def one(i: int) -> list[float]:
        r = await app.client.post("/v1/predict", json={"instances": [images[i].reshape(-1).tolist()]})
        assert r.status_code == 200, r.text
        return r.json()["predictions"][0]["probabilities"]

    got = await asyncio.gather(*(one(i) for i in range(64)))
    np.testing.assert_allclose(np.array(got), expected, rtol=1e-5, atol=1e-6)
    batches = app.sample("bnserve_batch_size_images_count") - batches_before
    assert 0 < batches < 64, "concurrent requests were batched"


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
async def test_bad_input_gets_a_precise_4xx_and_is_counted(
    app: RunningApp, body: bytes, status: int, message: str
) -> None:
    labels = {"route": "/v1/predict", "method": "POST", "status": str(status)}
    before = app.sample("bnserve_http_requests_total", **labels)
    r = await app.client.post("/v1/predict", content=body, headers=JSON)
    assert r.status_code == status, r.text
    err = r.json()
    assert set(err) <= {"error", "code", "loc"} and isinstance(err["error"], str)
    assert message in err["error"]
    assert app.sample("bnserve_http_requests_total", **labels) == before + 1


async def test_limits_and_content_type(app: RunningApp) -> None:
    too_many = {"instances": [[0.0] * 784] * 65}
    r = await app.client.post("/v1/predict", json=too_many)
    assert r.status_code == 422 and "limit is 64" in r.json()["error"] and r.json()["code"] == "too_many_instances"
    r = await app.client.post("/v1/predict", content=b'{"instances": [[0.5]]}', headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]
    r = await app.client.post("/v1/predict", content=b"x" * (5 * 1024 * 1024), headers=JSON)
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"
    r = await app.client.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    r = await app.client.get("/v1/predict")
    assert r.status_code == 405 and "error" in r.json()
    assert app.sample("bnserve_http_requests_total", route="/v1/predict", method="POST", status="413") >= 1


async def test_metrics_move_after_requests(app: RunningApp, test_images) -> None:  # type: ignore[no-untyped-def]
    images, _ = test_images
    ok = {"route": "/v1/predict", "method": "POST", "status": "200"}
    bad = {"route": "/v1/predict", "method": "POST", "status": "400"}
    before = {
        name: app.sample(name, **ok)
        for name in ("bnserve_http_requests_total", "bnserve_http_request_duration_seconds_count")
    }
    bad_before = app.sample("bnserve_http_requests_total", **bad)
    confidences = app.sample("bnserve_prediction_confidence_count")
    r = await app.client.post("/v1/predict", json={"instances": images[:10].reshape(10, -1).tolist()})
    labels = [p["label"] for p in r.json()["predictions"]]
    per_class = app.sample("bnserve_predictions_total", **{"class": str(labels[0])})
    await app.client.post("/v1/predict", content=b"{", headers=JSON)
    assert app.sample("bnserve_http_requests_total", **ok) == before["bnserve_http_requests_total"] + 1
    assert (
        app.sample("bnserve_http_request_duration_seconds_count", **ok)
        > before["bnserve_http_request_duration_seconds_count"]
    )
    assert app.sample("bnserve_http_requests_total", **bad) == bad_before + 1
    assert app.sample("bnserve_prediction_confidence_count") == confidences + 10
    assert per_class >= labels.count(labels[0])
    assert (
        app.sample("bnserve_model_info", name=app.state.model.name, version="tiny-v1", sha256=app.state.model.sha256)
        == 1
    )  # type: ignore[union-attr]
    assert app.sample("bnserve_model_ready") == 1.0
    await app.client.get("/some/random/path-12345")
    assert app.sample("bnserve_http_requests_total", route="unmatched", method="GET", status="404") >= 1
    text = (await app.client.get("/metrics")).text
    assert "path-12345" not in text, "raw paths never become label values"


async def test_drift_report_and_admin_auth(app: RunningApp, test_images) -> None:  # type: ignore[no-untyped-def]
    r = await app.client.post("/v1/drift/reset")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = await app.client.post("/v1/drift/reset", headers={"Authorization": "Bearer wrong-token-wrong-token"})
    assert r.status_code == 401
    assert (await app.client.post("/v1/drift/reset", headers=AUTH)).status_code == 200
    report = (await app.client.get("/v1/drift")).json()
    assert report["status"] == "warming_up" and report["window_images"] == 0 and report["model"]["version"] == "tiny-v1"
    images, _ = test_images
    for i in range(0, 128, 32):
        await app.client.post("/v1/predict", json={"instances": images[i : i + 32].tolist()})
    report = (await app.client.get("/v1/drift")).json()
    assert report["window"] == 64 and report["window_images"] == 64 and report["status"] in ("ok", "drift")
    layer = report["layers"][0]
    assert set(layer) >= {"layer", "status", "score", "threshold", "ratio", "window_images", "top_channels"}
    assert layer["ratio"] == pytest.approx(layer["score"] / layer["threshold"])
    assert len(layer["top_channels"]) == 5
    await app.client.get("/metrics")
    assert app.sample("bnserve_drift_window_images", layer=layer["layer"]) == 64


async def test_readiness_before_and_after_the_model_loads_and_no_path_is_shown(
    tmp_path: Path, tiny_artifact_dir: Path
) -> None:
    target = tmp_path / "secret-location" / "model"
    async with running_app(target, wait_ready=False, admin_token=ADMIN_TOKEN) as app:
        async with asyncio.timeout(30):
            while app.state.load_error is None:
                await asyncio.sleep(0.01)
        r = await app.client.get("/readyz")
        assert r.status_code == 503 and "failed to load" in r.json()["error"]
        assert "secret-location" not in r.text, "readiness never shows filesystem paths"
        assert (await app.client.get("/healthz")).status_code == 200
        r = await app.client.post("/v1/predict", json={"instances": [[0.0] * 784]})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert app.sample("bnserve_model_ready") == 0.0
        r = await app.client.post("/v1/admin/reload", headers=AUTH)
        assert r.status_code == 422 and "secret-location" not in r.text and "<artifact>" in r.json()["error"]
        shutil.copytree(tiny_artifact_dir, target)
        assert (await app.client.post("/v1/admin/reload", headers=AUTH)).status_code == 200
        r = await app.client.get("/readyz")
        assert r.status_code == 200 and r.json()["model"]["version"] == "tiny-v1"


async def test_a_refused_reload_names_no_path(tmp_path: Path, tiny_artifact_dir: Path) -> None:
    target = tmp_path / "secret-location" / "model"
    shutil.copytree(tiny_artifact_dir, target)
    async with running_app(target, admin_token=ADMIN_TOKEN) as app:
        (target / WEIGHTS_FILE).write_bytes(b"tampered")
        r = await app.client.post("/v1/admin/reload", headers=AUTH)
        assert r.status_code == 422 and "hash mismatch" in r.json()["error"]
        assert "secret-location" not in r.text and str(tmp_path) not in r.text
        assert app.sample("bnserve_model_reloads_total", result="failure") == 1


async def test_admin_routes_disabled_without_token(tiny_artifact_dir: Path) -> None:
    async with running_app(tiny_artifact_dir) as app:
        for path in ("/v1/drift/reset", "/v1/admin/reload"):
            r = await app.client.post(path, headers=AUTH)
            assert r.status_code == 404 and "disabled" in r.json()["error"]


async def test_two_apps_in_one_process_share_no_state(tiny_artifact_dir: Path, test_images) -> None:  # type: ignore[no-untyped-def]
    images, _ = test_images
    async with (
        running_app(tiny_artifact_dir, drift_window=16) as a,
        running_app(tiny_artifact_dir, drift_window=32) as b,
    ):
        assert a.app.state.metrics.registry is not b.app.state.metrics.registry
        for _ in range(3):
            assert (await a.client.post("/v1/predict", json={"instances": images[:4].tolist()})).status_code == 200
        ok = {"route": "/v1/predict", "method": "POST", "status": "200"}
        assert (a.sample("bnserve_http_requests_total", **ok), b.sample("bnserve_http_requests_total", **ok)) == (3, 0)
        assert (a.sample("bnserve_predictions_total", **{"class": "0"}) >= 0) and b.sample(
            "bnserve_prediction_confidence_count"
        ) == 0
        drift_a, drift_b = (await a.client.get("/v1/drift")).json(), (await b.client.get("/v1/drift")).json()
        assert (drift_a["window"], drift_a["images_seen"]) == (16, 12)
        assert (drift_b["window"], drift_b["images_seen"]) == (32, 0)


async def test_the_method_label_is_bounded(app: RunningApp) -> None:
    for method in ("BREW", "X" * 200):
        r = await app.client.request(method, "/v1/predict")
        assert r.status_code in (404, 405) and "error" in r.json()
    text = (await app.client.get("/metrics")).text
    assert "BREW" not in text and "X" * 50 not in text, "a client's method never becomes a label value"
    assert app.sample("bnserve_http_requests_total", route="/v1/predict", method="other", status="405") == 2
