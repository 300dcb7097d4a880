"""Hostile input against a real server: every endpoint gets a precise 4xx in the one error shape, never a 5xx.

The last tests check that the server came through it all: ready, still exact, and nothing unhandled in its log.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import select
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from model.artifact import Artifact
from tests.support import ADMIN_TOKEN, ServerProcess, direct_probabilities, png_claiming

pytestmark = pytest.mark.integration

JSON = {"Content-Type": "application/json"}
ROW = [0.5] * 784
MAX_INSTANCES = 64  # the server's default settings
MAX_BODY = 4 * 1024 * 1024
UPLOAD_LIMIT = 32 * 1024 * 1024  # the server's default BNSERVE_MAX_UPLOAD_BYTES


def assert_error(r: httpx.Response, status: int, *fragments: str, code: str | None = None) -> dict[str, Any]:
    """`r` is `status` with the one error shape, and its message names the problem (every fragment)."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()
    assert set(err) <= {"error", "code", "loc"} and {"error", "code"} <= set(err), err
    assert isinstance(err["error"], str) and err["error"].strip(), err
    assert isinstance(err["code"], str) and err["code"].strip(), err
    if "loc" in err:
        assert isinstance(err["loc"], list) and all(isinstance(p, str | int) for p in err["loc"]), err
    for fragment in fragments:
        assert fragment in err["error"], (fragment, err)
    if code is not None:
        assert err["code"] == code, err
    assert len(err["error"]) < 400, "the message quotes the client's input only briefly"
    assert "Traceback" not in err["error"] and "/work/" not in err["error"] and ".py" not in err["error"]
    return err


def nums(values: list[Any]) -> bytes:
    """A JSON array written by hand, so that NaN, Infinity and 1e400 reach the server as written."""
    return b"[" + b",".join(v if isinstance(v, bytes) else json.dumps(v).encode() for v in values) + b"]"


def v1(*instances: bytes) -> bytes:
    return b'{"instances": [' + b",".join(instances) + b"]}"


def tensor(data: bytes, shape: str = "[1, 784]", datatype: str = "FP32") -> bytes:
    return b'{"name": "input", "shape": %s, "datatype": "%s", "data": %s}' % (shape.encode(), datatype.encode(), data)


def v2(data: bytes, shape: str = "[1, 784]", datatype: str = "FP32") -> bytes:
    return b'{"inputs": [' + tensor(data, shape, datatype) + b"]}"


def row_with(value: bytes, at: int = 783) -> bytes:
    return nums([*ROW[:at], value, *ROW[at + 1 :]])


FLAT = nums(ROW)
NESTED = json.dumps([[0.5] * 28] * 28).encode()
DEEP = b"[" * 10_000 + b"]" * 10_000


@pytest.fixture(scope="module")
def v2_infer(server: ServerProcess, tiny_artifact: Artifact) -> str:
    return f"{server.url}/v2/models/{tiny_artifact.meta.name}/infer"


# ---- bodies that are not JSON at all, or not the right kind of JSON: the same for /v1/predict and V2 infer ----

# (body, v1 status, V2 status, fragments of the message)
NOT_JSON: dict[str, tuple[bytes, int, int, tuple[str, ...]]] = {
    "malformed": (b"{not json", 400, 400, ("not valid JSON", "line 1 column 2")),
    "empty body": (b"", 400, 400, ("not valid JSON", "EOF")),
    "truncated": (b'{"instances": [[0.5, 0.5', 400, 400, ("not valid JSON", "EOF")),
    "trailing garbage": (v1(FLAT) + b" }{", 400, 400, ("not valid JSON", "trailing")),
    "10000 levels of [": (DEEP, 400, 400, ("not valid JSON", "recursion limit")),
    "deep instances": (b'{"instances": ' + DEEP + b"}", 400, 400, ("not valid JSON", "recursion limit")),
    "deep V2 data": (v2(DEEP), 400, 400, ("not valid JSON", "recursion limit")),
    "non-UTF-8 bytes": (b'{"instances": [["\xff\xfe\xfd"]]}', 400, 400, ("not valid JSON",)),
    "latin-1 garbage": (b"\xff\xfe\x00\x01garbage", 400, 400, ("not valid JSON",)),
    "UTF-16 JSON": ('{"instances": [[0.5]]}'.encode("utf-16"), 400, 400, ("not valid JSON",)),
    "lone surrogate escape": (b'{"instances": [["\\ud800"]]}', 400, 400, ("not valid JSON",)),
    "top-level null": (b"null", 422, 400, ("body", "object")),
    "top-level number": (b"1e400", 422, 400, ("body", "object")),
    "top-level string": (b'"instances"', 422, 400, ("body", "object")),
    "top-level array": (b"[" + FLAT + b"]", 422, 400, ("body", "object")),
    "top-level boolean": (b"true", 422, 400, ("body", "object")),
}


