"""OpenAI Responses (``POST /v1/responses``) carried by a chat completions engine.

Request: ``instructions`` → a system message; ``input`` (a string, or items) → messages: ``message`` items
with input_text / output_text / input_image parts, ``function_call`` items → an assistant's ``tool_calls``,
``function_call_output`` items → ``tool`` messages; function ``tools``, ``tool_choice``,
``parallel_tool_calls``, ``max_output_tokens``, ``text.format`` (json_schema / json_object) →
``response_format``. The gateway keeps no responses for a translated model: ``previous_response_id`` and
``conversation`` are a 400 that says to send the whole conversation, and ``store`` is answered ``false``.
Hosted tools (web search, file search, MCP...) and stored prompts are a 400 naming them.

Answer: a ``message`` item with one ``output_text`` part, one ``function_call`` item per tool call; status
``completed``, or ``incomplete`` with ``incomplete_details.reason`` (max_output_tokens, content_filter).
Stream: response.created, response.in_progress, items added / filled / done in order, then
response.completed carrying the whole response (its status ``incomplete`` when cut by the token limit, as
vLLM's native endpoint does: docs/real-vllm/transcripts/responses-stream.txt). A broken stream ends with
``response.failed`` (status failed, ``error``) and never a ``response.completed``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Final

from gateway.dialects.chat import Text, Translation, deltas, first_choice, new_id, refuse, sse, text_or_parts
from gateway.http.errors import BadRequest

_KNOWN: Final = frozenset(
    {
        "model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "tools", "tool_choice",
        "parallel_tool_calls", "stream", "stream_options", "text", "store", "metadata", "user", "reasoning",
        "truncation", "service_tier", "include", "safety_identifier", "prompt_cache_key", "background",
    }
)  # fmt: skip
_STATELESS = (
    "the gateway keeps no responses for a model it serves by translation; send the whole conversation in 'input'."
)
_REFUSED: Final = {
    "previous_response_id": _STATELESS,
    "conversation": _STATELESS,
    "prompt": "stored prompts are not available through the gateway.",
    "max_tool_calls": "a chat model cannot bound its tool calls.",
    "top_logprobs": "log probabilities are not carried by the translation.",
}
_INCOMPLETE: Final = {"length": "max_output_tokens", "content_filter": "content_filter"}


@dataclass
class _Item:
    """One output item being streamed: a message (text) or a function call."""

    data: dict[str, Any]
    index: int  # output_index
    parts: list[str] = field(default_factory=list)  # the text, or the arguments, so far


class ResponsesTranslation(Translation):
    def __init__(self, body: dict[str, Any], model: str) -> None:
        super().__init__(body, model)
        for name, why in _REFUSED.items():
            if body.get(name) is not None:
                raise refuse(name, why)
        if body.get("background") is True:
            raise refuse("background", "a translated model answers while the client waits.")
        unknown = sorted(set(body) - _KNOWN)
        if unknown:
            raise refuse(unknown[0], "a chat model answers Responses by translation, which does not carry it.")
        self.stream = body.get("stream") is True
        self.body = body
        chat: dict[str, Any] = {"messages": _messages(body)}
        if body.get("max_output_tokens") is not None:
            chat["max_tokens"] = body["max_output_tokens"]
        for name in ("temperature", "top_p", "parallel_tool_calls", "user"):
            if body.get(name) is not None:
                chat[name] = body[name]
        if body.get("tools"):
            chat["tools"] = _tools(body["tools"])
        if body.get("tool_choice") is not None:
            chat["tool_choice"] = _tool_choice(body["tool_choice"])
        response_format = _response_format(body.get("text"))
        if response_format is not None:
            chat["response_format"] = response_format
        if self.stream:
            chat["stream"] = True
            chat["stream_options"] = {"include_usage": True}
        self.chat_body = chat
        self.id = new_id("resp_")
        self.created_at = int(time.time())
        self._sequence = 0
        self._items: list[_Item] = []
        self._text: _Item | None = None  # the message item text goes to, while open
        self._calls: dict[int, _Item] = {}  # function call items by the chat tool call's index

    # -- whole answers --

    def answer(self, chat: dict[str, Any]) -> dict[str, Any]:
        choice = first_choice(chat)
        message = choice["message"]
        output: list[dict[str, Any]] = []
        text = message.get("content")
        if isinstance(text, str) and text:
            output.append(_message_item(new_id("msg_"), text, "completed"))
        for call in message.get("tool_calls") or ():
            function = call["function"]
            output.append(
                _call_item(
                    call.get("id") or new_id("call_"), function["name"], function.get("arguments") or "", "completed"
                )
            )
        self.progress.finish_reason = choice.get("finish_reason")
        self.progress.usage(chat.get("usage"))
        return self._response(output, final=True)

    def _response(
        self, output: list[dict[str, Any]], *, final: bool, error: dict[str, str] | None = None
    ) -> dict[str, Any]:
        body = self.body
        reason = _INCOMPLETE.get(self.progress.finish_reason or "")
        if error is not None:
            status = "failed"
        elif not final:
            status = "in_progress"
        else:
            status = "incomplete" if reason else "completed"
        p = self.progress
        usage = {
            "input_tokens": p.prompt_tokens,
            "input_tokens_details": {"cached_tokens": p.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": p.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": p.prompt_tokens + p.completion_tokens,
        }
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": error,
            "incomplete_details": {"reason": reason} if reason and status == "incomplete" else None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "metadata": body.get("metadata"),
            "model": self.model,
            "output": output,
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": None,
            "reasoning": body.get("reasoning"),
            "store": False,  # nothing is kept: GET /v1/responses/{id} cannot find it
            "temperature": body.get("temperature", 1.0),
            "text": body.get("text") or {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [],
            "top_p": body.get("top_p", 1.0),
            "truncation": body.get("truncation", "disabled"),
            "usage": usage if final else None,
            "user": body.get("user"),
        }

    # -- streams --

    def _event(self, kind: str, data: dict[str, Any]) -> bytes:
        data = {"type": kind, "sequence_number": self._sequence, **data}
        self._sequence += 1
        return sse(kind, data)

    def feed(self, events: bytes) -> bytes:
        out = bytearray()
        if self._sequence == 0:
            out += self._start()
        for delta in deltas(events, self.progress):
            if isinstance(delta, Text):
                item = self._text
                if item is None:
                    item = self._text = self._add(_message_item(new_id("msg_"), "", "in_progress", parts=False))
                    out += self._added(item)
                    part = {"type": "output_text", "text": "", "annotations": []}
                    out += self._event(
                        "response.content_part.added", {**self._at(item), "content_index": 0, "part": part}
                    )
                item.parts.append(delta.text)
                out += self._event(
                    "response.output_text.delta",
                    {**self._at(item), "content_index": 0, "delta": delta.text, "logprobs": []},
                )
                continue
            call = self._calls.get(delta.index)
            if call is None:
                out += self._close_text()
                data = _call_item(delta.id or new_id("call_"), delta.name or "", "", "in_progress")
                call = self._calls[delta.index] = self._add(data)
                out += self._added(call)
            if delta.arguments:
                call.parts.append(delta.arguments)
                out += self._event(
                    "response.function_call_arguments.delta", {**self._at(call), "delta": delta.arguments}
                )
        return bytes(out)

    def end(self) -> bytes:
        out = bytearray()
        if self._sequence == 0:
            out += self._start()
        out += self._close_text()
        for call in self._calls.values():
            arguments = "".join(call.parts)
            call.data["arguments"], call.data["status"] = arguments, "completed"
            done = {**self._at(call), "arguments": arguments, "name": call.data["name"]}
            out += self._event("response.function_call_arguments.done", done)
            out += self._event("response.output_item.done", {"output_index": call.index, "item": call.data})
        self._calls = {}
        response = self._response([item.data for item in self._items], final=True)
        return bytes(out + self._event("response.completed", {"response": response}))

    def _start(self) -> bytes:
        response = self._response([], final=False)
        return self._event("response.created", {"response": response}) + self._event(
            "response.in_progress", {"response": response}
        )

    def _add(self, data: dict[str, Any]) -> _Item:
        item = _Item(data, len(self._items))
        self._items.append(item)
        return item

    def _added(self, item: _Item) -> bytes:
        return self._event("response.output_item.added", {"output_index": item.index, "item": dict(item.data)})

    @staticmethod
    def _at(item: _Item) -> dict[str, Any]:
        return {"item_id": item.data["id"], "output_index": item.index}

    def _close_text(self) -> bytes:
        item = self._text
        if item is None:
            return b""
        self._text = None
        text = "".join(item.parts)
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        item.data.update(_message_item(item.data["id"], text, "completed"))
        at = {**self._at(item), "content_index": 0}
        return (
            self._event("response.output_text.done", {**at, "text": text, "logprobs": []})
            + self._event("response.content_part.done", {**at, "part": part})
            + self._event("response.output_item.done", {"output_index": item.index, "item": item.data})
        )

    # -- errors --

    def error_event(self, message: str, type_: str, code: str) -> bytes:
        output = [item.data for item in self._items]
        response = self._response(output, final=False, error={"code": "server_error", "message": message})
        return self._event("response.failed", {"response": response})

    def error_body(self, status: int, body: bytes) -> bytes:
        return body  # the gateway's errors are OpenAI's shape already


def _message_item(item_id: str, text: str, status: str, *, parts: bool = True) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if parts else []
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}


def _call_item(call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    # The item's id and the call's id are distinct in the Responses API; the chat id is the call_id that
    # the client's function_call_output names.
    return {
        "id": "fc_" + call_id.removeprefix("call_"),
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


# -- the request --


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions:
        if not isinstance(instructions, str):
            raise BadRequest("'instructions' must be a string.", param="instructions")
        out.append({"role": "system", "content": instructions})
    given = body.get("input")
    if isinstance(given, str):
        out.append({"role": "user", "content": given})
        return out
    if not isinstance(given, list) or not all(isinstance(i, dict) for i in given):
        raise BadRequest("'input' must be a string or a list of items.", param="input")
    for item in given:
        kind = item.get("type", "message")
        if kind == "message":
            out.append(_message(item))
        elif kind == "function_call":
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"},
            }
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)  # one assistant turn: its text and its calls
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if isinstance(output, list):
                output = "".join(str(p.get("text", "")) for p in output if isinstance(p, dict))
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": str(output or "")})
        elif kind != "reasoning":  # a reasoning item of an earlier turn: a chat engine cannot take it back
            raise refuse(
                f"input[].type={kind}", "a chat model takes message, function_call and function_call_output items."
            )
    return out


def _message(item: dict[str, Any]) -> dict[str, Any]:
    role = item.get("role")
    if role not in ("user", "assistant", "system", "developer"):
        raise BadRequest("An input message's 'role' must be user, assistant, system or developer.", param="input")
    content = item.get("content")
    chat_role = "system" if role == "developer" else role
    if isinstance(content, str):
        return {"role": chat_role, "content": content}
    if not isinstance(content, list):
        raise BadRequest("An input message's 'content' must be a string or a list of parts.", param="input")
    parts: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text", "refusal"):
            assert isinstance(part, dict)
            parts.append({"type": "text", "text": str(part.get("text", part.get("refusal", "")))})
        elif kind == "input_image" and isinstance(part, dict) and isinstance(part.get("image_url"), str):
            image: dict[str, Any] = {"url": part["image_url"]}
            if part.get("detail") in ("low", "high"):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        elif kind == "input_image":
            raise refuse("input_image.file_id", "the gateway has no files API; send the image as image_url.")
        else:
            raise refuse(f"input[].content[].type={kind}", "a chat model takes input_text and input_image parts.")
    return {"role": chat_role, "content": text_or_parts(parts)}


def _tools(tools: object) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be a list.", param="tools")
    out = []
    for tool in tools:
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function" or not isinstance(tool, dict):
            raise refuse(f"tools[].type={kind}", "a chat model calls function tools only; hosted tools need OpenAI.")
        function = {
            "name": tool.get("name"),
            "parameters": tool.get("parameters") or {"type": "object", "properties": {}},
        }
        if tool.get("description"):
            function["description"] = tool["description"]
        if tool.get("strict") is not None:
            function["strict"] = tool["strict"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: object) -> object:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise refuse("tool_choice", "a chat model takes auto, none, required or one function.")


def _response_format(text: object) -> dict[str, Any] | None:
    if text is None:
        return None
    form = text.get("format") if isinstance(text, dict) else None
    if form is None or (isinstance(form, dict) and form.get("type") == "text"):
        return None
    if isinstance(form, dict) and form.get("type") == "json_object":
        return {"type": "json_object"}
    if isinstance(form, dict) and form.get("type") == "json_schema":
        schema = {k: form[k] for k in ("name", "schema", "strict", "description") if k in form}
        return {"type": "json_schema", "json_schema": schema}
    raise refuse("text.format", "a chat model takes text, json_object or json_schema.")
