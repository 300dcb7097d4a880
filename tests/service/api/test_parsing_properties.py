"""Property tests of the request parsers: any bytes in, either valid pixels or a precise 4xx out, never a crash."""

from __future__ import annotations

import json
import math
import reprlib
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from model.preprocess import PixelError, to_image_batch
from service.api.errors import ApiError, error_response
from service.api.v1_schema import FAST_PARSE_MAX_BYTES, _common_case, parse_predict_body
from service.api.v2_schema import OUTPUT_NAMES, ParsedInference, parse_infer_body

MAX_INSTANCES = 3
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

# Anything JSON can say, NaN and Infinity tokens and integers past 64 bits included.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
# Values a hostile client puts where a pixel belongs: wrong types, non-finite, out of range, or barely in range.
ELEMENTS = st.one_of(
    st.sampled_from(
        [
            math.nan,
            math.inf,
            -math.inf,
            True,
            False,
            None,
            "0.5",
            "",
            10**400,
            -(10**30),
            1e308,
            -1e-300,
            5e-324,
            -0.0,
            0,
            1,
            2,
            1.0000001,
            255,
            256,
        ]
    ),
    st.sampled_from([[], [0.5], [[0.5]], {}, {"x": 0.5}]),
    st.floats(),
    st.integers(-300, 300),
)