@pytest.mark.parametrize("case", NOT_JSON)
@pytest.mark.parametrize("api", ["v1", "v2"])
def test_not_json_or_not_an_object(server: ServerProcess, v2_infer: str, api: str, case: str) -> None:
    body, v1_status, v2_status, fragments = NOT_JSON[case]
    url, status = (f"{server.url}/v1/predict", v1_status) if api == "v1" else (v2_infer, v2_status)
    err = assert_error(httpx.post(url, content=body, headers=JSON), status, *fragments)
    assert err["code"] == ("invalid_json" if status == 400 and "JSON" in fragments[0] else "invalid_input")


# ---- /v1/predict: (body, status, code, fragments) ----

V1_CASES: dict[str, tuple[bytes, int, str, tuple[str, ...]]] = {
    "instances is a number": (b'{"instances": 5}', 422, "invalid_input", ("instances", "valid array")),
    "instances is an object": (b'{"instances": {"a": 1}}', 422, "invalid_input", ("instances", "valid array")),
    "instances is a string": (b'{"instances": "' + FLAT + b'"}', 422, "invalid_input", ("instances", "array")),
    "instance is a number": (v1(b"0.5"), 422, "invalid_input", ("instances[0]", "valid array")),
    "wrong key": (b'{"images": [' + FLAT + b"]}", 422, "invalid_input", ("instances", "required")),
    "extra key": (b'{"instances": [' + FLAT + b'], "debug": true}', 422, "invalid_input", ("debug", "not permitted")),
    "string pixel": (v1(row_with(b'"0.5"', 17)), 422, "invalid_input", ("instances[0][17]", "got '0.5'")),
    "string row": (v1(FLAT, b'"' + b"0" * 784 + b'"'), 422, "invalid_input", ("instances[1]", "valid array")),
    "NaN": (v1(row_with(b"NaN", 3)), 422, "invalid_input", ("instances[0][3]", "finite")),
    "Infinity": (v1(FLAT, row_with(b"Infinity")), 422, "invalid_input", ("instances[1][783]", "finite")),
    "-Infinity": (v1(row_with(b"-Infinity", 0)), 422, "invalid_input", ("instances[0][0]", "finite")),
    "true": (v1(row_with(b"true", 5)), 422, "invalid_input", ("instances[0][5]", "got true")),
    "false": (v1(row_with(b"false", 5)), 422, "invalid_input", ("instances[0][5]", "got false")),
    "null pixel": (v1(row_with(b"null", 9)), 422, "invalid_input", ("instances[0][9]", "got null")),
    "1e308": (v1(row_with(b"1e308")), 422, "invalid_input", ("instances[0]", "[0, 1]", "1e+308", "pixel 783")),
    "1e400": (v1(row_with(b"1e400", 1)), 422, "invalid_input", ("instances[0][1]", "finite")),
    "400-digit integer": (v1(row_with(b"1" * 400, 2)), 422, "invalid_input", ("instances[0][2]", "finite", "...")),
    "negative": (v1(FLAT, row_with(b"-0.25", 10)), 422, "invalid_input", ("instances[1]", "found -0.25 at pixel 10")),
    "above 1": (v1(row_with(b"1.0001", 700)), 422, "invalid_input", ("instances[0]", "found 1.0001 at pixel 700")),
    "255": (v1(row_with(b"255", 0)), 422, "invalid_input", ("[0, 1]", "found 255")),
    "empty batch": (v1(), 422, "invalid_input", ("instances", "at least one")),
    "empty instance": (v1(b"[]"), 422, "invalid_input", ("instances[0]", "784 numbers or 28×28", "got 0")),
    "783 values": (v1(nums(ROW[:783])), 422, "invalid_input", ("instances[0]", "got 783")),
    "785 values": (v1(nums([*ROW, 0.5])), 422, "invalid_input", ("instances[0]", "got 785")),
    "ragged batch": (v1(FLAT, nums(ROW[:783])), 422, "invalid_input", ("instances[1]", "expected 784 values, got 783")),
    "27x28": (v1(json.dumps([[0.5] * 28] * 27).encode()), 422, "invalid_input", ("instances[0]", "got 27×28")),
    "28x27": (v1(json.dumps([[0.5] * 27] * 28).encode()), 422, "invalid_input", ("instances[0]", "got 28×27")),
    "ragged rows": (
        v1(json.dumps([[0.5] * 28] * 27 + [[0.5] * 27]).encode()),
        422,
        "invalid_input",
        ("instances[0][27]", "expected 28 values per row, got 27"),
    ),
    "array among pixels": (v1(FLAT, row_with(b"[0.5]")), 422, "invalid_input", ("instances[1][783]", "got an array")),
    "number among rows": (
        v1(NESTED, json.dumps([[0.5] * 28] * 27 + [0.5]).encode()),
        422,
        "invalid_input",
        ("instances[1][27]", "valid array"),
    ),
    "flat after nested": (v1(NESTED, FLAT), 422, "invalid_input", ("instances[1][0]",)),
    "1x1x28x28": (v1(b"[" + NESTED + b"]"), 422, "invalid_input", ("instances[0]",)),
    "65 instances": (v1(*[FLAT] * 65), 422, "too_many_instances", ("65 images", "limit is 64")),
    "megabyte key": (b'{"' + b"k" * 1_000_000 + b'": 1}', 422, "invalid_input", ("instances", "required")),
    "megabyte extra key": (
        b'{"instances": [' + FLAT + b'], "' + b"k" * 1_000_000 + b'": 1}',
        422,
        "invalid_input",
        ("kkk...", "not permitted"),
    ),
}


