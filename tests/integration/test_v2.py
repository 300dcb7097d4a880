"""The Open Inference Protocol V2 on a real server (uvicorn subprocess), hit with httpx."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from model.artifact import Artifact
from tests.support import ADMIN_TOKEN, ServerProcess
from training.data import MnistSplits

pytestmark = pytest.mark.integration
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
N = 4  # images per request


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def model(tiny_artifact: Artifact) -> str:
    return f"/v2/models/{tiny_artifact.meta.name}"


@pytest.fixture(scope="module")
def images_u8(mnist: MnistSplits) -> np.ndarray:
    """N real test digits as uint8 (N, 28, 28); as float32 / 255 they are exactly `test_images`."""
    return mnist.test_x[:N]


@pytest.fixture(scope="module")
def v1_probabilities(client: httpx.Client, images_u8: np.ndarray) -> np.ndarray:
    pixels = images_u8.astype(np.float32) / np.float32(255.0)
    r = client.post("/v1/predict", json={"instances": pixels.reshape(N, -1).tolist()})
    assert r.status_code == 200, r.text
    return np.array([p["probabilities"] for p in r.json()["predictions"]], dtype=np.float32)


def tensor(data: Any, shape: list[int], datatype: str = "FP32", name: str = "input") -> dict[str, Any]:
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


def infer(client: httpx.Client, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    return client.post(f"{path}/infer", json=body, **kwargs)


def outputs(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {o["name"]: o for o in body["outputs"]}


def test_server_metadata(client: httpx.Client) -> None:
    r = client.get("/v2")
    assert r.status_code == 200
    assert r.json() == {
        "name": "bnserve",
        "version": client.get("/openapi.json").json()["info"]["version"],
        "extensions": [],
    }


@pytest.mark.parametrize("path", ["/v2/health/live", "/v2/health/ready"])
def test_health_is_200_with_an_empty_body(client: httpx.Client, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 200
    assert r.content == b""


@pytest.mark.parametrize("versioned", [False, True])
def test_model_metadata(client: httpx.Client, model: str, tiny_artifact: Artifact, versioned: bool) -> None:
    r = client.get(f"{model}/versions/tiny-v1" if versioned else model)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "name": tiny_artifact.meta.name,
        "versions": ["tiny-v1"],
        "platform": "pytorch_safetensors",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
            {"name": "label", "datatype": "INT64", "shape": [-1]},
        ],
    }


@pytest.mark.parametrize("suffix", ["/ready", "/versions/tiny-v1/ready"])
def test_model_ready(client: httpx.Client, model: str, suffix: str) -> None:
    r = client.get(model + suffix)
    assert r.status_code == 200
    assert r.content == b""


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v2/models/no-such-model"),
        ("GET", "/v2/models/no-such-model/ready"),
        ("POST", "/v2/models/no-such-model/infer"),
        ("GET", "{model}/versions/tiny-v2"),
        ("GET", "{model}/versions/tiny-v2/ready"),
        ("POST", "{model}/versions/tiny-v2/infer"),
    ],
)
def test_unknown_model_or_version_is_404(client: httpx.Client, model: str, method: str, path: str) -> None:
    body = {"inputs": [tensor([0.0] * 784, [1, 784])]}
    r = client.request(method, path.format(model=model), json=body if method == "POST" else None)
    assert r.status_code == 404
    error = r.json()["error"]
    assert isinstance(error, str)
    assert ("no-such-model" if "no-such-model" in path else "tiny-v2") in error


def test_spec_example_round_trip(client: httpx.Client, model: str, images_u8: np.ndarray) -> None:
    """The spec's example (an id, a batched input, one requested output), in this model's tensor names."""
    data = (images_u8[:2].astype(np.float32) / 255).ravel().tolist()
    request = {"id": "42", "inputs": [tensor(data, [2, 784])], "outputs": [{"name": "probabilities"}]}
    r = infer(client, model, request)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body.keys() == {"model_name", "model_version", "id", "outputs"}
    assert (body["id"], body["model_version"]) == ("42", "tiny-v1")
    [output] = body["outputs"]
    assert output.keys() == {"name", "shape", "datatype", "data"}
    assert (output["name"], output["shape"], output["datatype"]) == ("probabilities", [2, 10], "FP32")
    assert len(output["data"]) == 20
    np.testing.assert_allclose(np.reshape(output["data"], (2, 10)).sum(axis=1), 1.0, atol=1e-5)


LAYOUTS: dict[str, tuple[list[int], Callable[[np.ndarray], Any]]] = {
    "flat [N,784]": ([N, 784], lambda x: x.ravel().tolist()),
    "nested [N,784]": ([N, 784], lambda x: x.reshape(N, 784).tolist()),
    "flat [N,28,28]": ([N, 28, 28], lambda x: x.ravel().tolist()),
    "nested [N,28,28]": ([N, 28, 28], lambda x: x.tolist()),
    "flat [N,1,28,28]": ([N, 1, 28, 28], lambda x: x.ravel().tolist()),
    "nested [N,1,28,28]": ([N, 1, 28, 28], lambda x: x[:, None].tolist()),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("datatype", ["FP32", "UINT8"])
def test_predictions_equal_v1(
    client: httpx.Client,
    model: str,
    images_u8: np.ndarray,
    v1_probabilities: np.ndarray,
    datatype: str,
    layout: str,
) -> None:
    shape, encode = LAYOUTS[layout]
    images = images_u8 if datatype == "UINT8" else images_u8.astype(np.float32) / np.float32(255.0)
    r = infer(client, model, {"inputs": [tensor(encode(images), shape, datatype)]})
    assert r.status_code == 200, r.text
    got = outputs(r.json())
    assert got["probabilities"]["shape"] == [N, 10]
    probabilities = np.reshape(got["probabilities"]["data"], (N, 10))
    np.testing.assert_allclose(probabilities, v1_probabilities, rtol=0, atol=1e-6)
    assert got["label"] == {
        "name": "label",
        "datatype": "INT64",
        "shape": [N],
        "data": v1_probabilities.argmax(axis=1).tolist(),
    }


def test_versioned_infer_equals_unversioned(client: httpx.Client, model: str, images_u8: np.ndarray) -> None:
    body = {"inputs": [tensor(images_u8.tolist(), [N, 28, 28], "UINT8")]}
    plain, versioned = infer(client, model, body), infer(client, f"{model}/versions/tiny-v1", body)
    assert plain.status_code == versioned.status_code == 200
    assert plain.json() == versioned.json()


@pytest.mark.parametrize(
    "wanted", [["label"], ["probabilities"], ["label", "probabilities"], ["probabilities", "label"]]
)
def test_outputs_filter_and_order(client: httpx.Client, model: str, wanted: list[str]) -> None:
    body = {"inputs": [tensor([0.0] * 784, [1, 784])], "outputs": [{"name": n} for n in wanted]}
    r = infer(client, model, body)
    assert r.status_code == 200, r.text
    assert [o["name"] for o in r.json()["outputs"]] == wanted


def test_id_is_echoed_only_when_given(client: httpx.Client, model: str) -> None:
    base = {"inputs": [tensor([0.0] * 784, [1, 784])]}
    assert infer(client, model, {**base, "id": "req-7/β"}).json()["id"] == "req-7/β"
    assert "id" not in infer(client, model, base).json()


BAD: dict[str, tuple[Any, str, str]] = {
    # name: (request body, error code, message fragment)
    "unknown output": (
        {"inputs": [tensor([0.0] * 784, [1, 784])], "outputs": [{"name": "output0"}]},
        "invalid_input",
        "outputs[0].name",
    ),
    "two inputs": ({"inputs": [tensor([0.0] * 784, [1, 784])] * 2}, "invalid_input", "exactly one input"),
    "wrong input name": ({"inputs": [tensor([0.0] * 784, [1, 784], name="input0")]}, "invalid_input", "'input0'"),
    "FP16": ({"inputs": [tensor([0.0] * 784, [1, 784], "FP16")]}, "invalid_input", "FP32 or UINT8"),
    "bad shape": ({"inputs": [tensor([0.0] * 784, [784])]}, "invalid_input", "inputs[0].shape"),
    "count mismatch": ({"inputs": [tensor([0.0] * 783, [1, 784])]}, "invalid_input", "got 783"),
    "ragged": ({"inputs": [tensor([[[0.0] * 28] * 27 + [[0.0] * 27]], [1, 28, 28])]}, "invalid_input", "data[0][27]"),
    "boolean pixel": ({"inputs": [tensor([True] + [0.0] * 783, [1, 784])]}, "invalid_input", "got true"),
    "string pixel": ({"inputs": [tensor(["0"] + [0.0] * 783, [1, 784])]}, "invalid_input", "got '0'"),
    "FP32 out of range": ({"inputs": [tensor([2.0] + [0.0] * 783, [1, 784])]}, "invalid_input", "[0, 1]"),
    "UINT8 out of range": ({"inputs": [tensor([0] * 783 + [256], [1, 784], "UINT8")]}, "invalid_input", "0..255"),
    "UINT8 fraction": ({"inputs": [tensor([0.5] * 784, [1, 784], "UINT8")]}, "invalid_input", "integer"),
    "too many images": ({"inputs": [tensor([0] * 65 * 784, [65, 784], "UINT8")]}, "too_many_instances", "limit is 64"),
    "no inputs": ({"id": "1"}, "invalid_input", "inputs"),
    "not an object": ([], "invalid_input", "object"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_requests_are_400_with_an_error_string(client: httpx.Client, model: str, case: str) -> None:
    body, code, fragment = BAD[case]
    r = infer(client, model, body)
    assert r.status_code == 400, r.text
    assert isinstance(r.json()["error"], str)
    assert r.json()["code"] == code
    assert fragment in r.json()["error"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity"])
def test_non_finite_and_invalid_json_are_400(client: httpx.Client, model: str, literal: str) -> None:
    raw = '{"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": [%s%s]}]}'
    r = client.post(
        f"{model}/infer", content=raw % (literal, ", 0" * 783), headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert "finite" in r.json()["error"]
    r = client.post(f"{model}/infer", content=b'{"inputs": [', headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "not valid JSON" in r.json()["error"]


def test_json_content_type_is_required(client: httpx.Client, model: str) -> None:
    r = client.post(f"{model}/infer", content=b'{"inputs": []}', headers={"content-type": "text/plain"})
    assert r.status_code == 415
    assert isinstance(r.json()["error"], str)


BINARY: dict[str, dict[str, Any]] = {
    "input binary_data_size": {
        "inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "parameters": {"binary_data_size": 3136}}]
    },
    "output binary_data": {
        "inputs": [tensor([0.0] * 784, [1, 784])],
        "outputs": [{"name": "label", "parameters": {"binary_data": True}}],
    },
    "binary_data_output": {"inputs": [tensor([0.0] * 784, [1, 784])], "parameters": {"binary_data_output": True}},
}


@pytest.mark.parametrize("case", BINARY)
def test_binary_tensor_extension_is_refused(client: httpx.Client, model: str, case: str) -> None:
    r = infer(client, model, BINARY[case])
    assert r.status_code == 400
    assert r.json()["code"] == "binary_data_unsupported"
    assert "not supported" in r.json()["error"]


def test_binary_request_header_is_refused_before_the_content_type(client: httpx.Client, model: str) -> None:
    """A Triton client's binary request: a JSON header of the given length, then raw tensor bytes."""
    header = b'{"inputs": [{"name": "input", "shape": [1, 784], "datatype": "UINT8", "parameters": {"binary_data_size": 784}}]}'
    r = client.post(
        f"{model}/infer",
        content=header + bytes(784),
        headers={"content-type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))},
    )
    assert r.status_code == 400
    assert r.json()["code"] == "binary_data_unsupported"


def test_binary_data_false_is_plain_json(client: httpx.Client, model: str) -> None:
    body = {
        "inputs": [tensor([0.0] * 784, [1, 784])],
        "parameters": {"binary_data_output": False},
        "outputs": [{"name": "label", "parameters": {"binary_data": False}}],
    }
    r = infer(client, model, body)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["name"] == "label"


def test_v2_traffic_feeds_the_drift_window(client: httpx.Client, model: str, images_u8: np.ndarray) -> None:
    assert client.post("/v1/drift/reset", headers=AUTH).status_code == 200
    before = client.get("/v1/drift").json()
    assert before["window_images"] == 0
    r = infer(client, model, {"inputs": [tensor(images_u8[:3].tolist(), [3, 28, 28], "UINT8")]})
    assert r.status_code == 200, r.text
    after = client.get("/v1/drift").json()
    assert after["window_images"] == 3
    assert after["images_seen"] == before["images_seen"] + 3


def test_openapi_documents_the_infer_request(client: httpx.Client, model: str) -> None:
    spec = client.get("/openapi.json").json()
    for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        operation = spec["paths"][path]["post"]
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        assert schema["required"] == ["inputs"]
        assert schema["properties"]["inputs"]["items"]["required"] == ["name", "shape", "datatype", "data"]
        assert {"400", "404", "415"} <= operation["responses"].keys()
    [example] = spec["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]["examples"]
    r = infer(client, model, example)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == example["id"]


def test_not_ready_server(tmp_path: Path) -> None:
    """Before a model is loaded (here: never), live is true, ready is a 4xx, and inference is refused."""
    with ServerProcess(tmp_path / "no-such-artifact", wait_ready=False) as srv, httpx.Client(base_url=srv.url) as c:
        live, ready = c.get("/v2/health/live"), c.get("/v2/health/ready")
        assert (live.status_code, live.content) == (200, b"")
        assert (ready.status_code, ready.content) == (400, b"")
        assert c.get("/v2/models/mnist-bn/ready").status_code == 400
        r = c.post("/v2/models/mnist-bn/infer", json={"inputs": [tensor([0.0] * 784, [1, 784])]})
        assert r.status_code == 503
        assert isinstance(r.json()["error"], str)
