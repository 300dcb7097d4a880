"""Request parsing for /v1/predict straight from bytes, and the response models that document the API."""

from __future__ import annotations

import re
from typing import Annotated, Any, TypeGuard

import numpy as np
import simdjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from model.preprocess import IMAGE_PIXELS, IMAGE_SIDE, PixelError, to_image_batch
from service.api.errors import ApiError, format_loc
from service.api.parsing import STRICT, describe_value, invalid_json

_NESTED = re.compile(rb'"instances"\s*:\s*\[\s*\[\s*\[')
EXAMPLE_PIXELS: Any = [0.0] * 784  # a blank image; a real digit is in the README
# One parser, reused: a new one allocates its buffers anew for every document. A parse
# while another document's arrays are still alive raises RuntimeError; `_common_case` holds none past its return.
# The parser keeps buffers for the largest document it has read (12 MB after a 3.5 MB one): larger bodies than 64
# images written with long numbers need are left to the strict parser, so what it keeps stays under ~7 MB.
FAST_PARSE_MAX_BYTES = 2 * 1024 * 1024
_PARSER = simdjson.Parser(max_capacity=FAST_PARSE_MAX_BYTES)


class _FlatRequest(BaseModel):
    model_config = STRICT
    instances: list[list[float]]


class _NestedRequest(BaseModel):
    model_config = STRICT
    instances: list[list[list[float]]]


# Documentation only (the parser above checks the same): sizes and ranges are declared so that a schema-valid
# request is an acceptable one, as a schema-driven client or fuzzer assumes.
_Pixel = Annotated[float, Field(ge=0.0, le=1.0)]
_Row = Annotated[list[_Pixel], Field(min_length=28, max_length=28)]
_FlatImage = Annotated[list[_Pixel], Field(min_length=784, max_length=784)]
_NestedImage = Annotated[list[_Row], Field(min_length=28, max_length=28)]