def encode(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()  # stdlib: writes NaN/Infinity and ints past 64 bits


def assert_client_error(exc: ApiError, *statuses: int) -> None:
    """A 4xx of the expected kind, with a message, that renders as the one error shape."""
    assert exc.status in statuses, (exc.status, exc.message)
    assert exc.message.strip() and exc.code.strip()
    body = orjson.loads(error_response(exc.status, exc.code, exc.message, exc.loc).body)
    assert body["error"] == exc.message and set(body) <= {"error", "code", "loc"}
    assert len(exc.message) < 400, "a message quotes the client's input only briefly"


def is_pixel(value: Any) -> bool:
    """The reference rule for one pixel: a JSON number (not a boolean), finite as a double, in [0, 1]."""
    return is_number(value) and 0.0 <= value <= 1.0


def expected_v1(body: Any) -> np.ndarray | None:
    """The reference v1 parser, written plainly: the pixels a body must give, or None if it must be refused."""
    if not isinstance(body, dict) or set(body) != {"instances"}:
        return None
    instances = body["instances"]
    if not isinstance(instances, list) or not 1 <= len(instances) <= MAX_INSTANCES:
        return None
    flat = all(isinstance(x, list) and len(x) == 784 and all(map(is_pixel, x)) for x in instances)
    nested = all(
        isinstance(x, list)
        and len(x) == 28
        and all(isinstance(r, list) and len(r) == 28 and all(map(is_pixel, r)) for r in x)
        for x in instances
    )
    if not (flat or nested):
        return None
    return np.array(instances, dtype=np.float64).astype(np.float32).reshape(-1, 1, 28, 28)


SEEDS = st.integers(0, 2**32 - 1)


class Case(tuple):  # type: ignore[type-arg]
    """A generated request and what is known of it; shown abridged, as a body holds thousands of pixels."""

    def __repr__(self) -> str:
        return f"Case({', '.join(map(reprlib.repr, self))})"


def random_pixels(seed: int, n: int) -> np.ndarray:
    """(n, 784) float64 in [0, 1], the bounds 0.0 and 1.0 included (cheaper to draw than element by element)."""
    rng = np.random.default_rng(seed)
    pixels = rng.random((n, 784))
    pixels[rng.random((n, 784)) < 0.05] = 0.0
    pixels[rng.random((n, 784)) < 0.05] = 1.0
    return pixels


@st.composite
def v1_bodies(draw: st.DrawFn) -> tuple[Any, tuple[int, ...] | None]:
    """A valid request (1..MAX_INSTANCES+1 images, flat or 28×28), then maybe one hostile edit.

    Returns the body and, for an edit to one pixel, where that pixel is.
    """
    n = draw(st.integers(1, MAX_INSTANCES + 1))
    pixels = random_pixels(draw(SEEDS), n)
    nested = draw(st.booleans())
    instances: list[Any] = pixels.reshape(n, 28, 28).tolist() if nested else pixels.tolist()
    body: Any = {"instances": instances}
    edit = draw(st.sampled_from(["none", "pixel", "pixel", "pixel", "drop", "append", "row", "key", "wrap", "empty"]))
    i = draw(st.integers(0, n - 1))
    where: tuple[int, ...] | None = None
    if edit == "pixel":
        value = draw(ELEMENTS)
        j = draw(st.integers(0, 783))
        if nested:
            instances[i][j // 28][j % 28] = value
            where = (i, j // 28, j % 28)
        else:
            instances[i][j] = value
            where = (i, j)
    elif edit == "drop":
        (instances[i][draw(st.integers(0, 27))] if nested and draw(st.booleans()) else instances[i]).pop()
    elif edit == "append":
        instances[i].append(draw(ELEMENTS))
    elif edit == "row":
        instances[i] = draw(ELEMENTS)
    elif edit == "key":
        body[draw(st.sampled_from(["instance", "inputs", "x" * 100_000]))] = instances
    elif edit == "wrap":
        body = draw(st.sampled_from([[body], {"instances": [instances]}, {"data": body}]))
    elif edit == "empty":
        body = {"instances": []}
    return Case((body, where))


def parse_v1(raw: bytes) -> np.ndarray | ApiError:
    """The parsed pixels, or the ApiError it raised (any other exception fails the test)."""
    try:
        return parse_predict_body(raw, max_instances=MAX_INSTANCES)
    except ApiError as exc:
        return exc


@FAST
@given(st.binary(max_size=200) | JSON_VALUES.map(encode))
def test_v1_any_bytes_give_pixels_or_a_client_error(raw: bytes) -> None:
    pixels = parse_v1(raw)
    if isinstance(pixels, ApiError):
        assert_client_error(pixels, 400, 422)
        return
    assert pixels.dtype == np.float32 and pixels.shape[1:] == (1, 28, 28) and 1 <= len(pixels) <= MAX_INSTANCES
    assert ((pixels >= 0) & (pixels <= 1)).all()


@SLOW
@given(v1_bodies())
def test_v1_matches_the_reference_and_blames_the_edited_pixel(case: tuple[Any, tuple[int, ...] | None]) -> None:
    body, where = case
    expected = expected_v1(body)
    got = parse_v1(encode(body))
    if not isinstance(got, ApiError):
        assert expected is not None, "an invalid body was accepted"
        np.testing.assert_array_equal(got, expected)
        return
    assert expected is None, f"a valid body was refused: {got.message}"
    assert_client_error(got, 422)
    if where is not None and len(body["instances"]) <= MAX_INSTANCES:
        # The one bad pixel is named: its instance always, and its exact place for a type error.
        assert got.loc[:2] == ["instances", where[0]], (got.loc, where, got.message)
        assert got.message.startswith(f"instances[{where[0]}]")


def strict_v1(raw: bytes) -> np.ndarray | tuple[int, str, str, list[str | int]]:
    """What the strict (pydantic) parser alone makes of a body: pixels, or the error's status, code, text and loc."""
    try:
        return parse_predict_body(raw, max_instances=MAX_INSTANCES, common_case=False)
    except ApiError as exc:
        return (exc.status, exc.code, exc.message, exc.loc)


@SLOW
@given(v1_bodies().map(lambda case: encode(case[0])) | st.binary(max_size=200) | JSON_VALUES.map(encode))
def test_v1_common_case_parser_answers_exactly_like_the_strict_one(raw: bytes) -> None:
    got, strict = parse_v1(raw), strict_v1(raw)
    if isinstance(got, ApiError):
        assert (got.status, got.code, got.message, got.loc) == strict
    else:
        assert isinstance(strict, np.ndarray)
        np.testing.assert_array_equal(got, strict)
        assert got.dtype == strict.dtype


@FAST
@given(
    hnp.arrays(
        st.sampled_from([np.float64, np.float32, np.int64, np.uint8, np.bool_]),
        hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=3)
        | st.sampled_from([(1, 784), (2, 28, 28), (1, 1, 28, 28), (1, 783), (1, 27, 28), (0, 784), (1, 2, 28, 28)]),
    )
)
def test_to_image_batch_gives_valid_pixels_or_names_the_instance(pixels: np.ndarray) -> None:
    try:
        out = to_image_batch(pixels)
    except PixelError as exc:
        error = exc
    else:
        error = None
    if error is not None:
        assert error.message and error.loc[:1] == ("instances",)
        if len(error.loc) == 2:
            assert isinstance(error.loc[1], int) and 0 <= error.loc[1] < max([*pixels.shape[:1], 1])
        return
    flat = pixels.reshape(len(pixels), -1).astype(np.float64)
    assert np.isfinite(flat).all() and ((flat >= 0) & (flat <= 1)).all(), "only valid pixels are accepted"
    assert out.shape == (len(pixels), 1, 28, 28) and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out.reshape(len(pixels), -1), flat.astype(np.float32))


@st.composite
def v2_bodies(draw: st.DrawFn) -> tuple[Any, bool, tuple[int, ...] | None, np.ndarray]:
    """A valid V2 request (any accepted layout, FP32 or UINT8, flat or nested data), then maybe one hostile edit.

    Returns the body, whether it must still be accepted, the index of an edited data element (nested like the data),
    and the pixels a valid body must give.
    """
    n = draw(st.integers(1, MAX_INSTANCES))
    shape = [n, *draw(st.sampled_from([(784,), (28, 28), (1, 28, 28)]))]
    datatype = draw(st.sampled_from(["FP32", "UINT8"]))
    values = random_pixels(draw(SEEDS), n)
    if datatype == "FP32":
        pixels = values.astype(np.float32)
    else:
        values = np.round(values * 255).astype(np.int64)
        pixels = values.astype(np.float32) / np.float32(255.0)
    nested = draw(st.booleans())
    data: list[Any] = values.reshape(shape).tolist() if nested else values.ravel().tolist()
    tensor: dict[str, Any] = {"name": "input", "shape": shape, "datatype": datatype, "data": data}
    body: dict[str, Any] = {"inputs": [tensor]}
    edit = draw(st.sampled_from(["none", "element", "element", "shape", "datatype", "name", "extra", "outputs", "id"]))
    valid = edit == "none"
    where: tuple[int, ...] | None = None
    if edit == "element":
        k = draw(st.integers(0, n * 784 - 1))
        where = tuple(int(i) for i in np.unravel_index(k, shape)) if nested else (k,)
        value = draw(ELEMENTS)
        _put(data, where, value)
        low, high = (0, 1) if datatype == "FP32" else (0, 255)
        valid = is_number(value) and low <= value <= high and (datatype == "FP32" or isinstance(value, int))
        if valid:
            pixels.reshape(-1)[k] = np.float32(value) if datatype == "FP32" else np.float32(value) / np.float32(255.0)
    elif edit == "shape":
        tensor["shape"] = draw(st.lists(st.integers(-2, 2**64) | st.sampled_from([0, 27, 28, 783, 785]), max_size=6))
    elif edit == "datatype":
        tensor["datatype"] = draw(st.sampled_from(["FP64", "fp32", "INT8", "BYTES", "", 32]))
    elif edit == "name":
        tensor["name"] = draw(st.sampled_from(["inputs", "", "x" * 10_000, 0]))
    elif edit == "extra":
        body[draw(st.sampled_from(["instances", "input", "\u00e9"]))] = 1
    elif edit == "outputs":
        names = draw(st.lists(st.sampled_from([*OUTPUT_NAMES, "x"]), max_size=3))
        body["outputs"] = [{"name": name} for name in names]
        valid = "x" not in names and len(set(names)) == len(names)
    elif edit == "id":
        body["id"] = draw(st.text(max_size=20) | st.integers())
        valid = isinstance(body["id"], str)
    return Case((body, valid, where, pixels.reshape(n, 1, 28, 28)))


def parse_v2(raw: bytes) -> ParsedInference | ApiError:
    try:
        return parse_infer_body(raw, max_instances=MAX_INSTANCES)
    except ApiError as exc:
        return exc


def check_parsed(parsed: ParsedInference) -> None:
    pixels = parsed.pixels
    assert pixels.dtype == np.float32 and pixels.shape[1:] == (1, 28, 28) and 1 <= len(pixels) <= MAX_INSTANCES
    assert ((pixels >= 0) & (pixels <= 1)).all()
    assert parsed.outputs and set(parsed.outputs) <= set(OUTPUT_NAMES)
    assert len(set(parsed.outputs)) == len(parsed.outputs)


@FAST
@given(st.binary(max_size=200) | JSON_VALUES.map(encode) | JSON_VALUES.map(lambda v: encode({"inputs": [v]})))
def test_v2_any_bytes_give_pixels_or_a_client_error(raw: bytes) -> None:
    parsed = parse_v2(raw)
    if isinstance(parsed, ApiError):
        assert_client_error(parsed, 400)
    else:
        check_parsed(parsed)


@SLOW
@given(v2_bodies())
def test_v2_valid_requests_parse_exactly_and_bad_elements_are_named(
    case: tuple[dict[str, Any], bool, tuple[int, ...] | None, np.ndarray],
) -> None:
    body, valid, where, expected = case
    parsed = parse_v2(encode(body))
    if valid:
        assert not isinstance(parsed, ApiError), f"a valid body was refused: {parsed.message}"
        check_parsed(parsed)
        np.testing.assert_array_equal(parsed.pixels, expected)
        assert parsed.id == body.get("id")
    elif where is not None:
        assert isinstance(parsed, ApiError), "an invalid element was accepted"
        assert_client_error(parsed, 400)
        # A bad element is named exactly; an array in an element's place may be read as wrong nesting instead.
        if isinstance(_at(body["inputs"][0]["data"], where), list | dict):
            assert parsed.loc[:3] == ["inputs", 0, "data"], (parsed.loc, where, parsed.message)
        else:
            assert parsed.loc == ["inputs", 0, "data", *where], (parsed.loc, where, parsed.message)
    elif isinstance(parsed, ApiError):
        assert_client_error(parsed, 400)
    else:
        check_parsed(parsed)


def is_number(value: Any) -> bool:
    """A JSON number (not a boolean) that is finite as a double."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _at(data: list[Any], index: tuple[int, ...]) -> Any:
    for i in index:
        data = data[i]
    return data


def _put(data: list[Any], index: tuple[int, ...], value: Any) -> None:
    _at(data, index[:-1])[index[-1]] = value


@pytest.mark.parametrize("depth", [150, 10_000])
def test_deep_nesting_is_a_client_error_not_a_recursion_error(depth: int) -> None:
    tensor = b'{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": %s}'
    for wrap in (b"%s", b'{"instances": %s}', b'{"inputs": [' + tensor + b"]}"):
        raw = wrap % (b"[" * depth + b"]" * depth)
        for parse, statuses in ((parse_v1, (400, 422)), (parse_v2, (400,))):
            error = parse(raw)
            assert isinstance(error, ApiError), error
            assert_client_error(error, *statuses)


ROW = b"[" + b",".join([b"0.5"] * 783 + [b"1"]) + b"]"
NESTED = b"[" + b",".join([b"[" + b",".join([b"0.25"] * 28) + b"]"] * 28) + b"]"


@pytest.mark.parametrize(
    "raw",
    [
        b'{"instances": [' + ROW + b"]}",
        b' {\n"instances" :[' + ROW + b"," + ROW + b"]\t}\r\n",
        b'{"instances": [' + NESTED + b"," + NESTED + b"]}",
        b'{"instan\\u0063es": [' + ROW + b"]}",  # an escaped key is the same key
    ],
)
def test_v1_common_bodies_take_the_fast_parser(raw: bytes) -> None:
    """The fast parser is not dead code: well-formed bodies never reach the strict parser, call after call."""
    for _ in range(3):
        pixels = _common_case(raw)
        assert pixels is not None and pixels.shape[0] in (1, 2)
        np.testing.assert_array_equal(to_image_batch(pixels), strict_v1(raw))


RAGGED_783 = b"[" + b",".join([b"0.5"] * 783) + b"]"
RAGGED_785 = b"[" + b",".join([b"0.5"] * 785) + b"]"
HIDDEN = b"[" + b",".join([b"0.5"] * 782 + [b"[0.5, 0.5]"]) + b"]"  # 783 elements, 784 numbers


@pytest.mark.parametrize(
    "raw",
    [
        b'{"instances": [' + RAGGED_783 + b"," + RAGGED_785 + b"]}",  # 1568 numbers in all, but ragged
        b'{"instances": [' + HIDDEN.replace(b"0.5,", b"", 1) + b"]}",  # 783 elements, one of them an array
        b'{"instances": [' + ROW[:-1] + b', "["], ' + RAGGED_783 + b"]}",  # a "[" in a string
        b'{"instances": [' + ROW + b'], "instances": [' + ROW + b"]}",  # a key given twice
        b'\xef\xbb\xbf{"instances": [' + ROW + b"]}",  # a byte-order mark
        b'{"instances": [' + ROW + b"]} x",
        b'{"instances": [' + ROW.replace(b"0.5", b"NaN", 1) + b"]}",
        b'{"instances": [' + ROW.replace(b"0.5", b"1e400", 1) + b"]}",
        b'{"instances": [' + ROW.replace(b"0.5", b"null", 1) + b"]}",
        b'{"instances": [' + ROW.replace(b"0.5", b"true", 1) + b"]}",
        b'{"instances": [' + ROW.replace(b"0.5", b'"0.5"', 1) + b"]}",
        b'{"instances": [' + ROW.replace(b"0.5", b"{}", 1) + b"]}",
        b'{"instances": [' + ROW.replace(b"0.5", b"18446744073709551616", 1) + b"]}",
        b'{"instances": [' + ROW.replace(b"0.5", b"-9223372036854775809", 1) + b"]}",
        b'{"instances": [' + NESTED + b"," + ROW + b"]}",
        b'{"instances": [' + NESTED.replace(b"[0.25,", b"[[0.25],", 1) + b"]}",
        b'{"instances": [' + ROW + b'], "other": 1}',
        b'{"instances": []}',
        b'{"instances": {"0": 1}}',
        b'[{"instances": [' + ROW + b"]}]",
        b"",
    ],
)
def test_v1_bodies_the_fast_parser_leaves_to_the_strict_one(raw: bytes) -> None:
    """Bodies near the common case, which the strict parser refuses (and explains) or reads in its own way (a key
    given twice): the fast one must leave them to it, and the answer is the strict parser's, word for word."""
    assert _common_case(raw) is None
    got, strict = parse_v1(raw), strict_v1(raw)
    if isinstance(got, ApiError):
        assert (got.status, got.code, got.message, got.loc) == strict
    else:
        np.testing.assert_array_equal(got, strict)


def test_v1_bodies_past_the_fast_parsers_capacity_go_to_the_strict_one() -> None:
    """The fast parser keeps buffers as large as the largest body it reads: a larger body than it needs is the
    strict parser's (and still parsed right)."""
    long_row = b"[" + b",".join([b"0.5" + b"0" * 47] * 784) + b"]"
    raw = b'{"instances": [' + b",".join([long_row] * 64) + b"]}"  # 64: the server's default limit
    assert len(raw) > FAST_PARSE_MAX_BYTES
    assert _common_case(raw) is None
    got = parse_predict_body(raw, max_instances=64)
    assert got.shape == (64, 1, 28, 28) and (got == 0.5).all()
    assert _common_case(b'{"instances": [' + ROW + b"]}") is not None, "and the parser still works after it"
