"""The chat completions side of every translation: a chat stream read as deltas, SSE framing, the base class.

A chat stream is read as it arrives, whole events at a time (the relay's cutter hands over only whole
events): each choice delta becomes ``Text`` or ``ToolPiece`` (a tool call comes in pieces: its id and name
first, then its arguments a few characters at a time), and the finish reason, vLLM's matched stop string and
the usage are kept in ``ChatProgress``. The dialects turn these into their own events.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.http.errors import BadRequest


@dataclass(frozen=True, slots=True)
class Text:
    text: str


@dataclass(frozen=True, slots=True)
class ToolPiece:
    index: int  # the tool call's index in the choice (pieces of one call share it)
    id: str | None
    name: str | None
    arguments: str


Delta = Text | ToolPiece


@dataclass(slots=True)
class ChatProgress:
    """What a chat stream said besides its deltas."""

    finish_reason: str | None = None
    stop_reason: str | int | None = None  # vLLM: the stop string (or token id) that ended the answer
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    chunks: int = 0

    def usage(self, usage: object) -> None:
        if not isinstance(usage, dict):
            return
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(prompt, int):
            self.prompt_tokens = prompt
        if isinstance(completion, int):
            self.completion_tokens = completion
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            self.cached_tokens = details["cached_tokens"]


def chat_events(events: bytes) -> Iterator[dict[str, Any]]:
    """The JSON objects of whole SSE events (``[DONE]``, comments and other lines skipped)."""
    for event in events.split(b"\n\n"):
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if not payload or payload == b"[DONE]":
                continue
            try:
                data = orjson.loads(payload)
            except orjson.JSONDecodeError:
                raise ValueError("a chat stream event is not JSON") from None
            if isinstance(data, dict):
                yield data


def deltas(events: bytes, progress: ChatProgress) -> Iterator[Delta]:
    """The deltas of the first choice in whole chat SSE ``events``; the rest lands in ``progress``."""
    for data in chat_events(events):
        progress.chunks += 1
        progress.usage(data.get("usage"))
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            continue
        choice = choices[0]
        delta = choice.get("delta")
        if isinstance(delta, dict):
            text = delta.get("content")
            if isinstance(text, str) and text:
                yield Text(text)
            calls = delta.get("tool_calls")
            if isinstance(calls, list):
                for position, call in enumerate(calls):
                    piece = _tool_piece(call, position)
                    if piece is not None:
                        yield piece
        finish = choice.get("finish_reason")
        if isinstance(finish, str):
            progress.finish_reason = finish
            stop = choice.get("stop_reason")
            if isinstance(stop, str | int) and not isinstance(stop, bool):
                progress.stop_reason = stop


def _tool_piece(call: object, position: int) -> ToolPiece | None:
    if not isinstance(call, dict):
        return None
    index = call.get("index")
    function = call.get("function")
    function = function if isinstance(function, dict) else {}
    call_id, name, arguments = call.get("id"), function.get("name"), function.get("arguments")
    return ToolPiece(
        index if isinstance(index, int) and not isinstance(index, bool) else position,
        call_id if isinstance(call_id, str) and call_id else None,
        name if isinstance(name, str) and name else None,
        arguments if isinstance(arguments, str) else "",
    )


def first_choice(answer: dict[str, Any]) -> dict[str, Any]:
    """The first choice of a chat answer (TypeError/KeyError when it has none: the relay's 502)."""
    choice = answer["choices"][0]
    if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
        raise TypeError("a chat answer without a message")
    return choice


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One named SSE event (the Anthropic SDK skips events without an ``event:`` line)."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def refuse(field: str, why: str) -> BadRequest:
    """The 400 for a field the translation cannot carry to a chat engine."""
    return BadRequest(f"'{field}' is not supported for this model: {why}", param=field, code="unsupported_field")


def text_or_parts(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Chat message content: a plain string when it is text only (every chat engine takes that), else parts."""
    if all(p.get("type") == "text" for p in parts):
        return "".join(str(p.get("text", "")) for p in parts)
    return parts


class Translation(ABC):
    """One request in a client's dialect, carried by a chat engine: built from the client's body (which it
    checks: ``BadRequest`` names what cannot be translated), then asked for the answer or the stream."""

    stream: bool
    chat_body: dict[str, Any]  # the chat completions request, without ``model`` (the pipeline sets it)

    def __init__(self, body: dict[str, Any], model: str) -> None:
        self.model = model  # the name the client asked for, written in every answer
        self.progress = ChatProgress()

    @abstractmethod
    def answer(self, chat: dict[str, Any]) -> dict[str, Any]:
        """A whole chat answer as the dialect's answer (KeyError/TypeError/ValueError: an unexpected shape)."""

    @abstractmethod
    def feed(self, events: bytes) -> bytes:
        """Whole chat SSE events in, whole dialect SSE events out (b"" when none yet)."""

    @abstractmethod
    def end(self) -> bytes:
        """The closing events of a complete stream."""

    @abstractmethod
    def error_event(self, message: str, type_: str, code: str) -> bytes:
        """The event that ends a broken stream: never one that looks finished."""

    @abstractmethod
    def error_body(self, status: int, body: bytes) -> bytes:
        """An error answer (in the gateway's OpenAI shape) in the dialect's shape."""
