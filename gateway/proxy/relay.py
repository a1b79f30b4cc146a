"""One forwarded request: send it to the engine, relay the answer byte for byte, keep the four clocks.

``Relay`` is an ASGI response, written once against the ``Exchange`` interface
(gateway/proxy/upstream/exchange.py) whatever carries the request (raw keep-alive connection or aiohttp).
Everything upstream happens inside its ``__call__``, under a watcher of the client's connection: when the
client leaves — during prefill, mid-stream or while a non-stream answer is generated — the exchange is
closed at once, which is what makes the engine abort the generation and free the GPU.

The four clocks: connect (the exchange's), first byte (until the status and headers), idle (a stream's
silence, ``IdleClock``), total. A connection the engine refused fails over once to another replica
(nothing was sent). A whole answer is read up to one cap (``Exchange.read_all``).

Status and headers are decided before the first body byte. After it, a failure is reported as one
SSE ``data: {"error": ...}`` event and the stream ends without ``[DONE]`` (``_end_with_error``), so a client
can always tell a broken stream from a finished one. A translated request (``Target.translation``: a client
dialect the engine lacks, gateway/dialects) gets the same, in its dialect: its events, its closing events,
its error event and error bodies. Events are forwarded whole: a half line cut by a
crashing engine never reaches the client.

The relay holds the request's lease (engines/scheduling/contract.py): it reports what the engine's answer
said about the replica (``lease.report``) and releases the lease when it is over, whatever happened.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from engines.scheduling.contract import ReplicaLease
from gateway.http.cycle import CYCLE_KEY, CycleWriter, client_gone
from gateway.http.errors import (
    OPENAI,
    EngineUnavailable,
    ErrorDialect,
    GatewayError,
    ShuttingDown,
    UpstreamError,
    UpstreamTimeout,
    reshape_upstream_error,
)
from gateway.http.scope import T0_KEY
from gateway.http.shutdown import InFlight
from gateway.observability.metrics import Metrics
from gateway.proxy.sse import (
    ABORTED,
    DONE,
    EventCutter,
    Outcome,
    StreamEnded,
    StreamTranslation,
    TranslatingCutter,
    aborted,
    count_usage,
)
from gateway.proxy.upstream.client import Clocks, Upstream
from gateway.proxy.upstream.exchange import AnswerTooLarge, ConnectFailed, EngineClosed, Exchange

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

    lease: ReplicaLease  # the request's claim on a replica; the relay reports on it and releases it
    path: str  # appended to the replica's base_url
    model: str  # the client-facing served name (metrics label)
    headers: dict[str, str]
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
    # A client dialect carried by a chat engine: its stream events, closing events, error event and error
    # bodies replace the chat ones (the non-stream answer is its ``transform``). None: the engine's own answer.
    translation: StreamTranslation | None = None
    # The client's error dialect (the endpoint row's): error bodies and a broken stream's last event.
    errors: ErrorDialect = OPENAI
    # Another replica's Target, or None: asked once, when this one refused the connection (nothing was sent).
    failover: Callable[[], Awaitable[Target | None]] | None = None

    @property
    def url(self) -> str:
        return self.lease.replica.base_url + self.path


class IdleClock:
    """A stream's idle clock: ``heard`` is when the engine last sent a byte (any byte, not a whole event).

    The sink stamps ``heard``; ``wait`` wakes once per idle period, not per event, and raises TimeoutError
    once the engine was silent for ``idle`` s (never sooner) or the total deadline passed.
    """

    __slots__ = ("deadline", "heard", "idle", "now")

    def __init__(self, idle: float, deadline: float, now: Callable[[], float]) -> None:
        self.idle, self.deadline, self.now = idle, deadline, now
        self.heard = now()

    async def wait(self, done: asyncio.Future[None]) -> None:
        """Until ``done`` (its exception raised here), or the clock runs out."""
        now = self.now
        while not done.done():
            wait = min(self.heard + self.idle, self.deadline) - now()
            if wait <= 0:
                raise TimeoutError
            await asyncio.wait((done,), timeout=wait)
        done.result()


class _Writer(Protocol):
    """Where a stream's events go: the client's transport in callbacks (``CycleWriter``), or the ASGI send."""

    @property
    def gone(self) -> bool: ...

    def write(self, data: bytes) -> Awaitable[None] | None: ...

    def close(self) -> None: ...


class _SendWriter:
    """A stream's events through the ASGI ``send``: one awaited send per piece, waited for by the exchange."""

    def __init__(self, send: Send, cycle: RequestResponseCycle | None) -> None:
        self._send = send
        self._cycle = cycle

    @property
    def gone(self) -> bool:
        # Without uvicorn's cycle (another server) the watcher alone cancels the relay when the client leaves.
        return self._cycle is not None and client_gone(self._cycle)

    def write(self, data: bytes) -> Awaitable[None]:
        return self._send({"type": "http.response.body", "body": data, "more_body": True})

    def close(self) -> None:
        pass


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
        self.upstream = upstream
        self.target = target
        self.payload = body
        self.stream = stream
        self.clocks = clocks
        self.request_id = request_id
        self.metrics = metrics
        self.in_flight = in_flight
        self._task: asyncio.Task[Any] | None = None
        self._exchange: Exchange | None = None
        self._shutdown = False
        self._disconnected = False
        self._started = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        t0 = scope.get(T0_KEY, loop.time())
        task = self._task = asyncio.current_task()
        assert task is not None
        self.in_flight.add(self)
        watcher = loop.create_task(self._watch(receive, task))
        in_flight = self.metrics.in_flight_of(self.target.model)
        in_flight.inc()
        outcome = Outcome()
        total_deadline = t0 + self.clocks.total
        # A stream over a raw connection is written to the client in callbacks: it needs uvicorn's cycle.
        cycle = scope.get(CYCLE_KEY)
        reuse = False
        try:
            async with asyncio.timeout_at(min(loop.time() + self.clocks.first_byte, total_deadline)) as clock:
                try:
                    exchange = await self._start(raw=cycle is not None or not self.stream)
                    clock.reschedule(total_deadline)
                    if self.stream and exchange.status == 200 and exchange.event_stream:
                        body_send = scope.get(BODY_SEND_KEY, send)
                        await self._relay_stream(exchange, send, body_send, cycle, total_deadline, t0, outcome)
                    else:
                        await self._relay_whole(exchange, send, outcome)
                    reuse = True
                except ConnectFailed:
                    outcome.error_kind = "connect"
                    self.target.lease.report(False)
                    raise EngineUnavailable(
                        "The engine for this model is not accepting connections; it may be restarting.",
                        retry_after=self.target.retry_after,
                    ) from None
                except EngineClosed:
                    if self._disconnected:
                        raise asyncio.CancelledError from None  # dropped by this relay: the client left
                    outcome.error_kind = "disconnected"
                    self.target.lease.report(False)
                    raise UpstreamError(
                        "The engine closed the connection before the answer was complete.", code="upstream_disconnected"
                    ) from None
        except TimeoutError:
            outcome.error_kind = outcome.error_kind or ("timeout_stream" if self._started else "timeout")
            self.target.lease.report(False)
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
            if self._exchange is not None:
                self._exchange.close(reuse=reuse)  # not reused: the connection is dropped, the engine aborts
            self.target.lease.release()
            in_flight.dec()
            self._record(outcome)
            self.in_flight.discard(self)

    async def _start(self, *, raw: bool) -> Exchange:
        """The request sent and the answer's status and headers in; a refused connection fails over once."""
        while True:
            target = self.target
            exchange = self._exchange = self.upstream.exchange(target.url, raw=raw)
            try:
                await exchange.start(target.url, target.headers, self.payload)
            except ConnectFailed:
                exchange.close(reuse=False)
                self._exchange = None
                if not await self._failover():
                    raise
            else:
                return exchange

    async def _failover(self) -> bool:
        """Move this request to another ready replica of its model (True) when the chosen one refused the
        connection: nothing reached it, so nothing runs twice. At most once: the new target has none."""
        target = self.target
        other = await target.failover() if target.failover is not None else None
        if other is None:
            return False
        target.lease.report(False)
        target.lease.release()
        self.target = other
        log.info(
            "replica %s of %s refused the connection; sent to replica %s",
            target.lease.replica.replica,
            target.model,
            other.lease.replica.replica,
        )
        return True

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
                if not self._disconnected:  # ``_client_gone`` may have seen it first
                    self._disconnected = True
                    task.cancel()
                return

    def _client_gone(self, exchange: Exchange) -> None:
        """The client's connection failed or is closing, seen by a stream's sink: the exchange ends now, its
        engine connection dropped (the engine aborts), and the relay ends as for a client that left (499).
        Not left to the watcher: it hears of it only after the burst of events in hand was written to the
        dead socket, and after the engine finished when that burst held the rest of the answer."""
        if self._disconnected:
            return
        self._disconnected = True
        exchange.finish()
        if self._task is not None:
            self._task.cancel()

    def _response_headers(self, content_type: bytes, extra: _Headers | None = None) -> _Headers:
        headers = [(b"content-type", content_type), (b"x-request-id", self.request_id.encode())]
        if extra:
            headers += extra
        return headers

    async def _relay_whole(self, exchange: Exchange, send: Send, outcome: Outcome) -> None:
        try:
            body = await exchange.read_all(_MAX_BODY_BYTES)
        except AnswerTooLarge:
            outcome.error_kind = "too_large"
            raise UpstreamError("The engine's answer was too large.", code="bad_upstream_response") from None
        await self._answer_whole(exchange.status, exchange.header("retry-after"), body, send, outcome)

    async def _answer_whole(
        self, status: int, retry_after: str | None, body: bytes, send: Send, outcome: Outcome
    ) -> None:
        """A whole answer from the engine, as the client gets it: errors reshaped, model names rewritten."""
        extra: _Headers = []
        lease = self.target.lease
        if status >= 400:
            body = self.target.errors.reshape(status, reshape_upstream_error(status, body))
            if self.target.translation is not None:
                body = self.target.translation.error_body(status, body)
            if retry_after is not None and retry_after.isdigit():
                extra.append((b"retry-after", retry_after.encode()))
            elif status in (429, 503):
                extra.append((b"retry-after", str(round(self.target.retry_after)).encode()))
            if status >= 500:
                outcome.error_kind = f"status_{status}"
                lease.report(False)
        else:
            try:
                data = orjson.loads(body)
            except orjson.JSONDecodeError:
                outcome.error_kind = "bad_response"
                lease.report(False)
                raise UpstreamError(
                    "The engine sent an answer that is not valid JSON.", code="bad_upstream_response"
                ) from None
            if b'"abort"' in body and aborted(data):
                # Stopped mid-answer (an admin stop, a swap, the drain's end): 503 and Retry-After, like an engine
                # that is not accepting connections; not 502, since the engine answered as it should when stopped.
                outcome.error_kind = "aborted"
                raise EngineUnavailable(ABORTED, retry_after=self.target.retry_after)
            lease.report(True)
            if isinstance(data, dict):
                count_usage(data.get("usage"), outcome)
            if self.target.transform is not None and status < 300:
                body = _transformed(self.target.transform, data, outcome)
            else:
                for old, new in self.target.model_rewrite:
                    body = body.replace(old, new)
        headers = self._response_headers(b"application/json", extra)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        self._started = True
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _relay_stream(
        self,
        exchange: Exchange,
        send: Send,
        body_send: Send,
        cycle: RequestResponseCycle | None,
        total_deadline: float,
        t0: float,
        outcome: Outcome,
    ) -> None:
        """The stream: each chunk the engine sends is cut into whole events by the sink and written on at once.

        Over a raw connection the sink runs in the connection's callbacks and writes to the client's transport,
        so the events never pass through a coroutine; through aiohttp, the exchange's reading task awaits each
        write. Either way this coroutine only keeps the idle clock until the exchange is done.
        """
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": self._response_headers(b"text/event-stream; charset=utf-8", _STREAM_HEADERS),
            }
        )
        self._started = True
        writer: _Writer
        if exchange.in_callbacks:
            # After the response start: uvicorn decided there whether the body is chunked.
            assert cycle is not None  # a stream goes raw only with the cycle (``raw=`` in __call__)
            writer = CycleWriter(cycle, exchange)
        else:
            writer = _SendWriter(body_send, cycle)
        now = asyncio.get_running_loop().time
        translation = self.target.translation
        # Chosen once per stream: the untranslated cutter does no extra work per event.
        cutter = (
            EventCutter(self.target.model_rewrite, outcome, t0)
            if translation is None
            else TranslatingCutter(translation, outcome, t0)
        )
        feed, write = cutter.feed, writer.write
        clock = IdleClock(self.clocks.idle, total_deadline, now)

        def sink(chunk: bytes) -> Awaitable[None] | None:
            t = clock.heard = now()
            if writer.gone:
                self._client_gone(exchange)
                return None
            try:
                events = feed(chunk, t)
            except (StreamEnded, UpstreamError) as end:
                exchange.finish(end)  # raised where the clock waits; nothing more is read
                return None
            return write(events) if events else None

        done = exchange.receive(sink)
        try:
            await clock.wait(done)
        except StreamEnded as end:
            final = end.final if translation is not None else self.target.errors.event(end.message, end.type, end.code)
            await self._end_with_error(send, final, end.before)
            return
        finally:
            writer.close()
            if not done.done():
                exchange.finish()  # a clock ran out or the request was cancelled: no event may follow the error
        await self._end_stream(send, cutter)

    async def _end_stream(self, send: Send, cutter: EventCutter) -> None:
        """After the engine's last byte: a complete answer ends as the client expects, a cut one with an error."""
        outcome = cutter.outcome
        if not cutter.complete(self.target.stream_end):
            if self._disconnected:
                # This relay dropped the exchange itself, the client being gone (``_client_gone``): not the
                # engine's doing, nothing to hold against the replica. The client-left branch of __call__ ends it.
                raise asyncio.CancelledError
            outcome.error_kind = "disconnected"
            self.target.lease.report(False)
            raise UpstreamError("The engine ended the stream before it was complete.", code="upstream_disconnected")
        self.target.lease.report(True)
        if self.target.translation is not None:
            await send({"type": "http.response.body", "body": self.target.translation.end(), "more_body": True})
        elif self.target.stream_end == "finish":
            await send({"type": "http.response.body", "body": DONE, "more_body": True})
        if outcome.events > 1:
            gap = (cutter.last_at - cutter.first_at) / (outcome.events - 1)
            self.metrics.chunk_gap_of(self.target.model).observe(gap)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _end_with_error(self, send: Send, error_event: bytes, before: bytes = b"") -> None:
        """The one way a started stream ends broken: the whole events still owed (``before``), then the error
        event, and no ``[DONE]``."""
        if before:
            await send({"type": "http.response.body", "body": before, "more_body": True})
        await send({"type": "http.response.body", "body": error_event, "more_body": False})

    async def _fail(self, send: Send, exc: GatewayError) -> None:
        if self._disconnected:
            return
        translation = self.target.translation
        if not self._started:
            extra = [(k.encode(), v.encode()) for k, v in exc.headers().items()]
            await send(
                {
                    "type": "http.response.start",
                    "status": exc.status,
                    "headers": self._response_headers(b"application/json", extra),
                }
            )
            errors = self.target.errors
            body = errors.body(exc) if translation is None else translation.error_body(exc.status, exc.body())
            await send({"type": "http.response.body", "body": body, "more_body": False})
        elif translation is not None:
            await self._end_with_error(send, translation.error_event(exc.message, exc.type, exc.code))
        else:
            await self._end_with_error(send, self.target.errors.event(exc.message, exc.type, exc.code))
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


async def send_error(send: Send, exc: GatewayError, request_id: str, errors: ErrorDialect = OPENAI) -> None:
    body = errors.body(exc)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
    ]
    headers += [(k.encode(), v.encode()) for k, v in exc.headers().items()]
    start: Message = {"type": "http.response.start", "status": exc.status, "headers": headers}
    await send(start)
    await send({"type": "http.response.body", "body": body, "more_body": False})
