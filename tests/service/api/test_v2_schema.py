"""Parsing of Open Inference Protocol V2 inference requests, straight from bytes (no HTTP)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from service.api.errors import ApiError
from service.api.v2_schema import OUTPUT_NAMES, ParsedInference, parse_infer_body

RNG = np.random.default_rng(0)
IMAGES = RNG.random((3, 28, 28), dtype=np.float32)  # (N, 28, 28) in [0, 1)
IMAGES_U8 = RNG.integers(0, 256, (3, 28, 28), dtype=np.uint8)


def request(
    data: Any = None, *, shape: list[int] | None = None, datatype: str = "FP32", **fields: Any
) -> dict[str, Any]:
    """A valid request for IMAGES as [N, 784] flat data, with whatever the test changes."""
    tensor = {
        "name": "input",
        "shape": [3, 784] if shape is None else shape,
        "datatype": datatype,
        "data": IMAGES.ravel().tolist() if data is None else data,
    }
    return {"inputs": [tensor], **fields}


def parse(body: dict[str, Any] | bytes, max_instances: int = 8) -> ParsedInference:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()  # stdlib: it writes ints past 64 bits
    return parse_infer_body(raw, max_instances=max_instances)


def refused(body: dict[str, Any] | bytes, max_instances: int = 8) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse(body, max_instances)
    assert info.value.status == 400
    return info.value


LAYOUTS = {
    "flat [N,784]": ([3, 784], lambda x: x.ravel().tolist()),
    "nested [N,784]": ([3, 784], lambda x: x.reshape(3, 784).tolist()),
    "flat [N,28,28]": ([3, 28, 28], lambda x: x.ravel().tolist()),
    "nested [N,28,28]": ([3, 28, 28], lambda x: x.tolist()),
    "flat [N,1,28,28]": ([3, 1, 28, 28], lambda x: x.ravel().tolist()),
    "nested [N,1,28,28]": ([3, 1, 28, 28], lambda x: x[:, None].tolist()),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("datatype", ["FP32", "UINT8"])
def test_every_layout_and_datatype_gives_the_same_pixels(layout: str, datatype: str) -> None:
    shape, encode = LAYOUTS[layout]
    images = IMAGES if datatype == "FP32" else IMAGES_U8
    parsed = parse(request(encode(images), shape=shape, datatype=datatype))
    expected = IMAGES if datatype == "FP32" else IMAGES_U8.astype(np.float32) / np.float32(255.0)
    assert parsed.pixels.dtype == np.float32
    assert parsed.pixels.shape == (3, 1, 28, 28)
    np.testing.assert_array_equal(parsed.pixels[:, 0], expected)


def test_uint8_spans_zero_to_one() -> None:
    data = [0] * 783 + [255]
    pixels = parse(request(data, shape=[1, 784], datatype="UINT8")).pixels.ravel()
    assert pixels[0] == 0.0
    assert pixels[-1] == 1.0


def test_fp32_accepts_integer_zero_and_one() -> None:
    pixels = parse(request([0, 1] * 392, shape=[1, 784])).pixels.ravel()
    assert pixels[:4].tolist() == [0.0, 1.0, 0.0, 1.0]


def test_id_and_output_selection() -> None:
    parsed = parse(request(id="abc-42", outputs=[{"name": "label"}, {"name": "probabilities"}]))
    assert parsed.id == "abc-42"
    assert parsed.outputs == ("label", "probabilities")
    assert parse(request(outputs=[{"name": "label", "parameters": {"binary_data": False}}])).outputs == ("label",)


@pytest.mark.parametrize("outputs", [None, []])
def test_no_output_selection_means_all_outputs(outputs: list[Any] | None) -> None:
    body = request() if outputs is None else request(outputs=outputs)
    parsed = parse(body)
    assert parsed.outputs == OUTPUT_NAMES
    assert parsed.id is None


def test_parameters_are_accepted_and_binary_off_is_fine() -> None:
    body = request(parameters={"binary_data_output": False, "priority": 1, "note": "x", "ratio": 0.5})
    body["inputs"][0]["parameters"] = {"content_type": "np"}
    assert parse(body).pixels.shape == (3, 1, 28, 28)


def test_batch_limit_is_inclusive() -> None:
    assert parse(request(), max_instances=3).pixels.shape[0] == 3
    error = refused(request(), max_instances=2)
    assert error.code == "too_many_instances"
    assert "3 images" in error.message
    assert "limit is 2" in error.message


def _with(path: tuple[str | int, ...], value: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def change(body: dict[str, Any]) -> dict[str, Any]:
        body = copy.deepcopy(body)
        target: Any = body
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return body

    return change


def _nested_with(index: tuple[int, ...], value: Any) -> dict[str, Any]:
    data = IMAGES[:1].tolist()
    target: Any = data
    for i in index[:-1]:
        target = target[i]
    target[index[-1]] = value
    return request(data, shape=[1, 28, 28])


INPUT = ("inputs", 0)
BAD: dict[str, tuple[Any, str, list[str | int], str]] = {
    # name: (request or bytes, code, loc, message fragment)
    "not JSON": (b'{"inputs": [', "invalid_json", [], "not valid JSON"),
    "not an object": (b"[1, 2]", "invalid_input", [], "body: Input should be an object"),
    "no inputs": ({"id": "1"}, "invalid_input", ["inputs"], "Field required"),
    "unknown field": (request(input="x"), "invalid_input", ["input"], "Extra inputs are not permitted"),
    "numeric id": (request(id=42), "invalid_input", ["id"], "(got 42)"),
    "object parameter": (
        request(parameters={"a": {}}),
        "invalid_input",
        ["parameters", "a"],
        "strings, finite numbers",
    ),
    "zero inputs": ({"inputs": []}, "invalid_input", ["inputs"], "exactly one input tensor"),
    "two inputs": ({"inputs": request()["inputs"] * 2}, "invalid_input", ["inputs"], "got 2"),
    "wrong input name": (_with((*INPUT, "name"), "input0")(request()), "invalid_input", [*INPUT, "name"], "'input0'"),
    "FP64": (request(datatype="FP64"), "invalid_input", [*INPUT, "datatype"], "FP32 or UINT8, got 'FP64'"),
    "lower-case fp32": (request(datatype="fp32"), "invalid_input", [*INPUT, "datatype"], "got 'fp32'"),
    "no batch dimension": (request(shape=[784]), "invalid_input", [*INPUT, "shape"], "got [784]"),
    "785 per image": (request(shape=[3, 785]), "invalid_input", [*INPUT, "shape"], "[N, 784]"),
    "two channels": (request(shape=[3, 2, 28, 28]), "invalid_input", [*INPUT, "shape"], "[N, 1, 28, 28]"),
    "N = 0": (request([], shape=[0, 784]), "invalid_input", [*INPUT, "shape"], "at least one image"),
    "N = -1": (request(shape=[-1, 784]), "invalid_input", [*INPUT, "shape", 0], "greater than or equal to 0"),
    "float dimension": (request(shape=[3.0, 784]), "invalid_input", [*INPUT, "shape", 0], "valid integer"),
    "boolean dimension": (request(shape=[True, 784]), "invalid_input", [*INPUT, "shape", 0], "got true"),
    "no data": (
        _with(INPUT, {"name": "input", "shape": [1, 784], "datatype": "FP32"})(request()),
        "invalid_input",
        [*INPUT, "data"],
        "got null",
    ),
    "string data": (request("0.5"), "invalid_input", [*INPUT, "data"], "got '0.5'"),
    "empty data": (request([]), "invalid_input", [*INPUT, "data"], "needs 2352 values, got 0"),
    "one value short": (request([0.5] * 2351), "invalid_input", [*INPUT, "data"], "needs 2352 values, got 2351"),
    "half-nested": (
        request(IMAGES.reshape(3, 784).tolist(), shape=[3, 1, 28, 28]),
        "invalid_input",
        [*INPUT, "data"],
        "got 2 levels",
    ),
    "too few images": (
        request(IMAGES[:2].tolist(), shape=[3, 28, 28]),
        "invalid_input",
        [*INPUT, "data"],
        "expected 3 entries",
    ),
    "short row": (_nested_with((0, 3), [0.5] * 27), "invalid_input", [*INPUT, "data", 0, 3], "got 27"),
    "number for a row": (_nested_with((0, 5), 0.5), "invalid_input", [*INPUT, "data", 0, 5], "expected an array"),
    "array for a pixel": (_nested_with((0, 5, 3), [0.5]), "invalid_input", [*INPUT, "data", 0, 5, 3], "got an array"),
    "boolean pixel": (_nested_with((0, 2, 7), True), "invalid_input", [*INPUT, "data", 0, 2, 7], "got true"),
    "string pixel": (request([0.5] * 100 + ["0.5"] + [0.5] * 2251), "invalid_input", [*INPUT, "data", 100], "'0.5'"),
    "null pixel": (request([None] + [0.5] * 2351), "invalid_input", [*INPUT, "data", 0], "got null"),
    "FP32 above 1": (
        _nested_with((0, 9, 9), 1.5),
        "invalid_input",
        [*INPUT, "data", 0, 9, 9],
        "in [0, 1] (send datatype UINT8 for 0..255 pixels), got 1.5",
    ),
    "FP32 below 0": (request([0.5] * 7 + [-0.1] + [0.5] * 2344), "invalid_input", [*INPUT, "data", 7], "got -0.1"),
    "FP32 as 0..255": (request([255] * 2352), "invalid_input", [*INPUT, "data", 0], "send datatype UINT8"),
    "UINT8 256": (
        request([0] * 5 + [256] + [0] * 2346, datatype="UINT8"),
        "invalid_input",
        [*INPUT, "data", 5],
        "0..255, got 256",
    ),
    "UINT8 -1": (request([-1] + [0] * 2351, datatype="UINT8"), "invalid_input", [*INPUT, "data", 0], "got -1"),
    "UINT8 fraction": (request([0.5] * 2352, datatype="UINT8"), "invalid_input", [*INPUT, "data", 0], "integer"),
    "UINT8 boolean": (request([True] * 2352, datatype="UINT8"), "invalid_input", [*INPUT, "data", 0], "got true"),
    "UINT8 huge": (
        request([0] * 2351 + [2**70], datatype="UINT8"),
        "invalid_input",
        [*INPUT, "data", 2351],
        "got 1180591620717411303424",
    ),
    "unknown output": (request(outputs=[{"name": "output0"}]), "invalid_input", ["outputs", 0, "name"], "'output0'"),
    "output twice": (
        request(outputs=[{"name": "label"}, {"name": "label"}]),
        "invalid_input",
        ["outputs", 1, "name"],
        "twice",
    ),
    "output without name": (request(outputs=[{}]), "invalid_input", ["outputs", 0, "name"], "Field required"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_requests_name_the_problem_and_where(case: str) -> None:
    body, code, loc, fragment = BAD[case]
    error = refused(body)
    assert error.code == code
    assert error.loc == loc
    assert fragment in error.message


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_pixels_are_refused(literal: bytes) -> None:
    raw = json.dumps(request([0.5] * 2352)).encode().replace(b"[0.5,", b"[" + literal + b",", 1)
    error = refused(raw)
    assert error.loc == ["inputs", 0, "data", 0]
    assert "finite" in error.message


BINARY = {
    "input binary_data_size": lambda b: b["inputs"][0].update(parameters={"binary_data_size": 3136}),
    "output binary_data": lambda b: b.update(outputs=[{"name": "label", "parameters": {"binary_data": True}}]),
    "output binary_data as a string": lambda b: b.update(
        outputs=[{"name": "label", "parameters": {"binary_data": "1"}}]
    ),
    "request binary_data_output": lambda b: b.update(parameters={"binary_data_output": True}),
}


@pytest.mark.parametrize("case", BINARY)
def test_binary_tensor_data_is_refused_clearly(case: str) -> None:
    body = request()
    BINARY[case](body)
    if case == "input binary_data_size":
        del body["inputs"][0]["data"]  # binary requests carry the tensor after the JSON, not in it
    error = refused(body)
    assert error.code == "binary_data_unsupported"
    assert "binary tensor data extension is not supported" in error.message