@pytest.mark.parametrize("case", V1_CASES)
def test_v1_predict_bad_input(server: ServerProcess, case: str) -> None:
    body, status, code, fragments = V1_CASES[case]
    r = httpx.post(f"{server.url}/v1/predict", content=body, headers=JSON, timeout=30)
    assert_error(r, status, *fragments, code=code)


# ---- V2 infer: (body, code, fragments); every refusal is a 400 ----

V2_CASES: dict[str, tuple[bytes, str, tuple[str, ...]]] = {
    "no inputs": (b'{"id": "1"}', "invalid_input", ("inputs", "required")),
    "inputs empty": (b'{"inputs": []}', "invalid_input", ("exactly one input", "got 0")),
    "two inputs": (b'{"inputs": [%s, %s]}' % (tensor(FLAT), tensor(FLAT)), "invalid_input", ("got 2",)),
    "inputs is an object": (b'{"inputs": {}}', "invalid_input", ("inputs", "valid array")),
    "v1 body": (v1(FLAT), "invalid_input", ("inputs", "required")),
    "wrong name": (v2(FLAT).replace(b'"input"', b'"x"'), "invalid_input", ("inputs[0].name", "unknown input 'x'")),
    "wrong datatype": (v2(FLAT, datatype="FP64"), "invalid_input", ("inputs[0].datatype", "FP32 or UINT8", "'FP64'")),
    "shape 783": (v2(nums(ROW[:783]), "[1, 783]"), "invalid_input", ("inputs[0].shape", "[1, 783]")),
    "shape 785": (v2(nums([*ROW, 0.5]), "[1, 785]"), "invalid_input", ("inputs[0].shape", "[1, 785]")),
    "shape 27x28": (v2(nums([0.5] * 756), "[1, 27, 28]"), "invalid_input", ("inputs[0].shape", "[1, 27, 28]")),
    "data 783": (v2(nums(ROW[:783])), "invalid_input", ("inputs[0].data", "needs 784 values, got 783")),
    "data 785": (v2(nums([*ROW, 0.5])), "invalid_input", ("inputs[0].data", "needs 784 values, got 785")),
    "ragged nested": (
        v2(json.dumps([[[0.5] * 28] * 27 + [[0.5] * 27]]).encode(), "[1, 28, 28]"),
        "invalid_input",
        ("inputs[0].data[0][27]", "expected 28 entries", "got 27"),
    ),
    "empty batch": (v2(b"[]", "[0, 784]"), "invalid_input", ("inputs[0].shape", "at least one image")),
    "65 instances": (v2(nums(ROW * 65), "[65, 784]"), "too_many_instances", ("65 images", "limit is 64")),
    "2^64-1 instances": (v2(FLAT, "[18446744073709551615, 784]"), "too_many_instances", ("limit is 64",)),
    "2^64 instances": (v2(FLAT, "[18446744073709551616, 784]"), "invalid_input", ("inputs[0].shape[0]",)),
    "negative dim": (v2(FLAT, "[-1, 784]"), "invalid_input", ("inputs[0].shape[0]", "greater than or equal to 0")),
    "string dim": (v2(FLAT, '["1", 784]'), "invalid_input", ("inputs[0].shape[0]", "valid integer")),
    "string pixel": (v2(row_with(b'"0.5"', 17)), "invalid_input", ("inputs[0].data[17]", "expected a number", "'0.5'")),
    "NaN": (v2(row_with(b"NaN", 3)), "invalid_input", ("inputs[0].data[3]", "finite", "NaN")),
    "Infinity": (v2(row_with(b"Infinity")), "invalid_input", ("inputs[0].data[783]", "finite", "Infinity")),
    "1e400": (v2(row_with(b"1e400", 1)), "invalid_input", ("inputs[0].data[1]", "finite")),
    "boolean": (v2(row_with(b"true", 5)), "invalid_input", ("inputs[0].data[5]", "expected a number, got true")),
    "null pixel": (v2(row_with(b"null", 9)), "invalid_input", ("inputs[0].data[9]", "got null")),
    "1e308": (v2(row_with(b"1e308")), "invalid_input", ("inputs[0].data[783]", "[0, 1]", "1e+308")),
    "negative": (v2(row_with(b"-0.25", 10)), "invalid_input", ("inputs[0].data[10]", "[0, 1]", "-0.25")),
    "above 1": (v2(row_with(b"1.5", 700)), "invalid_input", ("inputs[0].data[700]", "[0, 1]", "1.5")),
    "UINT8 256": (v2(nums([0] * 783 + [256]), datatype="UINT8"), "invalid_input", ("data[783]", "0..255", "256")),
    "UINT8 float": (v2(nums([0.5] * 784), datatype="UINT8"), "invalid_input", ("data[0]", "integer 0..255")),
    "UINT8 huge": (v2(nums([0] * 783 + [10**30]), datatype="UINT8"), "invalid_input", ("data[783]", "0..255")),
    "data is a number": (v2(b"0.5"), "invalid_input", ("inputs[0].data", "expected an array", "0.5")),
    "data is null": (v2(b"null"), "invalid_input", ("inputs[0].data", "expected an array", "null")),
    "data is an object": (v2(b'{"a": 1}'), "invalid_input", ("inputs[0].data", "an object")),
    "too deep data": (v2(b"[[[" + FLAT + b"]]]"), "invalid_input", ("inputs[0].data", "levels of arrays")),
    "unknown output": (
        v2(FLAT)[:-1] + b', "outputs": [{"name": "logits"}]}',
        "invalid_input",
        ("outputs[0].name", "unknown output 'logits'"),
    ),
    "binary data": (
        v2(FLAT)[:-1] + b', "parameters": {"binary_data_output": true}}',
        "binary_data_unsupported",
        ("binary tensor data",),
    ),
    "non-string id": (v2(FLAT)[:-1] + b', "id": 5}', "invalid_input", ("id", "valid string")),
    "megabyte name": (
        v2(FLAT).replace(b'"input"', b'"' + b"x" * 1_000_000 + b'"'),
        "invalid_input",
        ("inputs[0].name", "unknown input 'xxx"),
    ),
    "megabyte extra key": (
        v2(FLAT)[:-1] + b', "' + b"k" * 1_000_000 + b'": 1}',
        "invalid_input",
        ("kkk...", "not permitted"),
    ),
}


