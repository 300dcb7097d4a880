"""The HTTP protocol (service/http.py) on a real server, over raw sockets: each response written once, head and body
together, and the exchanges where a response's head goes out without a body, or a write comes before the head."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from tests.support import ServerProcess

pytestmark = pytest.mark.integration

BODY = json.dumps({"instances": [[0.5] * 784]}).encode()


def read_responses(sock: socket.socket, count: int) -> list[tuple[bytes, bytes]]:
    """`count` responses as (head, body), reading bodies by their Content-Length."""
    buffer, responses = b"", []
    while len(responses) < count:
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            assert chunk, f"the connection closed after {len(responses)} responses: {buffer[:200]!r}"
            buffer += chunk
        head, buffer = buffer.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        length = next(
            (int(v) for k, _, v in (ln.partition(b":") for ln in lines[1:]) if k.lower() == b"content-length"), 0
        )
        while len(buffer) < length:
            chunk = sock.recv(65536)
            assert chunk, "the connection closed mid-body"
            buffer += chunk
        responses.append((head, buffer[:length]))
        buffer = buffer[length:]
    return responses


def predict_request(extra: bytes = b"") -> bytes:
    return (
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + extra
        + b"Content-Length: "
        + str(len(BODY)).encode()
        + b"\r\n\r\n"
    )


def test_pipelined_requests_are_answered_in_order_on_one_connection(server: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall((predict_request() + BODY) * 3 + b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        responses = read_responses(sock, 4)
    for head, body in responses[:3]:
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert json.loads(body)["predictions"][0]["label"] in range(10)
    assert responses[3][0].startswith(b"HTTP/1.1 200 ") and json.loads(responses[3][1])


def test_a_head_request_gets_the_head_alone_and_the_connection_goes_on(server: ServerProcess) -> None:
    """No body write follows a HEAD response's head: it must go out when the response completes, not wait."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"HEAD /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        assert data.startswith(b"HTTP/1.1 "), data
        assert data.endswith(b"\r\n\r\n"), "no body after a HEAD response's head"
        sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        [(head, body)] = read_responses(sock, 1)
    assert head.startswith(b"HTTP/1.1 200 ") and json.loads(body)


def test_expect_100_continue_gets_its_interim_answer_before_the_body_is_sent(server: ServerProcess) -> None:
    """`100 Continue` is written before the response starts: it must pass straight through, not wait for a body."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(predict_request(b"Expect: 100-continue\r\n"))
        interim = sock.recv(65536)
        assert interim.startswith(b"HTTP/1.1 100 Continue"), interim
        sock.sendall(BODY)
        [(head, body)] = read_responses(sock, 1)
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert len(json.loads(body)["predictions"]) == 1


def send_until_closed(sock: socket.socket, first: bytes, filler: bytes, most: int) -> int:
    """Send `first`, then `filler` again and again until the server closes the connection or `most` bytes went;
    returns how many bytes were sent."""
    sock.sendall(first)
    sent = len(first)
    try:
        while sent < most:
            sock.sendall(filler)
            sent += len(filler)
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent


def answer_after(sock: socket.socket) -> bytes:
    """Whatever the server wrote before it closed the connection."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


CHUNKED = (
    b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def chunked(body: bytes) -> bytes:
    return f"{len(body):x}\r\n".encode() + body + b"\r\n"


@pytest.mark.parametrize(
    ("case", "trailer_start", "filler"),
    [
        ("one endless trailer line", b"0\r\nX-Trailer: ", b"a" * 8192),
        ("endless short trailer lines", b"0\r\n", b"X-T: v\r\n" * 1024),
    ],
)
def test_trailers_are_bounded_by_the_head_limit(
    server: ServerProcess, case: str, trailer_start: bytes, filler: bytes
) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sent = send_until_closed(sock, CHUNKED + chunked(BODY) + trailer_start, filler, most=64 * 1024 * 1024)
        answer = answer_after(sock)
    assert sent < 4 * 1024 * 1024, f"{case}: the server kept reading trailers ({sent} bytes)"
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["code"] == "request_header_fields_too_large"
    assert httpx.get(f"{server.url}/readyz").status_code == 200


def test_a_small_trailer_is_dropped_and_the_request_served(server: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(CHUNKED + chunked(BODY[:100]) + chunked(BODY[100:]) + b"0\r\nX-Checksum: abc\r\n\r\n")
        [(head, body)] = read_responses(sock, 1)
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert len(json.loads(body)["predictions"]) == 1
