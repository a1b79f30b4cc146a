"""Anthropic Messages (``POST /v1/messages``) carried by a chat completions engine.

Request: ``system`` (a string or text blocks) → a system message; ``text`` and ``image`` blocks (base64 or
url source) → text and ``image_url`` parts; an assistant's ``tool_use`` blocks → its ``tool_calls``; a user's
``tool_result`` blocks → ``tool`` messages (in order, before the rest of that user turn); ``tools`` with
``input_schema`` → function tools; ``tool_choice`` auto/any/tool/none → auto/required/function/none;
``stop_sequences`` → ``stop``. ``thinking`` blocks of earlier turns are dropped (a chat engine cannot check
their signatures); ``cache_control`` hints are ignored. What a chat engine cannot carry (server tools,
documents, MCP servers, containers...) is a 400 naming it.

Answer: one ``text`` block and one ``tool_use`` block per tool call; stop reasons end_turn / max_tokens /
stop_sequence / tool_use; usage input/output tokens. Stream: message_start, then content blocks opened,
filled (text_delta, input_json_delta) and closed in order, message_delta with the stop reason and usage,
message_stop — as vLLM's native endpoint sends them (docs/real-vllm/transcripts/messages-stream.txt). A
broken stream ends with ``event: error`` and never a ``message_stop``.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from gateway.dialects.chat import Text, Translation, deltas, first_choice, new_id, refuse, sse, text_or_parts
from gateway.http.errors import ANTHROPIC, BadRequest

# Fields the translation reads, or may ignore without changing the answer.
_KNOWN: Final = frozenset(
    {
        "model", "messages", "max_tokens", "system", "stop_sequences", "stream", "temperature", "top_p", "top_k",
        "tools", "tool_choice", "metadata", "thinking", "service_tier", "anthropic_version",
    }
)  # fmt: skip
_FINISH_TO_STOP: Final = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


class MessagesTranslation(Translation):
    def __init__(self, body: dict[str, Any], model: str) -> None:
        super().__init__(body, model)
        unknown = sorted(set(body) - _KNOWN)
        if unknown:
            raise refuse(unknown[0], "a chat model answers Messages by translation, which does not carry it.")
        self.stream = body.get("stream") is True
        self.stop_sequences = _stop_sequences(body.get("stop_sequences"))
        chat: dict[str, Any] = {"messages": _messages(body)}
        max_tokens = body.get("max_tokens")
        if max_tokens is None:
            raise BadRequest("'max_tokens' is required.", param="max_tokens", code="missing_field")
        chat["max_tokens"] = max_tokens
        for name in ("temperature", "top_p", "top_k"):
            if body.get(name) is not None:
                chat[name] = body[name]
        if self.stop_sequences:
            chat["stop"] = self.stop_sequences
        if body.get("tools"):
            chat["tools"] = _tools(body["tools"])
        choice = body.get("tool_choice")
        if choice is not None:
            chat.update(_tool_choice(choice))
        if self.stream:
            chat["stream"] = True
            chat["stream_options"] = {"include_usage": True}
        self.chat_body = chat
        self.id = new_id("msg_")
        # The stream's state: blocks by index; the open one; tool calls' block indexes by chat index.
        self._started = False
        self._blocks = 0
        self._open: int | None = None
        self._open_kind = ""
        self._tools: dict[int, int] = {}
        self._called = False  # the answer calls a tool

    # -- whole answers --

    def answer(self, chat: dict[str, Any]) -> dict[str, Any]:
        choice = first_choice(chat)
        message = choice["message"]
        content: list[dict[str, Any]] = []
        text = message.get("content")
        if isinstance(text, str) and text:
            content.append({"type": "text", "text": text})
        for call in message.get("tool_calls") or ():
            function = call["function"]
            arguments = function.get("arguments") or "{}"
            tool_input = orjson.loads(arguments)  # not JSON: the relay's 502, not a made-up input
            if not isinstance(tool_input, dict):
                raise ValueError("tool arguments are not a JSON object")
            content.append(
                {
                    "type": "tool_use",
                    "id": call.get("id") or new_id("toolu_"),
                    "name": function["name"],
                    "input": tool_input,
                }
            )
        self._called = bool(message.get("tool_calls"))
        self.progress.finish_reason = choice.get("finish_reason")
        self.progress.stop_reason = choice.get("stop_reason")
        self.progress.usage(chat.get("usage"))
        stop_reason, stop_sequence = self._stop()
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": self._usage(),
        }

    def _stop(self) -> tuple[str, str | None]:
        finish, matched = self.progress.finish_reason, self.progress.stop_reason
        if finish == "stop" and isinstance(matched, str) and matched in self.stop_sequences:
            return "stop_sequence", matched
        if self._called and finish in ("stop", None):
            return "tool_use", None  # some engines say "stop" after a tool call
        return _FINISH_TO_STOP.get(finish or "stop", "end_turn"), None

    def _usage(self) -> dict[str, Any]:
        p = self.progress
        usage: dict[str, Any] = {
            "input_tokens": p.prompt_tokens - p.cached_tokens,
            "output_tokens": p.completion_tokens,
        }
        if p.cached_tokens:
            usage["cache_read_input_tokens"] = p.cached_tokens
        return usage

    # -- streams --

    def feed(self, events: bytes) -> bytes:
        out = bytearray()
        if not self._started:
            out += self._message_start()
        for delta in deltas(events, self.progress):
            if isinstance(delta, Text):
                if self._open_kind != "text":
                    out += self._open_block({"type": "text", "text": ""}, "text")
                out += self._delta({"type": "text_delta", "text": delta.text})
                continue
            index = self._tools.get(delta.index)
            if index is None:
                block = {"type": "tool_use", "id": delta.id or new_id("toolu_"), "name": delta.name or "", "input": {}}
                index = self._tools[delta.index] = self._blocks
                self._called = True
                out += self._open_block(block, "tool")
            if delta.arguments:
                # Pieces of an earlier call after another block opened still name their own block.
                out += self._delta({"type": "input_json_delta", "partial_json": delta.arguments}, index)
        return bytes(out)

    def end(self) -> bytes:
        out = bytearray()
        if not self._started:
            out += self._message_start()
        out += self._close_block()
        stop_reason, stop_sequence = self._stop()
        usage = {"input_tokens": self.progress.prompt_tokens, "output_tokens": self.progress.completion_tokens}
        out += sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                "usage": usage,
            },
        )
        out += sse("message_stop", {"type": "message_stop"})
        return bytes(out)

    def _message_start(self) -> bytes:
        self._started = True
        message: dict[str, Any] = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            # The prompt's size comes with the chat stream's last event: message_delta carries it.
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return sse("message_start", {"type": "message_start", "message": message})

    def _open_block(self, block: dict[str, Any], kind: str) -> bytes:
        out = self._close_block()
        self._open, self._open_kind = self._blocks, kind
        self._blocks += 1
        return out + sse(
            "content_block_start", {"type": "content_block_start", "index": self._open, "content_block": block}
        )

    def _close_block(self) -> bytes:
        if self._open is None:
            return b""
        index, self._open, self._open_kind = self._open, None, ""
        return sse("content_block_stop", {"type": "content_block_stop", "index": index})

    def _delta(self, delta: dict[str, Any], index: int | None = None) -> bytes:
        at = self._open if index is None else index
        return sse("content_block_delta", {"type": "content_block_delta", "index": at, "delta": delta})

    # -- errors --

    # The errors are the edge's Anthropic dialect (gateway/http/errors.py), the same as a native engine's get.

    def error_event(self, message: str, type_: str, code: str) -> bytes:
        return ANTHROPIC.event(message, type_, code)

    def error_body(self, status: int, body: bytes) -> bytes:
        return ANTHROPIC.reshape(status, body)


# -- the request --


def _stop_sequences(value: object) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise BadRequest("'stop_sequences' must be a list of strings.", param="stop_sequences")
    return value


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        out.append({"role": "system", "content": _system_text(system)})
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise BadRequest("'messages' must be a list of message objects.", param="messages")
    for message in messages:
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise BadRequest("A message's 'role' must be 'user' or 'assistant'.", param="messages")
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
        elif isinstance(content, list) and all(isinstance(b, dict) for b in content):
            out += _assistant(content) if role == "assistant" else _user(content)
        else:
            raise BadRequest("A message's 'content' must be a string or a list of blocks.", param="messages")
    return out


def _system_text(system: object) -> str:
    if isinstance(system, str):
        return system
    if isinstance(system, list) and all(isinstance(b, dict) and b.get("type") == "text" for b in system):
        return "\n\n".join(str(b.get("text", "")) for b in system)
    raise BadRequest("'system' must be a string or a list of text blocks.", param="system")


def _user(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One user turn: its tool results first (chat wants them right after the assistant's calls), then the rest."""
    tools: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for block in blocks:
        kind = block.get("type")
        if kind == "tool_result":
            result, images = _tool_result(block)
            tools.append(result)
            parts += images
        elif kind in ("text", "image"):
            parts.append(_part(block))
        elif kind not in ("thinking", "redacted_thinking"):
            raise refuse(
                f"messages[].content[].type={kind}", "a chat model takes text, image, tool_use and tool_result blocks."
            )
    return tools + ([{"role": "user", "content": text_or_parts(parts)}] if parts else [])