@pytest.mark.parametrize("case", V2_CASES)
def test_v2_infer_bad_input(v2_infer: str, case: str) -> None:
    body, code, fragments = V2_CASES[case]
    assert_error(httpx.post(v2_infer, content=body, headers=JSON, timeout=30), 400, *fragments, code=code)


def test_v2_unknown_model_or_version(server: ServerProcess, tiny_artifact: Artifact) -> None:
    name = tiny_artifact.meta.name
    r = httpx.post(f"{server.url}/v2/models/{'m' * 5000}/infer", content=v2(FLAT), headers=JSON)
    assert_error(r, 404, "unknown model", repr(name), code="model_not_found")
    r = httpx.post(f"{server.url}/v2/models/%ff%fe/infer", content=v2(FLAT), headers=JSON)
    assert_error(r, 404, "unknown model", code="model_not_found")
    r = httpx.post(f"{server.url}/v2/models/{name}/versions/nope/infer", content=v2(FLAT), headers=JSON)
    assert_error(r, 404, "no version 'nope'", code="version_not_found")
    r = httpx.get(f"{server.url}/v2/models/{name}/infer")
    assert_error(r, 405, code="method_not_allowed")
    assert r.headers["allow"] == "POST"


# ---- content types ----

JSON_ROUTES = ["/v1/predict", "v2"]


