"""Open Inference Protocol V2 (KServe/Triton REST): request and response models, and the tensor parser (no HTTP)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    FailFast,
    Field,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
)

from model.preprocess import IMAGE_PIXELS, IMAGE_SIDE, uint8_to_unit
from service.api.errors import ApiError, format_loc
from service.api.parsing import STRICT, describe_value, invalid_json

INPUT_NAME = "input"
OUTPUT_NAMES = ("probabilities", "label")
DATATYPES = ("FP32", "UINT8")
PLATFORM = "pytorch_safetensors"  # "<project>_<format>" as the spec asks; none of its listed platforms fits
# Besides the canonical (N, 1, 28, 28), these per-image layouts are accepted too.
LAYOUTS = ((1, IMAGE_SIDE, IMAGE_SIDE), (IMAGE_SIDE, IMAGE_SIDE), (IMAGE_PIXELS,))
BINARY_UNSUPPORTED = (
    "the binary tensor data extension is not supported: send each tensor as a JSON array in 'data', without "
    "binary_data_size, binary_data or binary_data_output parameters or an Inference-Header-Content-Length header"
)


def _scalar(value: Any) -> Any:
    if not isinstance(value, str | int | float) or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError("parameter values must be strings, finite numbers or booleans")
    return value


_SCALAR_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}]}
# $parameters: {"name": string | number | boolean}; only the binary-data ones mean anything here (they are refused).
Parameters = dict[str, Annotated[Any, AfterValidator(_scalar), WithJsonSchema(_SCALAR_SCHEMA)]]
_DATA_SCHEMA: dict[str, Any] = {
    "type": "array",
    "description": "the tensor's elements in row-major order, flat or nested to match `shape`",
    "items": {"anyOf": [{"type": "number"}, {"type": "array"}]},
}
_EXAMPLE: dict[str, Any] = {
    "id": "42",
    "inputs": [{"name": INPUT_NAME, "shape": [1, IMAGE_PIXELS], "datatype": "FP32", "data": [0.0] * IMAGE_PIXELS}],
    "outputs": [{"name": "probabilities"}, {"name": "label"}],
}


class RequestInput(BaseModel):
    """One input tensor: this model takes exactly one, named "input", with FP32 pixels in [0, 1] or UINT8 0..255."""

    # `data` is optional here only so that a binary-extension request gets its own error first; documented required.
    # The enums and sizes below only document; the parser checks them itself, to say more precisely what is wrong.
    model_config = ConfigDict(**STRICT, json_schema_extra=lambda schema: schema["required"].append("data"))
    name: str = Field(json_schema_extra={"enum": [INPUT_NAME]})
    shape: list[Annotated[int, Field(ge=0, le=2**64 - 1)]] = Field(
        description="[N, 1, 28, 28], [N, 28, 28] or [N, 784]", json_schema_extra={"minItems": 2, "maxItems": 4}
    )
    datatype: str = Field(
        description="FP32 (pixels in [0, 1]) or UINT8 (pixels 0..255)", json_schema_extra={"enum": list(DATATYPES)}
    )
    parameters: Parameters = Field(default_factory=dict)
    data: Annotated[Any, WithJsonSchema(_DATA_SCHEMA)] = None  # checked once datatype and shape are known


class RequestOutput(BaseModel):
    model_config = STRICT
    name: str = Field(json_schema_extra={"enum": list(OUTPUT_NAMES)})
    parameters: Parameters = Field(default_factory=dict)


class InferenceRequest(BaseModel):
    """$inference_request: "id" is echoed back; "outputs" picks outputs (absent or empty: all of them)."""

    model_config = ConfigDict(**STRICT, json_schema_extra={"examples": [_EXAMPLE]})
    id: str | None = None
    parameters: Parameters = Field(default_factory=dict)
    inputs: list[RequestInput] = Field(
        description='exactly one tensor, named "input"', json_schema_extra={"minItems": 1, "maxItems": 1}
    )
    outputs: list[RequestOutput] | None = None


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 marks a variable-size dimension")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float] | list[int] = Field(description="row-major, flat")


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str = Field(description="the version that actually made these predictions")
    id: str | None = Field(None, description="the request's id, present only when the request had one")
    outputs: list[ResponseOutput]


@dataclass(frozen=True)
class ParsedInference:
    """A validated inference request: what the batcher needs and what the response must contain."""

    id: str | None
    pixels: np.ndarray  # (N, 1, 28, 28) float32 in [0, 1]
    outputs: tuple[str, ...]  # output names, in the order the response lists them


def parse_infer_body(body: bytes, *, max_instances: int) -> ParsedInference:
    """JSON bytes → ParsedInference, or a 400 ApiError that says what is wrong and where.

    The body is parsed in pydantic-core (Rust) with strict types; the tensor data is then flattened, type-checked
    there in one pass that stops at the first bad element, and range-checked by numpy on the whole array at once.
    """
    try:
        request = InferenceRequest.model_validate_json(body)
    except ValidationError as exc:
        raise _request_error(exc) from None
    _refuse_binary(request)
    if len(request.inputs) != 1:
        raise _bad(["inputs"], f"this model takes exactly one input tensor, {INPUT_NAME!r}; got {len(request.inputs)}")
    tensor = request.inputs[0]
    if tensor.name != INPUT_NAME:
        raise _bad(
            ["inputs", 0, "name"], f"unknown input {describe_value(tensor.name)}; this model's input is {INPUT_NAME!r}"
        )
    if tensor.datatype not in DATATYPES:
        raise _bad(["inputs", 0, "datatype"], f"datatype must be FP32 or UINT8, got {describe_value(tensor.datatype)}")
    _check_shape(tensor.shape, max_instances)
    return ParsedInference(request.id, _pixels(tensor), _requested_outputs(request.outputs))


def _bad(loc: list[str | int], message: str, code: str = "invalid_input") -> ApiError:
    return ApiError(400, code, f"{format_loc(loc)}: {message}", loc=loc)


def _request_error(exc: ValidationError) -> ApiError:
    first = exc.errors(include_url=False)[0]
    if (not_json := invalid_json(first)) is not None:
        return not_json
    loc = [p for p in first["loc"] if isinstance(p, str | int)]
    got = f" (got {describe_value(first['input'])})" if first["type"] not in ("missing", "extra_forbidden") else ""
    return ApiError(400, "invalid_input", f"{format_loc(loc) or 'body'}: {first['msg']}{got}", loc=loc)


def _refuse_binary(request: InferenceRequest) -> None:
    """Any request for binary tensor data is refused (asking for it to be off, `false`, is fine)."""
    wants = request.parameters.get("binary_data_output", False) is not False
    wants |= any("binary_data_size" in t.parameters for t in request.inputs)
    wants |= any(o.parameters.get("binary_data", False) is not False for o in request.outputs or ())
    if wants:
        raise ApiError(400, "binary_data_unsupported", BINARY_UNSUPPORTED)


def _check_shape(shape: list[int], max_instances: int) -> None:
    if len(shape) < 2 or tuple(shape[1:]) not in LAYOUTS:
        shown = str(shape) if len(shape) <= 6 else f"{len(shape)} dimensions"
        raise _bad(["inputs", 0, "shape"], f"must be [N, 1, 28, 28], [N, 28, 28] or [N, 784], got {shown}")
    if shape[0] == 0:
        raise _bad(["inputs", 0, "shape"], "at least one image is required (N = 0)")
    if shape[0] > max_instances:
        raise _bad(["inputs", 0, "shape"], f"{shape[0]} images in one request, the limit is {max_instances}",
                   "too_many_instances")  # fmt: skip


# Each datatype's value range, and a strict validator of its JSON elements. Nested data is flattened before it is
# validated: having pydantic rebuild thousands of small lists costs more, mostly in garbage collection.
_RANGES: dict[str, tuple[float, float, str]] = {
    "FP32": (0.0, 1.0, "[0, 1] (send datatype UINT8 for 0..255 pixels)"),
    "UINT8": (0, 255, "0..255"),
}
_ELEMENT_CONFIG = ConfigDict(strict=True, allow_inf_nan=False)
_VALIDATORS: dict[str, TypeAdapter[list[Any]]] = {
    "FP32": TypeAdapter(Annotated[list[float], FailFast()], config=_ELEMENT_CONFIG),
    "UINT8": TypeAdapter(Annotated[list[int], FailFast()], config=_ELEMENT_CONFIG),
}


def _pixels(tensor: RequestInput) -> np.ndarray:
    """Validate `data` against datatype and shape; → (N, 1, 28, 28) float32 in [0, 1]."""
    data, shape = tensor.data, tensor.shape
    where: list[str | int] = ["inputs", 0, "data"]
    if not isinstance(data, list):
        raise _bad(where, f"expected an array of pixel values, got {describe_value(data)}")
    depth = _depth(data)
    if depth not in (1, len(shape)):
        raise _bad(where, f"must be flat or nested like shape {shape}, got {depth} levels of arrays")
    layout: tuple[int, ...] = tuple(shape)
    if depth == 1:
        flat, layout = data, (len(data),)
        if len(data) != math.prod(shape):
            raise _bad(where, f"shape {shape} needs {math.prod(shape)} values, got {len(data)}")
    else:
        flat = _flatten(data, shape)
    try:
        values = _VALIDATORS[tensor.datatype].validate_python(flat)
    except ValidationError as exc:
        raise _element_error(exc, tensor.datatype, layout) from None
    array = np.array(values)  # float64 or int64 (object for ints past int64); faster than asking for a dtype
    low, high, allowed = _RANGES[tensor.datatype]
    bad = (array < low) | (array > high)
    if bad.any():
        k = int(np.argmax(bad))
        raise _bad(_loc(k, layout), f"{tensor.datatype} values must be in {allowed}, got {describe_value(values[k])}")
    pixels = array.astype(np.float32) if tensor.datatype == "FP32" else uint8_to_unit(array.astype(np.uint8))
    return pixels.reshape(shape[0], 1, IMAGE_SIDE, IMAGE_SIDE)


def _depth(data: Any) -> int:
    """How deeply arrays nest, following first elements: 0.5 → 0, [0.5] → 1, [[0.5], ...] → 2."""
    depth = 0
    while isinstance(data, list):
        depth += 1
        data = data[0] if data else None
    return depth


def _flatten(data: list[Any], shape: list[int]) -> list[Any]:
    """Data nested like `shape` → its elements in row-major order; a 400 naming the first array that is not."""
    level = [data]
    for size in shape:
        if not all(isinstance(array, list) and len(array) == size for array in level):
            error = _layout_error(data, shape, 0, ["inputs", 0, "data"])
            assert error is not None, "a level that fails the check holds a mismatch"
            raise error
        level = list(itertools.chain.from_iterable(level))
    return level


def _layout_error(array: Any, shape: list[int], dim: int, loc: list[str | int]) -> ApiError | None:
    if not isinstance(array, list):
        return _bad(loc, f"expected an array (data nested like shape {shape}), got {describe_value(array)}")
    if len(array) != shape[dim]:
        return _bad(loc, f"expected {shape[dim]} entries (shape {shape}), got {len(array)}")
    if dim + 1 < len(shape):
        for i, item in enumerate(array):
            if (error := _layout_error(item, shape, dim + 1, [*loc, i])) is not None:
                return error
    return None


def _loc(k: int, layout: tuple[int, ...]) -> list[str | int]:
    """Flat element index → where the client put it: data[k], or data[i][j]... for nested data."""
    return ["inputs", 0, "data", *(int(i) for i in np.unravel_index(k, layout))]


def _element_error(exc: ValidationError, datatype: str, layout: tuple[int, ...]) -> ApiError:
    first = exc.errors(include_url=False)[0]
    k = first["loc"][0]
    assert isinstance(k, int)
    got = describe_value(first["input"])
    if first["type"] == "finite_number":
        return _bad(_loc(k, layout), f"values must be finite numbers, got {got}")
    return _bad(_loc(k, layout), f"expected {'a number' if datatype == 'FP32' else 'an integer 0..255'}, got {got}")


def _requested_outputs(outputs: list[RequestOutput] | None) -> tuple[str, ...]:
    if not outputs:
        return OUTPUT_NAMES
    names: list[str] = []
    for i, output in enumerate(outputs):
        if output.name not in OUTPUT_NAMES:
            raise _bad(
                ["outputs", i, "name"],
                f"unknown output {describe_value(output.name)}; this model has {', '.join(OUTPUT_NAMES)}",
            )
        if output.name in names:
            raise _bad(["outputs", i, "name"], f"output {output.name!r} is requested twice")
        names.append(output.name)
    return tuple(names)