def _assistant(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in blocks:
        kind = block.get("type")
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "tool_use":
            arguments = orjson.dumps(block.get("input") or {}).decode()
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": arguments},
                }
            )
        elif kind not in ("thinking", "redacted_thinking"):
            raise refuse(
                f"messages[].content[].type={kind}", "an assistant turn carries text and tool_use blocks here."
            )
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    elif message["content"] is None:
        message["content"] = ""
    return [message]


def _part(block: dict[str, Any]) -> dict[str, Any]:
    if block.get("type") == "text":
        return {"type": "text", "text": str(block.get("text", ""))}
    source = block.get("source")
    if not isinstance(source, dict):
        raise BadRequest("An image block needs a 'source'.", param="messages")
    if source.get("type") == "base64":
        media, data = source.get("media_type"), source.get("data")
        if not isinstance(media, str) or not isinstance(data, str):
            raise BadRequest("A base64 image needs 'media_type' and 'data'.", param="messages")
        return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{data}"}}
    if source.get("type") == "url" and isinstance(source.get("url"), str):
        return {"type": "image_url", "image_url": {"url": source["url"]}}
    raise refuse("source.type", "an image's source must be base64 or url.")


def _tool_result(block: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A tool message (its text) and the images it carried, which a chat tool message cannot hold."""
    content = block.get("content")
    texts: list[str] = []
    images: list[dict[str, Any]] = []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and part.get("type") == "image":
                images.append(_part(part))
            elif isinstance(part, dict) and part.get("type") == "text":
                texts.append(str(part.get("text", "")))
            else:
                raise refuse("tool_result.content", "a tool result carries text and images here.")
    text = "\n".join(texts)
    if block.get("is_error"):
        text = f"Error: {text}"  # chat has no error flag on a tool result: the model reads it
    return {"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text}, images


def _tools(tools: object) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be a list.", param="tools")
    out = []
    for tool in tools:
        if not isinstance(tool, dict) or tool.get("type") not in (None, "custom") or "input_schema" not in tool:
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise refuse(f"tools[].type={kind}", "a chat model calls client tools (name, input_schema) only.")
        function = {"name": tool.get("name"), "parameters": tool["input_schema"]}
        if tool.get("description"):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: object) -> dict[str, Any]:
    if not isinstance(choice, dict):
        raise BadRequest("'tool_choice' must be an object.", param="tool_choice")
    kind = choice.get("type")
    out: dict[str, Any]
    if kind == "auto":
        out = {"tool_choice": "auto"}
    elif kind == "any":
        out = {"tool_choice": "required"}
    elif kind == "none":
        out = {"tool_choice": "none"}
    elif kind == "tool" and isinstance(choice.get("name"), str):
        out = {"tool_choice": {"type": "function", "function": {"name": choice["name"]}}}
    else:
        raise BadRequest("'tool_choice.type' must be auto, any, tool (with a name) or none.", param="tool_choice")
    if choice.get("disable_parallel_tool_use") is True:
        out["parallel_tool_calls"] = False
    return out