class PredictRequest(BaseModel):
    """A batch of images: each 784 numbers (row-major) or 28×28 nested lists, pixel values in [0, 1]."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"instances": [EXAMPLE_PIXELS]}]},
    )
    instances: Annotated[list[_FlatImage], Field(min_length=1)] | Annotated[list[_NestedImage], Field(min_length=1)] = (
        Field(description="images: 784 numbers each, or 28 rows of 28 numbers; 0 = black, 1 = white ink")
    )


class ClassPrediction(BaseModel):
    label: int = Field(description="index of the most probable class")
    class_name: str
    confidence: float = Field(description="probability of the predicted class")
    probabilities: list[float] = Field(description="probability of each class, in class order")


class ModelRef(BaseModel):
    name: str
    version: str


class PredictResponse(BaseModel):
    model: ModelRef
    predictions: list[ClassPrediction]


class ImagePrediction(ClassPrediction):
    filename: str = Field(description="the uploaded file's name, as sent")


class ImagePredictResponse(BaseModel):
    model: ModelRef
    predictions: list[ImagePrediction] = Field(description="one per uploaded file, in upload order")


def parse_predict_body(body: bytes, *, max_instances: int, common_case: bool = True) -> np.ndarray:
    """JSON bytes → validated (N, 1, 28, 28) float32, or an ApiError that names the problem and where it is.

    Parsing and type checking happen in pydantic-core (Rust) with strict types: no Python float per pixel is
    checked by hand, booleans and numeric strings are refused, and NaN/Infinity are refused.
    """
    pixels = _common_case(body) if common_case else None  # off only in the tests that compare the two parsers
    if pixels is None:
        pixels = _strict_instances(body, max_instances)
    elif len(pixels) > max_instances:
        raise _too_many(len(pixels), max_instances)
    try:
        return to_image_batch(pixels)
    except PixelError as exc:
        raise ApiError(422, "invalid_input", f"{format_loc(exc.loc)}: {exc.message}", loc=exc.loc) from None


def _strict_instances(body: bytes, max_instances: int) -> np.ndarray:
    """The reference parser: pydantic-core in strict mode, then one float64 array; every error explained."""
    # Try the layout the body evidently uses first: a failed strict parse of 28 rows builds 28+ error objects.
    first, second = (_NestedRequest, _FlatRequest) if _NESTED.search(body, 0, 256) else (_FlatRequest, _NestedRequest)
    try:
        data: list[Any] = first.model_validate_json(body).instances
    except ValidationError as first_error:
        try:
            data = second.model_validate_json(body).instances
        except ValidationError as second_error:
            flat, nested = (first_error, second_error) if first is _FlatRequest else (second_error, first_error)
            raise _explain(flat, nested) from None
    if not data:
        raise ApiError(422, "invalid_input", "instances: at least one instance is required", loc=["instances"])
    if len(data) > max_instances:
        raise _too_many(len(data), max_instances)
    try:
        return np.array(data, dtype=np.float64)  # range-checked before the cast to float32
    except ValueError:
        raise _ragged(data) from None


def _common_case(body: bytes) -> np.ndarray | None:
    """A well-formed body of numbers as a float64 array, straight from the bytes: simdjson parses it and copies the
    numbers into one buffer, with no Python float made: a third of the cost of orjson and a numpy conversion, which
    took a quarter of the event loop's time at c=32 (bench/HISTORY.md). None for anything else, which then goes through the strict parser, the reference.

    It accepts only what the strict parser accepts, with the same values: one "instances" key holding 784 numbers
    per instance, or 28 rows of 28. Which is made sure of without walking every value from Python: once each
    instance (and, in the 28×28 layout, each row) is an array of the right length, the count of "[" in the body says
    whether any array lies deeper (a "[" in a string only adds to it, and the string fails as a number). A key given
    twice counts twice, and simdjson refuses what the strict parser does (NaN, Infinity, 1e400, trailing bytes, bad
    UTF-8), so those go to the strict parser for its message; a UTF-8 byte-order mark, which simdjson skips and JSON
    does not allow, does too.
    """
    if body.startswith(b"\xef\xbb\xbf"):
        return None
    try:
        doc = _PARSER.parse(body)
        if not isinstance(doc, simdjson.Object) or len(doc) != 1:
            return None
        instances = doc["instances"]
        if not isinstance(instances, simdjson.Array) or len(instances) == 0:
            return None
        n, brackets = len(instances), body.count(b"[")
        if brackets == 1 + n:  # then no array lies deeper than the instances
            if not all(_is_array_of(image, IMAGE_PIXELS) for image in instances):
                return None
            shape: tuple[int, ...] = (n, IMAGE_PIXELS)
        elif brackets == 1 + n * (1 + IMAGE_SIDE):  # then none lies deeper than their rows
            for rows in instances:
                if not _is_array_of(rows, IMAGE_SIDE) or not all(_is_array_of(row, IMAGE_SIDE) for row in rows):
                    return None
            shape = (n, IMAGE_SIDE, IMAGE_SIDE)
        else:
            return None
        # TypeError for an element that is not a number: null, true, false, a string or an object
        return np.frombuffer(instances.as_buffer(of_type="d"), np.float64).reshape(shape)
    except (ValueError, RuntimeError, TypeError, KeyError):  # not JSON, a 65-bit integer, no "instances", a wrong
        return None  # type, or the parser busy with another thread's document (its arrays alive): the strict parser


def _is_array_of(value: object, length: int) -> TypeGuard[simdjson.Array]:
    return isinstance(value, simdjson.Array) and len(value) == length


def _too_many(count: int, limit: int) -> ApiError:
    return ApiError(
        422, "too_many_instances", f"instances: {count} images in one request, the limit is {limit}", loc=["instances"]
    )


def _explain(flat: ValidationError, nested: ValidationError) -> ApiError:
    """Report the errors of the layout the client evidently meant (flat rows or 28×28 nesting): the one under which
    more leading instances are valid, then the one with fewer errors. So a stray array in a flat row, or a flat
    instance after nested ones, is blamed where it is, not on every other instance."""
    flat_errors, nested_errors = flat.errors(include_url=False), nested.errors(include_url=False)
    errors = min((flat_errors, nested_errors), key=lambda errs: (-_first_bad_instance(errs), len(errs)))
    first = errors[0]
    loc = [p for p in first["loc"] if isinstance(p, str | int)]
    if (not_json := invalid_json(first)) is not None:
        return not_json
    where = format_loc(loc) or "body"
    msg = first["msg"]
    if first["type"] in ("float_type", "finite_number"):
        msg = f"{msg} (got {describe_value(first.get('input'))})"
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return ApiError(422, "invalid_input", f"{where}: {msg}{more}", loc=loc)


def _first_bad_instance(errors: list[Any]) -> int:
    """The index of the first instance with an error; -1 when an error is outside the instances."""
    found = [e["loc"][1] if e["loc"][:1] == ("instances",) and len(e["loc"]) > 1 else -1 for e in errors]
    return min((i if isinstance(i, int) else -1 for i in found), default=-1)


def _ragged(data: list[Any]) -> ApiError:
    """Name the first instance (or row) whose length differs from the expected 784 or 28×28."""
    for i, inst in enumerate(data):
        if inst and isinstance(inst[0], list):
            if len(inst) != 28:
                return ApiError(
                    422, "invalid_input", f"instances[{i}]: expected 28 rows, got {len(inst)}", loc=["instances", i]
                )
            for j, row in enumerate(inst):
                if len(row) != 28:
                    return ApiError(
                        422, "invalid_input", f"instances[{i}][{j}]: expected 28 values per row, got {len(row)}",
                        loc=["instances", i, j],
                    )  # fmt: skip
        elif len(inst) != 784:
            return ApiError(
                422, "invalid_input", f"instances[{i}]: expected 784 values, got {len(inst)}", loc=["instances", i]
            )
    return ApiError(422, "invalid_input", "instances: all instances must have the same layout (784 values or 28×28)")
