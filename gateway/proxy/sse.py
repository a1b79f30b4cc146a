"""An engine's SSE stream, cut into whole events on their way to the client.

Bytes arrive in arbitrary pieces; only whole events (up to a blank line) are forwarded, so a half line cut
by a crashing engine never reaches the client. On the way: the engine's model name is replaced by the one
the client asked for (a byte replacement, not a parse), usage is read from the events that carry it, and an
in-band error event ends the stream in the gateway's error shape. A translated stream (a client dialect the
engine lacks, gateway/dialects) is cut by ``TranslatingCutter`` instead, which hands the whole chat events to
the request's ``StreamTranslation`` and forwards the dialect's events: the plain cutter does no extra work
per event. Synchronous, so that the relay's one sink
serves both exchanges: the aiohttp one (one ``await send`` per piece) and the raw one, whose chunks arrive in
protocol callbacks (gateway/proxy/upstream/raw.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import orjson

from gateway.http.errors import EngineUnavailable, UpstreamError, sse_error_event

MAX_EVENT_BYTES = 4 * 1024 * 1024  # one SSE event larger than this is not an engine talking
ABORTED = "The engine stopped before the answer was complete (its model was stopped, restarted or swapped out); retry."
DONE = b"data: [DONE]\n\n"


@dataclass
class Outcome:
    """What one relayed request came to, for the metrics and the log."""

    ttft: float | None = None
    events: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error_kind: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


class StreamEnded(Exception):
    """The engine sent an error event: ``before`` (whole events) and then ``final`` end the client's stream."""

    def __init__(self, before: bytes, final: bytes, message: str = "", type_: str = "", code: str = "") -> None:
        super().__init__("the engine sent an error event")
        self.before = before
        self.final = final
        self.message, self.type, self.code = message, type_, code  # what ``final`` says, for a translation


class StreamTranslation(Protocol):
    """A chat stream turned into a client dialect's events (implemented by gateway/dialects)."""

    def feed(self, events: bytes) -> bytes:
        """Whole chat SSE events in, whole dialect events out (b"" when none yet); ValueError: not a chat stream."""

    def end(self) -> bytes:
        """The dialect's closing events, after a complete chat stream."""

    def error_event(self, message: str, type_: str, code: str) -> bytes:
        """The dialect's event that ends a broken stream (never one that looks finished)."""

    def error_body(self, status: int, body: bytes) -> bytes:
        """An error answer in the gateway's OpenAI shape, in the dialect's shape."""


class EventCutter:
    __slots__ = ("first_at", "last", "last_at", "outcome", "pending", "rewrite", "t0")

    def __init__(self, rewrite: tuple[tuple[bytes, bytes], ...], outcome: Outcome, t0: float) -> None:
        self.rewrite = rewrite
        self.outcome = outcome
        self.t0 = t0
        self.pending = b""
        self.last = b""  # the last piece forwarded: where a complete stream shows its end
        self.first_at = 0.0
        self.last_at = 0.0

    def feed(self, chunk: bytes, now: float) -> bytes:
        """The whole events ``chunk`` completes, ready to forward (b"" when none yet).

        Raises StreamEnded at an engine's error event, UpstreamError when the stream is not SSE.
        """
        if self.pending:
            chunk = self.pending + chunk
            self.pending = b""
        cut = chunk.rfind(b"\n\n")
        if cut < 0:
            if len(chunk) > MAX_EVENT_BYTES:
                raise UpstreamError("The engine sent a malformed stream.", code="bad_upstream_response")
            self.pending = chunk
            return b""
        cut += 2
        if cut != len(chunk):
            self.pending = chunk[cut:]
            chunk = chunk[:cut]
        if b'"error"' in chunk:
            _raise_at_error_event(chunk, self.outcome)
        if b'"abort"' in chunk:
            _raise_at_abort(chunk, self.outcome)
        if b'"usage"' in chunk:
            _peek_usage(chunk, self.outcome)
        for old, new in self.rewrite:
            chunk = chunk.replace(old, new)
        outcome = self.outcome
        if outcome.events == 0:
            self.first_at = now
            outcome.ttft = now - self.t0
        outcome.events += 1
        self.last = chunk
        self.last_at = now
        return chunk

    def complete(self, stream_end: str) -> bool:
        """Did the stream end as a finished answer ends? ``stream_end`` as in ``relay.Target``."""
        if stream_end == "done":
            return self.last.endswith(DONE)
        if stream_end == "finish":
            return b'"finish_reason":"' in self.last or b'"finish_reason": "' in self.last
        return True


