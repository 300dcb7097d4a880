"""What both request parsers (/v1 and V2) share: strict pydantic settings, how a client's value is shown in an error,
and the answer to a body that is not JSON at all."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ConfigDict
from pydantic_core import ErrorDetails

from service.api.errors import ApiError

# No coercion (booleans and numeric strings are not numbers), no NaN or Infinity, no unknown keys.
STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")


def describe_value(value: Any) -> str:
    """A client's value, cut short, in the words of JSON: 'abc', true, null, NaN, 1e+300, an array, an object."""
    if isinstance(value, list | dict):
        return "an array" if isinstance(value, list) else "an object"
    text = repr(value) if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."  # a number written with 4000 digits comes back short


def invalid_json(first: ErrorDetails) -> ApiError | None:
    """The 400 for a body that is not valid JSON, from pydantic's first error; None for any other error."""
    if first["type"] != "json_invalid":
        return None
    return ApiError(
        400, "invalid_json", f"request body is not valid JSON: {first['msg'].removeprefix('Invalid JSON: ')}"
    )
