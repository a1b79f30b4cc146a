"""Slow and oversized requests are refused at the HTTP layer, in the error shape (RELIABILITY G3, G4, G5, G6)."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.helpers import Gateway, run_gateway, standin_command
from tests.standin.harness import read_records

RECORD_NAME = "engine.jsonl"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("limits")
    # One engine behind the gateway, recording every request, so a test can show that nothing reached it.
    config = {
        "server": {"header_timeout": 1, "body_timeout": 1},
        "models": {
            "chat": {
                "engine": "vllm",
                "model": "org/chat",
                "command": standin_command("vllm"),
                "env": {"STANDIN_RECORD": str(tmp / RECORD_NAME)},
                "health": {"interval": 0.5, "startup_interval": 0.1},
                "stop_grace": 2,
            }
        },
    }
    with run_gateway(config, tmp) as gw:
        yield gw


def _engine_requests(gw: Gateway) -> list[dict[str, object]]:
    return read_records(gw.log_path.parent / RECORD_NAME, "request")


def _exchange(gw: Gateway, data: bytes) -> bytes:
    """Send ``data`` and read until the gateway closes: every refusal here closes the connection."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=20) as sock:
        sock.sendall(data)
        return _read_to_eof(sock)


def _status_and_error(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)["error"]


@pytest.mark.parametrize(
    "headers",
    [
        b"X-Big: " + b"x" * 40_000 + b"\r\n",
        b"".join(b"X-H%d: v\r\n" % i for i in range(150)),
    ],
)
def test_too_many_or_too_large_headers_get_431(gateway: Gateway, headers: bytes) -> None:
    status, error = _status_and_error(_exchange(gateway, b"GET /health HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n"))
    assert status == 431 and error["code"] == "request_header_fields_too_large"


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n{}{}}",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n"
        b"2\r\n{}\r\n0\r\n\r\n",
        b"GET /health HTTP/1.1\rHost: x\r\n\r\n",
    ],
    ids=["cl-and-te", "two-cls", "te-chunked-identity", "bare-cr"],
)
def test_smuggling_shapes_get_400_and_close(gateway: Gateway, request_bytes: bytes) -> None:
    before = len(_engine_requests(gateway))
    # The socket timeout is far above anything the gateway waits for: reaching it means the connection was
    # left open after the 400, which fails the test instead of ending the read.
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=20) as sock:
        sock.sendall(request_bytes)
        raw = _read_to_eof(sock)
    status, error = _status_and_error(raw)
    assert status == 400 and error["code"] == "invalid_http_request"
    assert set(error) == {"message", "type", "param", "code"}
    assert b"connection: close" in raw.partition(b"\r\n\r\n")[0].lower()
    assert len(_engine_requests(gateway)) == before


def _read_to_eof(sock: socket.socket) -> bytes:
    """Everything until the gateway closes; a read timeout (the socket left open) fails the test.

    A reset is a close too: closing with unread request bytes (a refused body) makes the kernel send RST.
    """
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


def test_headers_that_trickle_get_408_and_the_socket_closed(gateway: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=20) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        for _ in range(3):
            time.sleep(0.4)
            sock.sendall(b"X-Slow: 1\r\n")
        raw = _read_to_eof(sock)  # the 1 s header deadline, though every line came within 0.4 s
    status, error = _status_and_error(raw)
    assert status == 408 and error["code"] == "request_timeout"


def test_body_that_trickles_gets_408_the_socket_closed_and_nothing_sent_on(gateway: Gateway) -> None:
    body = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "slow body " * 20}]}).encode()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    stop = threading.Event()

    def trickle(sock: socket.socket) -> None:
        # One byte every 0.3 s: the whole body would take over a minute, the 1 s body deadline ends it long
        # before. It keeps going after the answer, as a slowloris would: only a close by the gateway ends the
        # read below before its 20 s socket timeout.
        for i in range(len(body)):
            if stop.wait(0.3):
                return
            try:
                sock.sendall(body[i : i + 1])
            except OSError:
                return

    with socket.create_connection(("127.0.0.1", gateway.port), timeout=20) as sock:
        sock.sendall(head)
        sender = threading.Thread(target=trickle, args=(sock,), daemon=True)
        sender.start()
        try:
            raw = _read_to_eof(sock)
        finally:
            stop.set()
            sender.join(5)
    status, error = _status_and_error(raw)
    assert status == 408 and error["code"] == "request_timeout"
    assert set(error) == {"message", "type", "param", "code"}
    assert b"connection: close" in raw.partition(b"\r\n\r\n")[0].lower()
    assert not [r for r in _engine_requests(gateway) if r["path"] == "/v1/chat/completions"]


def test_a_silent_connection_is_closed(gateway: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=20) as sock:
        raw = _read_to_eof(sock)
    assert raw.startswith(b"HTTP/1.1 408")


def test_keep_alive_requests_are_not_cut(gateway: Gateway) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=5)
    try:
        sockets = []
        for _ in range(2):
            connection.request("GET", "/health")
            response = connection.getresponse()
            assert response.status == 200 and response.read()
            sockets.append(connection.sock)
            time.sleep(1.5)  # longer than the header deadline, shorter than the keep-alive timeout
        assert sockets[0] is sockets[1]  # http.client would have reconnected had the server closed it
    finally:
        connection.close()


def test_a_slowloris_crowd_is_cut_off_while_real_clients_are_served(gateway: Gateway) -> None:
    """G3: 200 sockets that each send a header byte now and then hold nothing for long: each gets its 408
    and is closed at the header deadline, and requests from real clients are answered meanwhile."""
    crowd = [socket.create_connection(("127.0.0.1", gateway.port), timeout=20) for _ in range(200)]
    try:
        for sock in crowd:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        served = []
        for round_ in range(5):
            # Trickling within the 1 s header deadline only: a byte sent after the gateway's close would make
            # the kernel answer with a reset, and a reset can drop the 408 before the test reads it.
            for sock in crowd if round_ < 2 else ():
                sock.sendall(b"a")
            connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
            connection.request("GET", "/health")
            served.append(connection.getresponse().status)
            connection.close()
            time.sleep(0.3)
        assert served == [200] * 5
        for sock in crowd:  # each is answered and closed by the gateway; a read timeout would fail here
            status, error = _status_and_error(_read_to_eof(sock))
            assert status == 408 and error["code"] == "request_timeout"
    finally:
        for sock in crowd:
            sock.close()
