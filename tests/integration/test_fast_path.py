"""POST /v1/predict answers the same, byte for byte, through the pure-ASGI fast path and through FastAPI."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import ServerProcess, metric

pytestmark = pytest.mark.integration

GOOD = json.dumps({"instances": [[0.5] * 784]})
CASES: list[tuple[str, dict[str, str], bytes]] = [
    ("flat", {"content-type": "application/json"}, GOOD.encode()),
    ("nested", {"content-type": "application/json"}, json.dumps({"instances": [[[0.1] * 28] * 28] * 2}).encode()),
    ("charset", {"content-type": "application/json; charset=utf-8"}, GOOD.encode()),
    ("no content type", {}, GOOD.encode()),
    ("text/plain", {"content-type": "text/plain"}, GOOD.encode()),
    ("invalid json", {"content-type": "application/json"}, b'{"instances": [[0.5,'),
    ("empty body", {"content-type": "application/json"}, b""),
    ("out of range", {"content-type": "application/json"}, json.dumps({"instances": [[2.0] * 784]}).encode()),
    ("string pixel", {"content-type": "application/json"}, json.dumps({"instances": [["0.5"] * 784]}).encode()),
    ("ragged", {"content-type": "application/json"}, json.dumps({"instances": [[0.5] * 784, [0.5] * 10]}).encode()),
    ("no instances", {"content-type": "application/json"}, b'{"instances": []}'),
    ("too many", {"content-type": "application/json"}, json.dumps({"instances": [[0.0] * 784] * 65}).encode()),
    ("extra key", {"content-type": "application/json"}, b'{"instances": [], "x": 1}'),
    ("too large", {"content-type": "application/json"}, b" " * (4 * 1024 * 1024 + 1)),
    ("gzip", {"content-type": "application/json", "content-encoding": "gzip"}, gzip.compress(GOOD.encode())),
    ("deflate", {"content-type": "application/json", "content-encoding": "deflate"}, zlib.compress(GOOD.encode())),
    ("identity", {"content-type": "application/json", "content-encoding": "identity"}, GOOD.encode()),
    ("brotli", {"content-type": "application/json", "content-encoding": "br"}, GOOD.encode()),
    ("not gzip", {"content-type": "application/json", "content-encoding": "gzip"}, GOOD.encode()),
    ("cut gzip", {"content-type": "application/json", "content-encoding": "gzip"}, gzip.compress(GOOD.encode())[:-9]),
    # 4 MiB + 1 of JSON whitespace in ~4 KB of gzip: 413 from decompressing, never the whole bomb in memory
    ("gzip bomb", {"content-type": "application/json", "content-encoding": "gzip"},
     gzip.compress(b" " * (4 * 1024 * 1024 + 1))),
]  # fmt: skip


@pytest.fixture(scope="module")
def slow_path_server(tiny_artifact_dir: Path) -> Iterator[ServerProcess]:
    with ServerProcess(tiny_artifact_dir, fast_path="false", drift_window=64) as srv:
        yield srv


def _answer(url: str, headers: dict[str, str], body: bytes) -> tuple[int, str, bytes]:
    r = httpx.post(f"{url}/v1/predict", headers=headers, content=body, timeout=30)
    return r.status_code, r.headers.get("content-type", ""), r.content


@pytest.mark.parametrize(("headers", "body"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_fast_path_answers_like_fastapi(
    server: ServerProcess, slow_path_server: ServerProcess, headers: dict[str, str], body: bytes
) -> None:
    fast = _answer(server.url, headers, body)
    slow = _answer(slow_path_server.url, headers, body)
    assert fast == slow
    assert fast[0] < 500


def test_fast_path_requests_are_counted_under_the_route(server: ServerProcess) -> None:
    def count(status: str) -> float:
        text = httpx.get(f"{server.url}/metrics").text
        return metric(text, "bnserve_http_requests_total", route="/v1/predict", method="POST", status=status)

    ok, bad = count("200"), count("415")
    assert _answer(server.url, {"content-type": "application/json"}, GOOD.encode())[0] == 200
    assert _answer(server.url, {"content-type": "text/plain"}, GOOD.encode())[0] == 415
    assert (count("200"), count("415")) == (ok + 1, bad + 1)


def test_other_methods_and_paths_still_go_through_fastapi(server: ServerProcess) -> None:
    r = httpx.get(f"{server.url}/v1/predict")
    assert r.status_code == 405
    assert r.json()["code"] == "method_not_allowed"
    assert httpx.post(f"{server.url}/v1/predict/", json={}).status_code in (307, 404)
