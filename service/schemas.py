"""Request parsing for /v1/predict straight from bytes, and the response models that document the API."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from model.preprocess import PixelError, to_image_batch
from service.errors import ApiError, format_loc

_STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")
EXAMPLE_PIXELS: Any = [0.0] * 784  # a blank image; a real digit is in the README


class _FlatRequest(BaseModel):
    model_config = _STRICT
    instances: list[list[float]]


class _NestedRequest(BaseModel):
    model_config = _STRICT
    instances: list[list[list[float]]]


class PredictRequest(BaseModel):
    """A batch of images: each 784 numbers (row-major) or 28×28 nested lists, pixel values in [0, 1]."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"instances": [EXAMPLE_PIXELS]}]},
    )
    instances: list[list[float]] | list[list[list[float]]] = Field(
        min_length=1, description="images: 784 numbers each, or 28 rows of 28 numbers; 0 = black, 1 = white ink"
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


def parse_predict_body(body: bytes, *, max_instances: int) -> np.ndarray:
    """JSON bytes → validated (N, 1, 28, 28) float32, or an ApiError that names the problem and where it is.

    Parsing and type checking happen in pydantic-core (Rust) with strict types: no Python float per pixel is
    checked by hand, booleans and numeric strings are refused, and NaN/Infinity are refused.
    """
    try:
        data: list[Any] = _FlatRequest.model_validate_json(body).instances
    except ValidationError as flat_error:
        try:
            data = _NestedRequest.model_validate_json(body).instances
        except ValidationError as nested_error:
            raise _explain(flat_error, nested_error) from None
    if not data:
        raise ApiError(422, "invalid_input", "instances: at least one instance is required", loc=["instances"])
    if len(data) > max_instances:
        raise ApiError(
            422, "too_many_instances", f"instances: {len(data)} images in one request, the limit is {max_instances}",
            loc=["instances"],
        )  # fmt: skip
    try:
        pixels = np.array(data, dtype=np.float64)  # range-checked before the cast to float32
    except ValueError:
        raise _ragged(data) from None
    try:
        return to_image_batch(pixels)
    except PixelError as exc:
        raise ApiError(422, "invalid_input", f"{format_loc(exc.loc)}: {exc.message}", loc=exc.loc) from None


def _explain(flat: ValidationError, nested: ValidationError) -> ApiError:
    """Report the errors of the layout the client evidently meant (flat rows or 28×28 nesting)."""
    flat_errors = flat.errors(include_url=False)
    meant_nested = any(e["type"] == "float_type" and isinstance(e.get("input"), list) for e in flat_errors)
    errors = nested.errors(include_url=False) if meant_nested else flat_errors
    first = errors[0]
    loc = [p for p in first["loc"] if isinstance(p, str | int)]
    if first["type"] == "json_invalid":
        return ApiError(
            400, "invalid_json", f"request body is not valid JSON: {first['msg'].removeprefix('Invalid JSON: ')}"
        )
    where = format_loc(loc) or "body"
    msg = first["msg"]
    if first["type"] in ("float_type", "finite_number"):
        msg = f"{msg} (got {_describe(first.get('input'))})"
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return ApiError(422, "invalid_input", f"{where}: {msg}{more}", loc=loc)


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"string {value[:20]!r}"
    if value is None:
        return "null"
    if isinstance(value, list | dict):
        return type(value).__name__.replace("dict", "object").replace("list", "array")
    return repr(value)


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
