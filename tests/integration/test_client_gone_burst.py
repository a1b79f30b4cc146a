"""A client that resets its connection while a burst of tokens is on its way: the exchange ends at once.

Found against real vLLM (docs/real-vllm): a tiny model's tokens often arrive many to one read, and the relay
wrote each of them to the client's transport (one HTTP chunk is one ``on_body`` call) although the client had
reset the connection: asyncio's "socket.send() raised exception." once per write, and the engine was let go
only after the burst, once uvicorn's ``connection_lost`` ran. The stand-in's ``burst`` fault sends the events
N to a write; the gateway is stopped (SIGSTOP) while the next bursts reach its engine socket and then the client
resets, so that when it runs again the bursts and the reset are in one loop iteration, the bursts first, every
time: the first write fails and closes the client's transport, and every later one would go to a dead socket.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.helpers import run_gateway, standin_command, wait_until
from tests.standin.harness import read_records

pytestmark = pytest.mark.timeout(90)

BURST = 40
MAX_TOKENS = 4000  # bursts for seconds more: the engine is still streaming when the gateway lets go


def _config(raw: bool, record: Path) -> dict[str, Any]:
    return {
        "server": {"raw_connections": raw},
        "models": {
            "chat": {
                "engine": "vllm",
                "model": "org/m",
                "command": standin_command("vllm"),
                "env": {"STANDIN_FAULTS": f"burst={BURST},token-interval=0.2", "STANDIN_RECORD": str(record)},
                "health": {"interval": 0.5, "startup_interval": 0.1},
            }
        },
    }


def _request(port: int) -> bytes:
    body = orjson.dumps(
        {
            "model": "chat",
            "stream": True,
            "max_tokens": MAX_TOKENS,
            "ignore_eos": True,
            "messages": [{"role": "user", "content": "one two three four"}],
        }
    )
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "aiohttp"])
def test_a_client_reset_during_a_burst_ends_the_exchange_at_once(tmp_path: Path, raw: bool) -> None:
    record = tmp_path / "engine.jsonl"
    with run_gateway(_config(raw, record), tmp_path) as gw:
        sock = socket.create_connection(("127.0.0.1", gw.port))
        sock.sendall(_request(gw.port))
        got = b""
        while got.count(b"data: ") < BURST // 2:  # the first burst reached the client
            data = sock.recv(65536)
            assert data, got
            got += data
        os.kill(gw.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(1.0)  # a few bursts wait in the gateway's engine socket (a lower bound, never an upper)
            # Unread data in its buffer and SO_LINGER 0: the close is a reset, as a client's often is mid-stream.
            # After the bursts: the gateway's loop, woken, hands it the engine's data first, then the reset.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        finally:
            os.kill(gw.proc.pid, signal.SIGCONT)

        def engine_let_go() -> bool:
            return bool(read_records(record, "disconnect"))

        assert wait_until(engine_let_go, 30), read_records(record)
        assert wait_until(lambda: "client left before the answer" in gw.log(), 10), gw.log()[-3000:]
        gone = read_records(record, "disconnect")[0]
        assert gone["events_sent"] < MAX_TOKENS, gone
        # Not one write after the failed one (asyncio logs from the sixth on; each write was one event or one burst).
        assert gw.log().count("socket.send() raised exception") == 0, gw.log()[-3000:]
