"""One forwarded request: send it to the engine, relay the answer byte for byte, keep the four clocks.

``Relay`` is an ASGI response. Everything upstream happens inside its ``__call__``, under a watcher
of the client's connection: when the client leaves — during prefill, mid-stream or while a
non-stream answer is generated — the upstream request is closed at once, which is what makes the
engine abort the generation and free the GPU.

Status and headers are decided before the first body byte. After it, a failure is reported as one
SSE ``data: {"error": ...}`` event and the stream ends without ``[DONE]``, so a client can always
tell a broken stream from a finished one. Events are forwarded whole: a half line cut by a crashing
engine never reaches the client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from gateway.http.errors import (
    EngineUnavailable,
    GatewayError,
    ShuttingDown,
    UpstreamError,
    UpstreamTimeout,
    reshape_upstream_error,
    sse_error_event,
)
from gateway.http.shutdown import InFlight
from gateway.observability.metrics import Metrics
from gateway.proxy.sse import DONE, EventCutter, Outcome, StreamEnded, count_usage
from gateway.proxy.upstream.client import Clocks, Upstream
from gateway.proxy.upstream.raw import (
    CYCLE_KEY,
    AnswerTooLarge,
    ClientWriter,
    EngineClosed,
    EngineConnection,
    request_bytes,
    split_url,
)

log = logging.getLogger("gateway.proxy.relay")

_MAX_BODY_BYTES = 256 * 1024 * 1024  # a non-stream answer (embeddings of a big batch can be large)
_STREAM_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
_Headers = list[tuple[bytes, bytes]]
STATUS_KEY = "gateway.status"  # scope key: the status to log when the client left before an answer
# scope key, set by the middleware: the ``send`` it was given. A stream's body events go straight to it, past
# the wrappers in between (the middleware's own, Starlette's exception handling), which only act on the
# response start: fewer awaits per event, the hot path of a stream.
BODY_SEND_KEY = "gateway.body_send"


@dataclass
class Target:
    """Where one request goes and what the relay must know about the engine answering it."""

    url: str
    model: str  # the client-facing served name (metrics label)
    headers: dict[str, str]
    replica: Any  # engines.Supervisor or a worker's RemoteReplica: `inflight`, `report_failure()`, `report_success()`
    # How a complete stream ends: "done" with `data: [DONE]` (vLLM, LMDeploy); "finish" after the event that
    # carries a finish_reason (transformers serve, which sends no [DONE]: the gateway adds it); "eof" at
    # any clean end of the body (LightLLM's /generate_stream).
    stream_end: str = "done"
    model_rewrite: tuple[tuple[bytes, bytes], ...] = ()  # engine's `"model":` value → the client's
    retry_after: float = 5.0
    # Reshapes a non-stream 2xx JSON object answer (the simple endpoints); ``model_rewrite`` is then skipped,
    # the transform writes the names it wants. Raising KeyError/IndexError/TypeError/ValueError means the
    # answer had an unexpected shape: 502. Streams are never transformed.
    transform: Callable[[dict[str, Any]], Any] | None = None
    # Called once when the relay is over, whatever happened: the pool's lease release (queue, idle clock).
    on_done: Callable[[], None] | None = None
    # Another replica's Target, or None: asked once, when this one refused the connection (nothing was sent).
    failover: Callable[[], Awaitable[Target | None]] | None = None
    # Reached over raw keep-alive connections (gateway.proxy.upstream.raw): any engine on plain HTTP. TLS (a remote
    # https:// server) goes through aiohttp.
    raw: bool = False


class _ConnectFailed(Exception):
    """The engine's port refused (or never answered) the connection: nothing was sent."""


