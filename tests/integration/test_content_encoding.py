"""Compressed request bodies on the real server: gzip and deflate are decoded, anything else is refused clearly."""

from __future__ import annotations

import gzip
import json
import zlib

import httpx
import numpy as np
import pytest

from model.artifact import Artifact
from tests.support import ServerProcess

pytestmark = pytest.mark.integration
JSON = {"content-type": "application/json"}


def probabilities(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([p["probabilities"] for p in response.json()["predictions"]])


def test_gzip_and_deflate_bodies_get_the_same_answers_as_plain_ones(server: ServerProcess, test_images) -> None:  # type: ignore[no-untyped-def]
    body = json.dumps({"instances": test_images[0][:8].reshape(8, -1).tolist()}).encode()
    url = f"{server.url}/v1/predict"
    plain = probabilities(httpx.post(url, content=body, headers=JSON))
    half = len(body) // 2
    members = gzip.compress(body[:half]) + gzip.compress(body[half:])  # what `cat a.gz b.gz` makes: still valid gzip
    cases = [("gzip", gzip.compress(body)), ("deflate", zlib.compress(body)), ("GZip", gzip.compress(body))]
    for coding, packed in [*cases, ("gzip", members)]:
        assert len(packed) < len(body) / 2
        got = probabilities(httpx.post(url, content=packed, headers={**JSON, "content-encoding": coding}))
        np.testing.assert_array_equal(got, plain)


def test_the_v2_protocol_takes_gzip_too(server: ServerProcess, tiny_artifact: Artifact) -> None:
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": [0.0] * 784}]})
    r = httpx.post(
        f"{server.url}/v2/models/{tiny_artifact.meta.name}/infer",
        content=gzip.compress(body.encode()),
        headers={**JSON, "content-encoding": "gzip"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["shape"][0] == 1


@pytest.mark.parametrize(
    ("coding", "body", "status", "says"),
    [
        ("br", b"{}", 415, "Content-Encoding br is not supported"),
        ("gzip, gzip", gzip.compress(gzip.compress(b"{}")), 415, "Content-Encoding gzip, gzip is not supported"),
        ("gzip", b'{"instances": []}', 400, "is not valid gzip data"),
        ("deflate", gzip.compress(b"{}"), 400, "is not valid deflate data"),
        ("gzip", gzip.compress(b'{"instances": []}')[:-12], 400, "is cut short"),
        ("deflate", zlib.compress(b"{}") + b"junk", 400, "has 4 bytes after its deflate data"),
        ("gzip", gzip.compress(b"{}") + b"junk", 400, "is not valid gzip data"),
        (
            "gzip",
            gzip.compress(b" " * (4 * 1024 * 1024 + 1)),
            413,
            "larger than the 4194304-byte limit once decompressed",
        ),
    ],
    ids=["brotli", "two codings", "not gzip", "gzip as deflate", "truncated", "deflate+junk", "gzip+junk", "bomb"],
)
def test_bodies_that_cannot_be_decoded_get_a_4xx_that_says_why(
    server: ServerProcess, coding: str, body: bytes, status: int, says: str
) -> None:
    r = httpx.post(f"{server.url}/v1/predict", content=body, headers={**JSON, "content-encoding": coding})
    assert r.status_code == status, r.text
    assert says in r.json()["error"]
    if status == 415:
        assert r.headers["accept-encoding"] == "gzip, deflate, identity"
    assert httpx.get(f"{server.url}/healthz").status_code == 200
