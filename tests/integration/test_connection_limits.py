"""Slow, stalled, vanishing and too many clients against a real server: a stalled head or body gets 408 and its
connection closes, a client gone mid-body counts as 499 (never 5xx) with one log line, a steady slow client is
served, and connections past the cap get a 503 in the service's error shape."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from model.artifact import Artifact
from tests.support import ServerProcess, metric

pytestmark = pytest.mark.integration

READ_TIMEOUT = 1.0
MAX_CONNECTIONS = 4
BODY = json.dumps({"instances": [[0.5] * 784]}).encode()


@pytest.fixture(scope="module")
def srv(tiny_artifact_dir: Path) -> Iterator[ServerProcess]:
    with ServerProcess(tiny_artifact_dir, read_timeout=READ_TIMEOUT, max_connections=MAX_CONNECTIONS) as s:
        yield s


def head(path: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


def wait_closed(sock: socket.socket, within: float) -> tuple[bytes, float]:
    """What the server wrote before closing, and how long it took to close."""
    started, data = time.monotonic(), b""
    sock.settimeout(within)
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data, time.monotonic() - started


def test_a_stalled_body_gets_408_and_its_connection_closes(srv: ServerProcess) -> None:
    before = metric(
        httpx.get(f"{srv.url}/metrics").text,
        "bnserve_http_requests_total",
        route="/v1/predict",
        method="POST",
        status="499",
    )
    with socket.create_connection(("127.0.0.1", srv.port)) as sock:
        sock.sendall(head("/v1/predict", len(BODY)) + BODY[:10])
        answer, waited = wait_closed(sock, within=READ_TIMEOUT * 10)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["code"] == "request_timeout"
    assert waited < READ_TIMEOUT * 5
    text = httpx.get(f"{srv.url}/metrics").text
    assert metric(text, "bnserve_http_requests_total", route="/v1/predict", method="POST", status="499") == before + 1


def test_a_stalled_head_gets_408_and_a_silent_connection_is_closed(srv: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", srv.port)) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Ty")
        answer, _ = wait_closed(sock, within=READ_TIMEOUT * 10)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    with socket.create_connection(("127.0.0.1", srv.port)) as sock:
        answer, waited = wait_closed(sock, within=READ_TIMEOUT * 10)
    assert answer == b"" and waited < READ_TIMEOUT * 5, "a connection that never sends a request is closed"


def test_a_slow_but_steady_client_is_served(srv: ServerProcess) -> None:
    request = head("/v1/predict", len(BODY)) + BODY
    pieces = [request[i : i + len(request) // 12 + 1] for i in range(0, len(request), len(request) // 12 + 1)]
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        for piece in pieces:  # ~4 s in all, never READ_TIMEOUT without a byte
            sock.sendall(piece)
            time.sleep(READ_TIMEOUT * 0.3)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]


@pytest.mark.parametrize("path", ["/v1/predict", "/v2/models/{name}/infer"])
def test_a_client_gone_mid_body_is_counted_as_499_not_500(
    srv: ServerProcess, tiny_artifact: Artifact, path: str
) -> None:
    url = path.replace("{name}", tiny_artifact.meta.name)
    labels = {"route": path, "method": "POST"}
    before = httpx.get(f"{srv.url}/metrics").text
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", srv.port)) as sock:
            sock.sendall(head(url, 1000) + b"x" * 10)
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = httpx.get(f"{srv.url}/metrics").text
        if (
            metric(after, "bnserve_http_requests_total", **labels, status="499")
            >= metric(before, "bnserve_http_requests_total", **labels, status="499") + 3
        ):
            break
        time.sleep(0.1)
    assert (
        metric(after, "bnserve_http_requests_total", **labels, status="499")
        == metric(before, "bnserve_http_requests_total", **labels, status="499") + 3
    )
    assert metric(after, "bnserve_http_requests_total", **labels, status="500") == 0
    assert "Traceback" not in srv.logs() and "went away before its request was complete" in srv.logs()


def test_connections_past_the_cap_get_a_503_in_the_error_shape(srv: ServerProcess) -> None:
    held = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", srv.port)) as sock:
            sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer, _ = wait_closed(sock, within=10)
    finally:
        for sock in held:
            sock.close()
    assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
    head_part, body = answer.split(b"\r\n\r\n", 1)
    assert b"retry-after: 1" in head_part.lower()
    assert json.loads(body)["code"] == "overloaded"
    time.sleep(0.2)
    assert httpx.get(f"{srv.url}/readyz").status_code == 200, "below the cap again: served"
