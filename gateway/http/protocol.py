"""uvicorn's httptools protocol with the limits it lacks: a header deadline and header size caps.

uvicorn bounds neither how long a client may take to send its request headers (slowloris: 500 sockets
each dribbling a byte every few seconds hold 500 connections for ever) nor how many or how large those
headers are (httptools buffers whatever arrives). Both are refused here, at the HTTP layer, before any
of it reaches the app: 408 when the headers are not complete in time, 431 when they are too many or
too large. uvicorn's own plain-text 400 for unparseable requests (smuggling attempts: two
Content-Lengths, CL with TE, bare CR) is answered in the OpenAI error shape too.
"""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any, cast

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.http.cycle import CYCLE_KEY, usable
from gateway.http.errors import error_body

HEADER_TIMEOUT = 10.0  # seconds from the first byte of a request to the end of its headers
MAX_HEADERS = 100
MAX_HEADER_BYTES = 32 * 1024

# What this subclass uses of uvicorn's HttpToolsProtocol besides its public callbacks: internals, checked by
# tests/integration/test_uvicorn_internals.py (pyproject.toml bounds uvicorn below its next minor).
PROTOCOL_ATTRS = (
    "parser",
    "cycle",
    "scope",
    "transport",
    "loop",
    "logger",
    "_unset_keepalive_if_required",
    "_should_upgrade",
    "handle_websocket_upgrade",
    "_unsupported_upgrade_warning",
    "send_400_response",
)
_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class _HeadersTooLarge(Exception):
    pass


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    header_timeout = HEADER_TIMEOUT
    max_headers = MAX_HEADERS
    max_header_bytes = MAX_HEADER_BYTES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_count = 0
        self._header_bytes = 0
        self._headers_too_large = False

    # uvicorn's own connection_made narrows asyncio's BaseTransport to Transport (with the same ignore).
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()  # a connection that never sends a byte is a slowloris too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError:
            # httptools re-raises a callback's exception as its own error type; the flag says which it was.
            if self._headers_too_large:
                self._reject(431, "request_header_fields_too_large", "The request headers are too many or too large.")
            else:
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_count = 0
        self._header_bytes = 0
        self._arm_header_timer()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._header_bytes += len(name) + len(value)
        if self._header_count > self.max_headers or self._header_bytes > self.max_header_bytes:
            self._headers_too_large = True
            raise _HeadersTooLarge
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope and usable(cycle):
            # The relay writes a stream's body to this cycle's transport itself (gateway/http/cycle.py); a uvicorn
            # whose cycle looks different gets the ASGI path instead. The scope is a TypedDict to uvicorn; the key
            # is the gateway's own.
            cast(MutableMapping[str, Any], self.scope)[CYCLE_KEY] = cycle

    def send_400_response(self, msg: str) -> None:
        self._reject(400, "invalid_http_request", "The HTTP request is malformed.")

    def _reject(self, status: int, code: str, message: str) -> None:
        self._disarm_header_timer()
        if self.transport.is_closing():
            return
        body = error_body(message, "invalid_request_error", code)
        self.transport.write(
            b"".join(
                [
                    b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status]),
                    b"content-type: application/json\r\n",
                    b"content-length: %d\r\n" % len(body),
                    b"connection: close\r\n\r\n",
                    body,
                ]
            )
        )
        self.transport.close()

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.cycle is None or self.cycle.response_complete:
            # Between requests on a kept-alive connection nothing is owed: uvicorn's keep-alive timer
            # closes it. Mid-headers, the client is too slow.
            self._reject(408, "request_timeout", "The request headers were not received in time.")