@pytest.mark.parametrize("route", JSON_ROUTES)
@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonp",
        "application/json-patch+json",
        "",
        "image/png",
    ],
)
def test_json_routes_refuse_other_content_types(
    server: ServerProcess, v2_infer: str, route: str, content_type: str | None
) -> None:
    url = v2_infer if route == "v2" else server.url + route
    headers = {} if content_type is None else {"Content-Type": content_type}
    body = v1(FLAT) if route != "v2" else v2(FLAT)
    r = httpx.post(url, content=body, headers=headers)
    assert_error(r, 415, "Content-Type must be application/json", code="unsupported_media_type")
    assert ("got none" in r.json()["error"]) == (not content_type)


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "APPLICATION/JSON"])
def test_json_content_type_parameters_and_case_are_fine(server: ServerProcess, content_type: str) -> None:
    r = httpx.post(f"{server.url}/v1/predict", content=v1(FLAT), headers={"Content-Type": content_type})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("content_type", [None, "application/json", "image/png", "application/octet-stream"])
def test_image_route_refuses_other_content_types(server: ServerProcess, content_type: str | None) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    r = httpx.post(f"{server.url}/v1/predict/image", content=png(digit()), headers=headers)
    assert_error(r, 415, "multipart/form-data", "'files'", code="unsupported_media_type")


# ---- bodies over the limit: refused early, before the whole body is read ----


@pytest.mark.parametrize("route", JSON_ROUTES)
def test_declared_oversized_body_is_refused_at_once(server: ServerProcess, v2_infer: str, route: str) -> None:
    url = v2_infer if route == "v2" else server.url + route
    r = httpx.post(url, content=b" " * (MAX_BODY + 1), headers=JSON)
    assert_error(r, 413, f"larger than the {MAX_BODY}-byte limit", code="payload_too_large")
    assert r.headers["connection"] == "close"


class SlowBody:
    """A chunked body (no Content-Length) that counts how much of it the client was asked to send."""

    def __init__(self, chunk: bytes, chunks: int, head: bytes = b"", delay: float = 0.002) -> None:
        self.chunk, self.chunks, self.head, self.delay = chunk, chunks, head, delay
        self.pulled = 0

    def __iter__(self) -> Iterator[bytes]:
        if self.head:
            yield self.head
        for _ in range(self.chunks):
            self.pulled += 1
            yield self.chunk
            time.sleep(self.delay)


