"""A worker passes what it does not answer itself to the owner's app, on the owner's Unix socket.

The request path (model endpoints) runs in the worker; ``/health``, ``/ready``, ``/metrics``, ``/v1/models``,
``/gpu/status`` and ``/admin/*`` read or change the engines, which only the owner has. The owner's app
answers them with its own middleware (keys, request ids, its metrics), so a worker adds nothing and
checks nothing here: it copies the request over and the answer back, streams included (``/admin/logs``
follows), and drops the owner's connection when its client leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp
from starlette.types import Message, Receive, Scope, Send

from gateway.http.errors import error_body

log = logging.getLogger("gateway.workers")

_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"te",
        b"upgrade",
        b"trailer",
        b"proxy-authorization",
        b"proxy-connection",
        b"host",
        b"content-length",
    }
)
_OUT_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"trailer"})


class OwnerForward:
    """The ASGI app that relays a request to the owner and its answer back."""

    def __init__(self, socket_path: str, max_body_bytes: int) -> None:
        self._path = socket_path
        self._max_body = max_body_bytes
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.UnixConnector(path=self._path, limit=64)
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None, connect=5)
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        assert self._session is not None
        body = await self._read_body(receive, send)
        if body is None:
            return
        target = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k not in _HOP_BY_HOP]
        try:
            response = await self._session.request(
                scope["method"],
                "http://owner" + target.decode("latin-1"),
                headers=headers,
                data=body,
                allow_redirects=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
            )
        except (aiohttp.ClientError, OSError):
            log.warning("the owner process did not answer a forwarded %s", scope["path"])
            await _unavailable(send)
            return
        async with response:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": [(k, v) for k, v in response.raw_headers if k.lower() not in _OUT_HOP_BY_HOP],
                }
            )
            copy = asyncio.ensure_future(self._copy(response, send))
            left = asyncio.ensure_future(_client_left(receive))
            try:
                await asyncio.wait({copy, left}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (copy, left):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task

    async def _read_body(self, receive: Receive, send: Send) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body:
                await _reply(
                    send,
                    413,
                    error_body("The request body is too large.", "invalid_request_error", "request_too_large"),
                )
                return None
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    @staticmethod
    async def _copy(response: aiohttp.ClientResponse, send: Send) -> None:
        try:
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except (aiohttp.ClientError, OSError):
            pass  # the owner went away mid-answer: the client sees the body end
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _client_left(receive: Receive) -> None:
    message: Message = {"type": ""}
    while message["type"] != "http.disconnect":
        message = await receive()


async def _unavailable(send: Send) -> None:
    await _reply(
        send,
        503,
        error_body(
            "The gateway's owner process is not answering; retry shortly.", "service_unavailable", "owner_unavailable"
        ),
        retry_after=b"1",
    )


async def _reply(send: Send, status: int, body: bytes, retry_after: bytes | None = None) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", retry_after))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
