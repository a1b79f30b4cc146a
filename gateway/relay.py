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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from gateway.drain import InFlight
from gateway.errors import (
    EngineUnavailable,
    GatewayError,
    ShuttingDown,
    UpstreamError,
    UpstreamTimeout,
    reshape_upstream_error,
    sse_error_event,
)
from gateway.metrics import Metrics
from gateway.upstream import Clocks

log = logging.getLogger("gateway.relay")

_MAX_EVENT_BYTES = 4 * 1024 * 1024  # one SSE event larger than this is not an engine talking
_MAX_BODY_BYTES = 256 * 1024 * 1024  # a non-stream answer (embeddings of a big batch can be large)
_DONE = b"data: [DONE]\n\n"
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
    replica: Any  # engines.Supervisor: `inflight`, `report_failure()`, `report_success()`
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
    failover: Callable[[], Target | None] | None = None


@dataclass
class _Outcome:
    ttft: float | None = None
    events: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error_kind: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


class Relay(Response):
    """A Starlette ``Response`` only so FastAPI hands it through; it builds its own status and headers."""

    background = None

    def __init__(
        self,
        session: aiohttp.ClientSession,
        target: Target,
        body: bytes,
        *,
        stream: bool,
        clocks: Clocks,
        request_id: str,
        metrics: Metrics,
        in_flight: InFlight,
    ) -> None:
        self.session = session
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
        in_flight = self.metrics.in_flight.labels(self.target.model)
        in_flight.inc()
        outcome = _Outcome()
        response: aiohttp.ClientResponse | None = None
        total_deadline = t0 + self.clocks.total
        try:
            async with asyncio.timeout_at(min(loop.time() + self.clocks.first_byte, total_deadline)) as clock:
                try:
                    response = await self._connect()
                    if self.stream and response.status == 200 and response.content_type == "text/event-stream":
                        await self._relay_stream(response, send, scope.get(BODY_SEND_KEY, send), clock,
                                                 total_deadline, t0, outcome)
                    else:
                        clock.reschedule(total_deadline)
                        await self._relay_whole(response, send, outcome)
                except aiohttp.ClientConnectorError:
                    outcome.error_kind = "connect"
                    self.target.replica.report_failure()
                    raise EngineUnavailable(
                        "The engine for this model is not accepting connections; it may be restarting.",
                        retry_after=self.target.retry_after,
                    ) from None
                except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
                        aiohttp.ClientResponseError):
                    outcome.error_kind = "disconnected"
                    self.target.replica.report_failure()
                    raise UpstreamError("The engine closed the connection before the answer was complete.",
                                        code="upstream_disconnected") from None
        except TimeoutError:
            outcome.error_kind = outcome.error_kind or ("timeout_stream" if self._started else "timeout")
            self.target.replica.report_failure()
            await self._fail(send, UpstreamTimeout(self._timeout_message(loop.time() >= total_deadline),
                                                   code="upstream_timeout"))
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
        """POST the request; when the replica refuses the connection, once more to another ready one."""
        target = self.target
        try:
            return await self.session.post(target.url, data=self.body, headers=target.headers)
        except aiohttp.ClientConnectorError:
            other = target.failover() if target.failover is not None else None
            if other is None:
                raise
        target.replica.report_failure()
        self._let_go(target)
        other.replica.inflight += 1
        self.target = other
        log.info("replica %s of %s refused the connection; sent to replica %s", target.replica.replica,
                 target.model, other.replica.replica)
        return await self.session.post(other.url, data=self.body, headers=other.headers)

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

    async def _relay_whole(self, response: aiohttp.ClientResponse, send: Send, outcome: _Outcome) -> None:
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
        body = b"".join(parts)
        status = response.status
        extra: list[tuple[bytes, bytes]] = []
        if status >= 400:
            body = reshape_upstream_error(status, body)
            retry_after = response.headers.get("retry-after")
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
                raise UpstreamError("The engine sent an answer that is not valid JSON.",
                                    code="bad_upstream_response") from None
            self.target.replica.report_success()
            if isinstance(data, dict):
                _count_usage(data.get("usage"), outcome)
            if self.target.transform is not None and status < 300:
                body = _transformed(self.target.transform, data, outcome)
            else:
                for old, new in self.target.model_rewrite:
                    body = body.replace(old, new)
            content_type = b"application/json"
        await send({"type": "http.response.start", "status": status, "headers": self._headers(content_type, extra)})
        self._started = True
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _relay_stream(
        self,
        response: aiohttp.ClientResponse,
        send: Send,
        body_send: Send,
        clock: asyncio.Timeout,
        total_deadline: float,
        t0: float,
        outcome: _Outcome,
    ) -> None:
        await send({
            "type": "http.response.start",
            "status": 200,
            "headers": self._headers(b"text/event-stream; charset=utf-8",
                                     [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]),
        })
        self._started = True
        loop = asyncio.get_running_loop()
        now = loop.time
        read = response.content.readany
        idle = self.clocks.idle
        # The idle clock moves only once less than ``idle`` is left, and then to ``idle + slack`` from now: a
        # stalled stream still ends ``idle`` to ``idle + slack`` after its last event (never sooner), and a busy
        # one changes its timer every ``slack`` seconds rather than at every event (a timer cancel + create).
        slack = idle / 8
        deadline = min(now() + idle + slack, total_deadline)
        clock.reschedule(deadline)
        rewrite = self.target.model_rewrite
        pending = b""
        last = b""
        first_at = 0.0
        while True:
            if deadline < total_deadline and deadline - now() < idle:
                deadline = min(now() + idle + slack, total_deadline)
                clock.reschedule(deadline)
            chunk = await read()
            if not chunk:
                break
            if pending:
                chunk = pending + chunk
                pending = b""
            cut = chunk.rfind(b"\n\n")
            if cut < 0:
                if len(chunk) > _MAX_EVENT_BYTES:
                    raise UpstreamError("The engine sent a malformed stream.", code="bad_upstream_response")
                pending = chunk
                continue
            cut += 2
            if cut != len(chunk):
                pending = chunk[cut:]
                chunk = chunk[:cut]
            if b'"error"' in chunk and await self._forward_until_error(chunk, send, outcome):
                return
            if b'"usage"' in chunk:
                _peek_usage(chunk, outcome)
            for old, new in rewrite:
                chunk = chunk.replace(old, new)
            if outcome.events == 0:
                first_at = now()
                outcome.ttft = first_at - t0
            outcome.events += 1
            await body_send({"type": "http.response.body", "body": chunk, "more_body": True})
            last = chunk
        if not _complete(self.target.stream_end, last):
            outcome.error_kind = "disconnected"
            self.target.replica.report_failure()
            raise UpstreamError("The engine ended the stream before it was complete.", code="upstream_disconnected")
        self.target.replica.report_success()
        if self.target.stream_end == "finish":
            await send({"type": "http.response.body", "body": _DONE, "more_body": True})
        if outcome.events > 1:
            self.metrics.chunk_gap.labels(self.target.model).observe((now() - first_at) / (outcome.events - 1))
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _forward_until_error(self, chunk: bytes, send: Send, outcome: _Outcome) -> bool:
        """An engine's in-band error event ends the stream here, in our shape, without its ``[DONE]``."""
        events = chunk.split(b"\n\n")
        for i, event in enumerate(events):
            if not event.startswith(b"data:") or b'"error"' not in event:
                continue
            try:
                data = orjson.loads(event[5:])
            except orjson.JSONDecodeError:
                continue
            if not isinstance(data, dict):
                continue
            inner = data.get("error")
            if isinstance(inner, dict):
                error = inner
            elif isinstance(inner, str):  # transformers serve: {"error": "<text>"}
                error = {"message": inner}
            elif data.get("object") == "error":
                error = data
            else:
                continue
            before = b"\n\n".join(events[:i])
            if before:
                await send({"type": "http.response.body", "body": before + b"\n\n", "more_body": True})
            message = error.get("message") if isinstance(error.get("message"), str) else "The engine failed."
            type_ = error.get("type") if isinstance(error.get("type"), str) else "upstream_error"
            code = error.get("code")
            await send({"type": "http.response.body", "more_body": False,
                        "body": sse_error_event(message, type_, code if isinstance(code, str) else "upstream_error")})
            outcome.error_kind = "stream_error"
            return True
        return False

    async def _fail(self, send: Send, exc: GatewayError) -> None:
        if self._disconnected:
            return
        if not self._started:
            headers = self._headers(b"application/json", [(k.encode(), v.encode()) for k, v in exc.headers().items()])
            await send({"type": "http.response.start", "status": exc.status, "headers": headers})
            await send({"type": "http.response.body", "body": exc.body(), "more_body": False})
        else:
            await send({"type": "http.response.body", "body": sse_error_event(exc.message, exc.type, exc.code),
                        "more_body": False})
        self._started = True

    def _record(self, outcome: _Outcome) -> None:
        m, model = self.metrics, self.target.model
        if outcome.ttft is not None:
            m.ttft.labels(model).observe(outcome.ttft)
        if outcome.prompt_tokens:
            m.tokens.labels(model, "prompt").inc(outcome.prompt_tokens)
        if outcome.completion_tokens:
            m.tokens.labels(model, "completion").inc(outcome.completion_tokens)
        if outcome.error_kind is not None:
            m.upstream_errors.labels(model, outcome.error_kind).inc()
            if outcome.error_kind != "client_disconnected":
                log.warning("request to %s failed: %s", model, outcome.error_kind)