@pytest.mark.parametrize("route", JSON_ROUTES)
def test_slow_chunked_oversized_body_is_refused_before_it_ends(
    server: ServerProcess, v2_infer: str, route: str
) -> None:
    url = v2_infer if route == "v2" else server.url + route
    body = SlowBody(b"[" * 65536, chunks=4 * MAX_BODY // 65536)  # 16 MiB offered, 4 MiB allowed
    r = httpx.post(url, content=body, headers=JSON, timeout=60)
    assert_error(r, 413, f"larger than the {MAX_BODY}-byte limit", code="payload_too_large")
    assert r.headers["connection"] == "close"
    assert body.pulled < body.chunks // 2, f"{body.pulled} of {body.chunks} chunks were sent before the 413"


def test_slow_chunked_oversized_upload_is_refused_before_it_ends(server: ServerProcess) -> None:
    head = b'--b\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n\r\n\x89PNG\r\n\x1a\n'
    body = SlowBody(b"\0" * (1 << 20), chunks=2 * UPLOAD_LIMIT // (1 << 20), head=head, delay=0.001)
    r = httpx.post(
        f"{server.url}/v1/predict/image",
        content=body,
        headers={"Content-Type": "multipart/form-data; boundary=b"},
        timeout=60,
    )
    assert_error(r, 413, f"larger than the {UPLOAD_LIMIT}-byte limit", code="payload_too_large")
    assert body.pulled < 0.75 * body.chunks, f"{body.pulled} of {body.chunks} chunks were sent before the 413"


@pytest.mark.parametrize("route", ["/v1/predict", "/v1/predict/image", "/v1/drift/reset", "v2"])
def test_an_early_refusal_does_not_read_the_rest_of_a_slow_body(
    server: ServerProcess, v2_infer: str, route: str
) -> None:
    """415 / 401 / a malformed multipart preamble are answered before a long body is read, and the connection closes."""
    url = v2_infer if route == "v2" else server.url + route
    content_type = "multipart/form-data; boundary=b" if route == "/v1/predict/image" else "text/plain"
    body = SlowBody(b"x" * 65536, chunks=200, delay=0.005)  # one second at least, if it were all sent
    r = httpx.post(url, content=body, headers={"Content-Type": content_type}, timeout=60)
    expected = {"/v1/predict": 415, "v2": 415, "/v1/drift/reset": 401, "/v1/predict/image": 400}[route]
    assert_error(r, expected)
    assert r.headers["connection"] == "close"
    assert body.pulled < body.chunks // 2, f"{body.pulled} of {body.chunks} chunks were sent before the answer"


MAX_HEAD = 32 * 1024  # the server's default BNSERVE_MAX_HEADER_BYTES


def test_headers_past_the_limit_get_431(server: ServerProcess) -> None:
    r = httpx.post(f"{server.url}/v1/predict", content=v1(nums(ROW)), headers={**JSON, "Cookie": "a" * (MAX_HEAD + 1)})
    assert_error(r, 431, f"larger than the {MAX_HEAD}-byte limit", code="request_header_fields_too_large")
    assert r.headers["connection"] == "close"


def test_large_headers_under_the_limit_are_fine_on_one_connection(server: ServerProcess) -> None:
    """Each request's head counts alone: three 20 KB heads on one keep-alive connection are 60 KB together."""
    with httpx.Client(base_url=server.url, headers={"Cookie": "a" * 20_000}) as client:
        for _ in range(3):
            r = client.post("/v1/predict", content=v1(nums(ROW)), headers=JSON)
            assert r.status_code == 200, r.text
        big_body = v1(*[nums(ROW)] * MAX_INSTANCES)  # bodies far past the head limit: none of them counts as head
        for _ in range(5):
            assert client.post("/v1/predict", content=big_body, headers=JSON).status_code == 200
            assert client.get("/readyz").status_code == 200


def test_a_header_that_never_ends_is_refused_before_it_ends(server: ServerProcess) -> None:
    """httptools keeps a header in memory until it ends: the server must stop reading, not buffer 16 MiB."""
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Long: ")
        with contextlib.suppress(OSError):  # the server closed the connection: what the test wants
            while sent < 16 * 1024 * 1024 and not select.select([sock], [], [], 0.002)[0]:
                sock.sendall(b"a" * 65536)
                sent += 65536
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"request_header_fields_too_large" in answer
    assert sent < 8 * 1024 * 1024, f"{sent} bytes of one header were read before the 431"


# ---- image uploads ----


def digit() -> Image.Image:
    """A dark stroke on white paper: a plausible photo of a '1'."""
    img = Image.new("L", (60, 60), 255)
    for y in range(10, 50):
        for x in range(28, 33):
            img.putpixel((x, y), 0)
    return img


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def gif_claiming(width: int, height: int) -> bytes:
    return (
        b"GIF89a"
        + struct.pack("<HH", width, height)
        + b"\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
    )


def _upload(name: str, data: bytes, mime: str = "image/png") -> tuple[str, tuple[str, bytes, str]]:
    return ("files", (name, data, mime))


GOOD = png(digit())
# (files, status, code, fragments)
IMAGE_CASES: dict[str, tuple[list[Any], int, str, tuple[str, ...]]] = {
    "100000x100000 PNG header": (
        [_upload("bomb.png", png_claiming(100_000, 100_000))],
        422,
        "invalid_image",
        ("files[0] (bomb.png)", "too large", "4000000 pixels"),
    ),
    "65535x65535 GIF header": (
        [_upload("ok.png", GOOD), _upload("bomb.gif", gif_claiming(65535, 65535), "image/gif")],
        422,
        "invalid_image",
        ("files[1] (bomb.gif)", "too large"),
    ),
    "truncated PNG": (
        [_upload("half.png", GOOD[: len(GOOD) // 2])],
        422,
        "invalid_image",
        ("files[0] (half.png)", "truncated"),
    ),
    "PNG signature only": ([_upload("sig.png", GOOD[:8])], 422, "invalid_image", ("files[0]", "PNG")),
    "text": (
        [_upload("notes.txt", b"hello, not an image", "text/plain")],
        422,
        "invalid_image",
        ("not a recognised image",),
    ),
    "PDF": ([_upload("a.pdf", b"%PDF-1.4\n%%EOF\n", "application/pdf")], 422, "invalid_image", ("expected PNG, JPEG",)),
    "random bytes": ([_upload("r.bin", bytes(range(256)) * 8)], 422, "invalid_image", ("files[0] (r.bin)",)),
    "empty file": ([_upload("empty.png", b"")], 422, "invalid_image", ("files[0] (empty.png)", "empty")),
    "blank image": ([_upload("white.png", png(Image.new("L", (40, 40), 255)))], 422, "invalid_image", ("blank",)),
    "17 files": ([_upload(f"{i}.png", GOOD) for i in range(17)], 400, "bad_multipart", ("Too many files", "16")),
    "no files field": ([("images", ("a.png", GOOD, "image/png"))], 422, "invalid_input", ("no files", "'files'")),
}


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_image_upload_bad_input(server: ServerProcess, case: str) -> None:
    files, status, code, fragments = IMAGE_CASES[case]
    r = httpx.post(f"{server.url}/v1/predict/image", files=files, timeout=30)
    assert_error(r, status, *fragments, code=code)


@pytest.mark.parametrize(
    ("body", "boundary", "fragments"),
    [
        (b"garbage", None, ("multipart", "boundary")),
        (b"garbage", "b", ("multipart", "Invalid multipart data")),
        (b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--\r\n", "b", ("multipart", '"name"')),
        (
            b"--b\r\n" + b'Content-Disposition: form-data; name="f"\r\n\r\nx\r\n--b\r\n' * 9 + b"--b--\r\n",
            "b",
            ("Too many fields",),
        ),
    ],
)
def test_malformed_multipart(
    server: ServerProcess, body: bytes, boundary: str | None, fragments: tuple[str, ...]
) -> None:
    content_type = "multipart/form-data" + (f"; boundary={boundary}" if boundary else "")
    r = httpx.post(f"{server.url}/v1/predict/image", content=body, headers={"Content-Type": content_type})
    assert_error(r, 400, *fragments, code="bad_multipart")


def test_files_field_as_text_is_no_files(server: ServerProcess) -> None:
    r = httpx.post(f"{server.url}/v1/predict/image", data={"files": "not a file"}, files=[("other", ("x", b"x"))])
    assert_error(r, 422, "no files", code="invalid_input")


def test_sixteen_good_files_are_fine(server: ServerProcess) -> None:
    r = httpx.post(f"{server.url}/v1/predict/image", files=[_upload(f"{i}.png", GOOD) for i in range(16)], timeout=30)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["filename"] for p in preds] == [f"{i}.png" for i in range(16)]
    assert len({p["label"] for p in preds}) == 1, "the same image gets the same answer"


# ---- admin routes ----

ADMIN_ROUTES = ["/v1/drift/reset", "/v1/admin/reload"]
BAD_AUTH = {
    "no header": None,
    "wrong token": f"Bearer {ADMIN_TOKEN}x",
    "prefix of the token": f"Bearer {ADMIN_TOKEN[:-1]}",
    "basic scheme": "Basic dGVzdDp0ZXN0",
    "token as basic": f"Basic {ADMIN_TOKEN}",
    "bearer alone": "Bearer",
    "token without scheme": ADMIN_TOKEN,
    "30 KB token": "Bearer " + "x" * 30_000,  # under the 32 KiB head limit; a megabyte one gets 431 (below)
}


@pytest.mark.parametrize("auth", BAD_AUTH)
@pytest.mark.parametrize("route", ADMIN_ROUTES)
def test_admin_routes_refuse_bad_auth(server: ServerProcess, route: str, auth: str) -> None:
    value = BAD_AUTH[auth]
    headers = {} if value is None else {"Authorization": value}
    r = httpx.post(server.url + route, headers=headers, timeout=30)
    assert_error(r, 401, "bearer token", code="unauthorized")
    assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("route", ADMIN_ROUTES)
def test_a_megabyte_token_is_a_head_too_large(server: ServerProcess, route: str) -> None:
    r = httpx.post(server.url + route, headers={"Authorization": "Bearer " + "x" * 1_000_000}, timeout=30)
    assert_error(r, 431, f"larger than the {MAX_HEAD}-byte limit", code="request_header_fields_too_large")


@pytest.mark.parametrize("route", ADMIN_ROUTES)
def test_admin_routes_refuse_an_empty_bearer(server: ServerProcess, route: str) -> None:
    """`Bearer ` with nothing after it; sent by hand, as httpx (rightly) will not send a trailing space."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \r\nContent-Length: 0\r\n\r\n" % route.encode()
        )
        raw = b""
        while not raw.endswith(b"}") and (chunk := sock.recv(65536)):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    r = httpx.Response(
        int(head.split()[1]), headers=[tuple(h.split(b": ", 1)) for h in head.split(b"\r\n")[1:]], content=body
    )
    assert_error(r, 401, "bearer token", code="unauthorized")


def test_admin_non_ascii_token_is_refused(server: ServerProcess) -> None:
    r = httpx.post(f"{server.url}/v1/drift/reset", headers={"Authorization": b"Bearer \xff\xfe\xc3\xa9"})
    assert_error(r, 401, "bearer token", code="unauthorized")


@pytest.mark.parametrize("route", ADMIN_ROUTES)
def test_admin_routes_take_the_token_in_any_scheme_case(server: ServerProcess, route: str) -> None:
    for scheme in ("Bearer", "bearer", "BEARER"):
        r = httpx.post(server.url + route, headers={"Authorization": f"{scheme} {ADMIN_TOKEN}"}, timeout=30)
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("route", ADMIN_ROUTES)
def test_admin_routes_refuse_other_methods(server: ServerProcess, route: str) -> None:
    r = httpx.get(server.url + route, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert_error(r, 405, code="method_not_allowed")


# ---- many identical requests at once; then the server must be healthy, exact and clean ----


async def test_a_thousand_identical_requests_in_parallel(
    server: ServerProcess, tiny_artifact: Artifact, test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    image = test_images[0][7]
    body = {"instances": [image.reshape(-1).tolist()]}
    limits = httpx.Limits(max_connections=50, max_keepalive_connections=50)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60) as client:
        responses = await asyncio.gather(*(client.post("/v1/predict", json=body) for _ in range(1000)))
    statuses = [r.status_code for r in responses]
    overloaded = [r for r in responses if r.status_code == 503]
    assert all(r.headers.get("retry-after") for r in overloaded), "a 503 says when to retry"
    assert statuses.count(200) == 1000, {s: statuses.count(s) for s in set(statuses)}
    predictions = [r.json()["predictions"][0] for r in responses]
    expected = direct_probabilities(tiny_artifact, image)[0]
    assert {p["label"] for p in predictions} == {int(expected.argmax())}
    # Equal to float32 round-off, not bit for bit: a batch of 50 runs other CPU kernels than a batch of 1.
    got = np.array([p["probabilities"] for p in predictions])
    np.testing.assert_allclose(got, np.broadcast_to(expected, got.shape), rtol=1e-5, atol=1e-6)


def test_after_all_that_the_server_is_healthy_exact_and_clean(
    server: ServerProcess, v2_infer: str, tiny_artifact: Artifact, test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    images = test_images[0][:32]
    expected = direct_probabilities(tiny_artifact, images)
    r = httpx.post(f"{server.url}/v1/predict", json={"instances": images.tolist()}, timeout=30)
    assert r.status_code == 200, r.text
    got = np.array([p["probabilities"] for p in r.json()["predictions"]])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    tensor = {"name": "input", "shape": [32, 28, 28], "datatype": "FP32", "data": images.tolist()}
    r = httpx.post(v2_infer, json={"inputs": [tensor]}, timeout=30)
    assert r.status_code == 200, r.text
    probs = next(o for o in r.json()["outputs"] if o["name"] == "probabilities")
    np.testing.assert_allclose(np.array(probs["data"]).reshape(32, -1), expected, rtol=1e-5, atol=1e-6)
    logs = server.logs()
    assert "unhandled error" not in logs and "Traceback" not in logs, logs[-5000:]
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'status="500"' not in metrics, "no request of any test ended in a 500"