class TranslatingCutter(EventCutter):
    """An ``EventCutter`` whose whole events go through a ``StreamTranslation``: the client gets the dialect's
    events, the engine's error event becomes the dialect's, and the completeness check reads the chat events
    (``last`` stays the engine's own)."""

    __slots__ = ("translation",)

    def __init__(self, translation: StreamTranslation, outcome: Outcome, t0: float) -> None:
        super().__init__((), outcome, t0)  # the translation writes the client's model name itself
        self.translation = translation

    def feed(self, chunk: bytes, now: float) -> bytes:
        translation = self.translation
        try:
            events = super().feed(chunk, now)
            return translation.feed(events) if events else b""
        except StreamEnded as end:
            before = translation.feed(end.before) if end.before else b""
            raise StreamEnded(before, translation.error_event(end.message, end.type, end.code)) from None
        except ValueError:
            raise UpstreamError("The engine sent a malformed stream.", code="bad_upstream_response") from None


def _raise_at_error_event(chunk: bytes, outcome: Outcome) -> None:
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
        message, type_, code = error.get("message"), error.get("type"), error.get("code")
        outcome.error_kind = "stream_error"
        message = message if isinstance(message, str) else "The engine failed."
        type_ = type_ if isinstance(type_, str) else "upstream_error"
        code = code if isinstance(code, str) else "upstream_error"
        raise StreamEnded(
            before + b"\n\n" if before else b"", sse_error_event(message, type_, code), message, type_, code
        )


def aborted(data: object) -> bool:
    """Does this answer (or stream chunk) end a choice with ``finish_reason: "abort"``?

    vLLM ends what it was generating when it is stopped (SIGTERM: an admin stop, a swap, the drain's end) that
    way: a stream gets that chunk, usage and ``[DONE]``, a whole answer 200 with the partial text. A client
    would take either for a complete answer; the gateway turns both into its "engine unavailable" error.
    """
    if not isinstance(data, dict):
        return False
    choices = data.get("choices")
    return isinstance(choices, list) and any(isinstance(c, dict) and c.get("finish_reason") == "abort" for c in choices)


def _raise_at_abort(chunk: bytes, outcome: Outcome) -> None:
    """An event with ``finish_reason: "abort"`` ends the client's stream as a broken one (see ``aborted``): the
    events before it, then the error event, and no ``[DONE]``. Only events that name "abort" are parsed."""
    events = chunk.split(b"\n\n")
    for i, event in enumerate(events):
        if not event.startswith(b"data:") or b'"abort"' not in event:
            continue
        try:
            data = orjson.loads(event[5:])
        except orjson.JSONDecodeError:
            continue
        if aborted(data):
            before = b"\n\n".join(events[:i])
            outcome.error_kind = "aborted"
            type_, code = EngineUnavailable.type, EngineUnavailable.code
            raise StreamEnded(
                before + b"\n\n" if before else b"", sse_error_event(ABORTED, type_, code), ABORTED, type_, code
            )


def count_usage(usage: object, outcome: Outcome) -> None:
    if isinstance(usage, dict):
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(prompt, int):
            outcome.prompt_tokens = prompt
        if isinstance(completion, int):
            outcome.completion_tokens = completion


def _peek_usage(chunk: bytes, outcome: Outcome) -> None:
    """Usage rides on the last events only; parse just the events that carry a non-null one."""
    for event in chunk.split(b"\n\n"):
        if b'"usage":{' in event or b'"usage": {' in event:
            try:
                data = orjson.loads(event[5:])
            except orjson.JSONDecodeError:
                continue
            if isinstance(data, dict):
                count_usage(data.get("usage"), outcome)