class Relay(Response):
    """A Starlette ``Response`` only so FastAPI hands it through; it builds its own status and headers."""

    background = None

    def __init__(
        self,
        upstream: Upstream,
        target: Target,
        body: bytes,
        *,
        stream: bool,
        clocks: Clocks,
        request_id: str,
        metrics: Metrics,
        in_flight: InFlight,
    ) -> None:
        self.session = upstream.session
        self.connections = upstream.connections
        self.target = target
        self.body = body
        self.stream = stream
        self.clocks = clocks
        self.request_id = request_id
        self.metrics = metrics
        self.in_flight = in_flight
        self._task: asyncio.Task[Any] | None = None
        self._shutdown = False
        self._disconnected = False
        self._started = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        t0 = scope.get("gateway.t0", loop.time())
        task = self._task = asyncio.current_task()
        assert task is not None
        self.in_flight.add(self)
        watcher = loop.create_task(self._watch(receive, task))
        self.target.replica.inflight += 1
        in_flight = self.metrics.in_flight_of(self.target.model)
        in_flight.inc()
        outcome = Outcome()
        response: aiohttp.ClientResponse | None = None
        total_deadline = t0 + self.clocks.total
        # Raw engine connections (upstream/raw.py) for every plain-HTTP engine; a stream needs uvicorn's cycle too.
        cycle = scope.get(CYCLE_KEY)
        raw = self.target.raw and self.connections is not None and (cycle is not None or not self.stream)
        try:
            async with asyncio.timeout_at(min(loop.time() + self.clocks.first_byte, total_deadline)) as clock:
                try:
                    if raw:
                        await self._relay_raw(cycle, send, clock, total_deadline, t0, outcome)
                        return
                    response = await self._connect()
                    if self.stream and response.status == 200 and response.content_type == "text/event-stream":
                        await self._relay_stream(
                            response, send, scope.get(BODY_SEND_KEY, send), clock, total_deadline, t0, outcome
                        )
                    else:
                        clock.reschedule(total_deadline)
                        await self._relay_whole(response, send, outcome)
                except (aiohttp.ClientConnectorError, _ConnectFailed):
                    outcome.error_kind = "connect"
                    self.target.replica.report_failure()
                    raise EngineUnavailable(
                        "The engine for this model is not accepting connections; it may be restarting.",
                        retry_after=self.target.retry_after,
                    ) from None
                except (
                    aiohttp.ClientPayloadError,
                    aiohttp.ServerDisconnectedError,
                    aiohttp.ClientOSError,
                    aiohttp.ClientResponseError,
                    EngineClosed,
                ):
                    outcome.error_kind = "disconnected"
                    self.target.replica.report_failure()
                    raise UpstreamError(
                        "The engine closed the connection before the answer was complete.", code="upstream_disconnected"
                    ) from None
        except TimeoutError:
            outcome.error_kind = outcome.error_kind or ("timeout_stream" if self._started else "timeout")
            self.target.replica.report_failure()
            await self._fail(
                send, UpstreamTimeout(self._timeout_message(loop.time() >= total_deadline), code="upstream_timeout")
            )
        except GatewayError as exc:
            await self._fail(send, exc)
        except asyncio.CancelledError:
            if self._shutdown:
                task.uncancel()
                outcome.error_kind = "shutdown"
                await self._fail(send, ShuttingDown("The gateway is shutting down; retry.", retry_after=1))
            elif self._disconnected:
                task.uncancel()
                scope[STATUS_KEY] = 499
                outcome.error_kind = "client_disconnected"
            else:
                raise
        finally:
            watcher.cancel()
            if response is not None:
                response.close()  # a no-op after a clean read; otherwise it drops the socket, aborting the engine
            self._let_go(self.target)
            in_flight.dec()
            self._record(outcome)
            self.in_flight.discard(self)

    async def _connect(self) -> aiohttp.ClientResponse:
        """POST the request through aiohttp; a refused connection fails over once (``_failover``)."""
        try:
            return await self.session.post(self.target.url, data=self.body, headers=self.target.headers)
        except aiohttp.ClientConnectorError:
            if not await self._failover():
                raise
        return await self.session.post(self.target.url, data=self.body, headers=self.target.headers)

    async def _open(self) -> tuple[EngineConnection, str, int, str]:
        """A raw connection to the engine, and where to (host, port, path): refused, it fails over once."""
        assert self.connections is not None
        while True:
            host, port, path = split_url(self.target.url)
            try:
                async with asyncio.timeout(self.clocks.connect):
                    return await self.connections.get(host, port), host, port, path
            except (OSError, TimeoutError):
                if not await self._failover():
                    raise _ConnectFailed from None

    async def _failover(self) -> bool:
        """Move this request to another ready replica of its model (True) when the chosen one refused the
        connection: nothing reached it, so nothing runs twice. At most once: the new target has none."""
        target = self.target
        other = await target.failover() if target.failover is not None else None
        if other is None:
            return False
        target.replica.report_failure()
        self._let_go(target)
        other.replica.inflight += 1
        self.target = other
        log.info(
            "replica %s of %s refused the connection; sent to replica %s",
            target.replica.replica,
            target.model,
            other.replica.replica,
        )
        return True

    @staticmethod
    def _let_go(target: Target) -> None:
        target.replica.inflight -= 1
        if target.on_done is not None:
            target.on_done()

    def _timeout_message(self, total_spent: bool) -> str:
        """Which clock ran out, so an operator knows which limit to look at."""
        if total_spent:
            return f"The engine did not finish the answer within {self.clocks.total:g} s."
        if self._started:
            return f"The engine's stream was silent for more than {self.clocks.idle:g} s."
        return f"The engine sent nothing for {self.clocks.first_byte:g} s after the request."

    def abort_for_shutdown(self) -> None:
        """End this request now with a clean error (the drain deadline passed)."""
        if self._task is not None and not self._task.done():
            self._shutdown = True
            self._task.cancel()

    async def _watch(self, receive: Receive, task: asyncio.Task[Any]) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self._disconnected = True
                task.cancel()
                return

    def _headers(self, content_type: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> _Headers:
        headers = [(b"content-type", content_type), (b"x-request-id", self.request_id.encode())]
        if extra:
            headers += extra
        return headers

    async def _relay_whole(self, response: aiohttp.ClientResponse, send: Send, outcome: Outcome) -> None:
        if response.content_length is not None and response.content_length > _MAX_BODY_BYTES:
            outcome.error_kind = "too_large"
            raise UpstreamError("The engine's answer was too large.", code="bad_upstream_response")
        parts: list[bytes] = []
        size = 0
        async for part in response.content.iter_any():
            size += len(part)
            if size > _MAX_BODY_BYTES:
                outcome.error_kind = "too_large"
                raise UpstreamError("The engine's answer was too large.", code="bad_upstream_response")
            parts.append(part)
        await self._answer_whole(response.status, response.headers.get("retry-after"), b"".join(parts), send, outcome)

    async def _answer_whole(
        self, status: int, retry_after: str | None, body: bytes, send: Send, outcome: Outcome
    ) -> None:
        """A whole answer from the engine, as the client gets it: errors reshaped, model names rewritten."""
        extra: list[tuple[bytes, bytes]] = []
        if status >= 400:
            body = reshape_upstream_error(status, body)
            if retry_after is not None and retry_after.isdigit():
                extra.append((b"retry-after", retry_after.encode()))
            elif status in (429, 503):
                extra.append((b"retry-after", str(round(self.target.retry_after)).encode()))
            if status >= 500:
                outcome.error_kind = f"status_{status}"
                self.target.replica.report_failure()
            content_type = b"application/json"
        else:
            try:
                data = orjson.loads(body)
            except orjson.JSONDecodeError:
                outcome.error_kind = "bad_response"
                self.target.replica.report_failure()
                raise UpstreamError(
                    "The engine sent an answer that is not valid JSON.", code="bad_upstream_response"
                ) from None
            self.target.replica.report_success()
            if isinstance(data, dict):
                count_usage(data.get("usage"), outcome)
            if self.target.transform is not None and status < 300:
                body = _transformed(self.target.transform, data, outcome)
            else:
                for old, new in self.target.model_rewrite:
                    body = body.replace(old, new)
            content_type = b"application/json"
        await send({"type": "http.response.start", "status": status, "headers": self._headers(content_type, extra)})
        self._started = True
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _start_stream(self, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": self._headers(b"text/event-stream; charset=utf-8", _STREAM_HEADERS),
            }
        )
        self._started = True

    async def _relay_stream(
        self,
        response: aiohttp.ClientResponse,
        send: Send,
        body_send: Send,
        clock: asyncio.Timeout,
        total_deadline: float,
        t0: float,
        outcome: Outcome,
    ) -> None:
        """The stream through aiohttp: one read and one ``send`` per piece (the path when splicing is off)."""
        await self._start_stream(send)
        now = asyncio.get_running_loop().time
        read = response.content.readany
        idle = self.clocks.idle
        # The idle clock moves only once less than ``idle`` is left, and then to ``idle + slack`` from now: a
        # stalled stream still ends ``idle`` to ``idle + slack`` after its last event (never sooner), and a busy
        # one changes its timer every ``slack`` seconds rather than at every event (a timer cancel + create).
        slack = idle / 8
        deadline = min(now() + idle + slack, total_deadline)
        clock.reschedule(deadline)
        cutter = EventCutter(self.target.model_rewrite, outcome, t0)
        while True:
            if deadline < total_deadline and deadline - now() < idle:
                deadline = min(now() + idle + slack, total_deadline)
                clock.reschedule(deadline)
            chunk = await read()
            if not chunk:
                break
            try:
                events = cutter.feed(chunk, now())
            except StreamEnded as end:
                await self._end_with_error(send, end)
                return
            if events:
                await body_send({"type": "http.response.body", "body": events, "more_body": True})
        await self._end_stream(send, cutter)

    async def _relay_raw(
        self,
        cycle: Any,
        send: Send,
        clock: asyncio.Timeout,
        total_deadline: float,
        t0: float,
        outcome: Outcome,
    ) -> None:
        """The request over a raw keep-alive connection (``gateway.proxy.upstream.raw``), cheaper than aiohttp's client:
        a whole answer is read and answered in one; a stream's body is written to the client from the
        connection's callbacks while this coroutine keeps the clocks."""
        conn, host, port, path = await self._open()
        target = self.target
        request = request_bytes("POST", host, port, path, target.headers, self.body)
        conn.send(request)
        kept = False
        try:
            try:
                await conn.headers_done
            except EngineClosed:
                if not conn.lost_when_reused:
                    raise
                assert self.connections is not None
                try:
                    conn = await self.connections.connect(host, port)
                except OSError:
                    raise _ConnectFailed from None
                conn.send(request)
                await conn.headers_done
            if (
                not self.stream
                or conn.status != 200
                or not conn.headers.get(b"content-type", b"").startswith(b"text/event-stream")
            ):
                clock.reschedule(total_deadline)
                try:
                    body = await conn.read_body(_MAX_BODY_BYTES)
                except AnswerTooLarge:
                    outcome.error_kind = "too_large"
                    raise UpstreamError("The engine's answer was too large.", code="bad_upstream_response") from None
                retry_after = conn.headers.get(b"retry-after")
                await self._answer_whole(
                    conn.status, retry_after.decode("latin-1") if retry_after else None, body, send, outcome
                )
                kept = True
                return
            await self._start_stream(send)
            clock.reschedule(total_deadline)
            loop = asyncio.get_running_loop()
            now = loop.time
            cutter = EventCutter(target.model_rewrite, outcome, t0)
            heard = [now()]  # the last byte from the engine: any byte, not a whole event, holds the idle clock
            writer = ClientWriter(cycle, conn)

            def sink(chunk: bytes) -> None:
                t = heard[0] = now()
                if writer.gone:
                    # The watcher is cancelling this request (and then drops the connection): read no more.
                    conn.pause_reading()
                    return
                try:
                    events = cutter.feed(chunk, t)
                except (StreamEnded, UpstreamError) as end:
                    conn.finish(error=end)  # raised where the relay awaits the end; nothing more is read
                    return
                if events:
                    writer.write(events)

            conn.stream_to(sink)
            idle = self.clocks.idle
            try:
                # Wakes once per idle period, not per event: the events never pass through here.
                while not conn.done.done():
                    wait = min(heard[0] + idle, total_deadline) - now()
                    if wait <= 0:
                        raise TimeoutError
                    await asyncio.wait((conn.done,), timeout=wait)
                await conn.done
            except StreamEnded as end:
                await self._end_with_error(send, end)
                return
            finally:
                writer.close()
            await self._end_stream(send, cutter)
            kept = True
        finally:
            if kept and self.connections is not None:
                self.connections.put(host, port, conn)
            else:
                conn.abort()

    async def _end_stream(self, send: Send, cutter: EventCutter) -> None:
        """After the engine's last byte: a complete answer ends as the client expects, a cut one with an error."""
        outcome = cutter.outcome
        if not cutter.complete(self.target.stream_end):
            outcome.error_kind = "disconnected"
            self.target.replica.report_failure()
            raise UpstreamError("The engine ended the stream before it was complete.", code="upstream_disconnected")
        self.target.replica.report_success()
        if self.target.stream_end == "finish":
            await send({"type": "http.response.body", "body": DONE, "more_body": True})
        if outcome.events > 1:
            gap = (cutter.last_at - cutter.first_at) / (outcome.events - 1)
            self.metrics.chunk_gap_of(self.target.model).observe(gap)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _end_with_error(self, send: Send, end: StreamEnded) -> None:
        """The engine's in-band error event ends the stream here, in our shape, without its ``[DONE]``."""
        if end.before:
            await send({"type": "http.response.body", "body": end.before, "more_body": True})
        await send({"type": "http.response.body", "body": end.final, "more_body": False})

    async def _fail(self, send: Send, exc: GatewayError) -> None:
        if self._disconnected:
            return
        if not self._started:
            headers = self._headers(b"application/json", [(k.encode(), v.encode()) for k, v in exc.headers().items()])
            await send({"type": "http.response.start", "status": exc.status, "headers": headers})
            await send({"type": "http.response.body", "body": exc.body(), "more_body": False})
        else:
            await send(
                {
                    "type": "http.response.body",
                    "body": sse_error_event(exc.message, exc.type, exc.code),
                    "more_body": False,
                }
            )
        self._started = True

    def _record(self, outcome: Outcome) -> None:
        m, model = self.metrics, self.target.model
        if outcome.ttft is not None:
            m.ttft_of(model).observe(outcome.ttft)
        if outcome.prompt_tokens:
            m.tokens_of(model, "prompt").inc(outcome.prompt_tokens)
        if outcome.completion_tokens:
            m.tokens_of(model, "completion").inc(outcome.completion_tokens)
        if outcome.error_kind is not None:
            m.upstream_errors_of(model, outcome.error_kind).inc()
            if outcome.error_kind == "client_disconnected":
                # Not a failure (a stop button, a client timeout), but an operator looking for a request by its
                # id must find where it went: the engine was told to stop at once.
                log.info("client left before the answer to %s was complete (499); the engine was let go", model)
            else:
                log.warning("request to %s failed: %s", model, outcome.error_kind)


def _transformed(transform: Callable[[dict[str, Any]], Any], data: object, outcome: Outcome) -> bytes:
    try:
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        return orjson.dumps(transform(data))
    except (KeyError, IndexError, TypeError, ValueError):
        # Not the engine's fault as far as health goes (it answered); the client still gets a clear 502.
        outcome.error_kind = "bad_response"
        raise UpstreamError(
            "The engine's answer did not have the expected shape.", code="bad_upstream_response"
        ) from None


async def send_error(send: Send, exc: GatewayError, request_id: str) -> None:
    body = exc.body()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
    ]
    headers += [(k.encode(), v.encode()) for k, v in exc.headers().items()]
    start: Message = {"type": "http.response.start", "status": exc.status, "headers": headers}
    await send(start)
    await send({"type": "http.response.body", "body": body, "more_body": False})