def _complete(stream_end: str, last: bytes) -> bool:
    if stream_end == "done":
        return last.endswith(_DONE)
    if stream_end == "finish":
        return b'"finish_reason":"' in last or b'"finish_reason": "' in last
    return True


def _transformed(transform: Callable[[dict[str, Any]], Any], data: object, outcome: _Outcome) -> bytes:
    try:
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        return orjson.dumps(transform(data))
    except (KeyError, IndexError, TypeError, ValueError):
        # Not the engine's fault as far as health goes (it answered); the client still gets a clear 502.
        outcome.error_kind = "bad_response"
        raise UpstreamError("The engine's answer did not have the expected shape.",
                            code="bad_upstream_response") from None


def _count_usage(usage: object, outcome: _Outcome) -> None:
    if isinstance(usage, dict):
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(prompt, int):
            outcome.prompt_tokens = prompt
        if isinstance(completion, int):
            outcome.completion_tokens = completion


def _peek_usage(chunk: bytes, outcome: _Outcome) -> None:
    """Usage rides on the last events only; parse just the events that carry a non-null one."""
    for event in chunk.split(b"\n\n"):
        if b'"usage":{' in event or b'"usage": {' in event:
            try:
                data = orjson.loads(event[5:])
            except orjson.JSONDecodeError:
                continue
            if isinstance(data, dict):
                _count_usage(data.get("usage"), outcome)


async def send_error(send: Send, exc: GatewayError, request_id: str) -> None:
    body = exc.body()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"x-request-id", request_id.encode())]
    headers += [(k.encode(), v.encode()) for k, v in exc.headers().items()]
    start: Message = {"type": "http.response.start", "status": exc.status, "headers": headers}
    await send(start)
    await send({"type": "http.response.body", "body": body, "more_body": False})
