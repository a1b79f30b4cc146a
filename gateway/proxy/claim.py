"""What a request says about itself when it asks for a replica: its priority and its conversation's affinity.

``claim_for`` turns a request into the scheduler's ``Claim`` (engines/scheduling/contract.py):

* **priority**: the ``X-Priority`` header, an integer from -10 to 10 (higher is served sooner; anything
  else is a 400 naming the header, in the client's error dialect, since it is raised as the gateway's
  ``BadRequest``). With API keys configured, the calling key's ``priority`` is both the default and the
  ceiling: a header above it is clamped to it, not refused, so a client may lower its own priority (a batch
  job) but never raise it above what its key was given. An open gateway takes the header as it is.
* **affinity**: for a model with several replicas only, a stable 63-bit hash that sends a conversation to
  the replica whose prefix cache already holds it. An explicit session key first (``X-Session-ID``, else the
  body's ``user`` string: the same value either way hashes the same), else the prompt's leading part: a
  chat's system message(s) and its first user message (text parts only), a completion's prompt. Those do not
  change as a conversation grows (each turn resends the history after them), so every turn of one
  conversation hashes alike, while conversations that differ in their first user message spread out. Only the
  first ``PREFIX_CHARS`` of that text count: enough to tell conversations apart, and a bounded cost for a
  request with a long system prompt. Endpoints with no prompt that an engine caches (embeddings, rerank,
  audio, ...) get no prompt affinity.

Cheap on the common path: a single-replica model with no ``X-Priority`` reads the headers once without
allocating and answers the shared ``NO_CLAIM``. Session keys and prompts are hashed, never kept or logged.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any, Final

from starlette.requests import Request

from engines.scheduling.contract import NO_CLAIM, Claim
from engines.scheduling.entry import ModelEntry
from gateway.config.auth import MAX_PRIORITY, MIN_PRIORITY
from gateway.http.errors import BadRequest
from gateway.http.keys import Identity
from gateway.http.scope import IDENTITY_KEY

PREFIX_CHARS: Final = 2048  # the leading text of a prompt that its affinity is computed from (~2 KB)
_MASK: Final = (1 << 63) - 1  # the scheduler's affinity is a non-negative 63-bit int
_PRIORITY_HEADER: Final = b"x-priority"
_SESSION_HEADER: Final = b"x-session-id"
_PRIORITY_VALUE: Final = re.compile(rb"[+-]?[0-9]{1,2}")
# Distinct hash domains: a session key that happens to equal a prompt's text must not land on its replica.
_SESSION: Final = b"gw.session"
_PROMPT: Final = b"gw.prompt"
# The endpoints (by capability) whose prompt the engine's prefix cache holds, and the shape of that prompt.
_CONVERSATIONS: Final = frozenset({"chat", "messages", "responses"})
_COMPLETIONS: Final = frozenset({"completions", "generate"})
_SYSTEM_ROLES: Final = frozenset({"system", "developer"})
_TOKENS_HASHED: Final = 512  # a prompt of token ids: this many of its first ids (~2 KB of text)


def claim_for(
    request: Request,
    entry: ModelEntry,
    body: Mapping[str, Any] | None = None,
    capability: str | None = None,
) -> Claim:
    """The claim of ``request`` on a replica of ``entry``.

    ``body``: the client's parsed JSON body (None for a multipart form: then only ``X-Session-ID`` can give an
    affinity). ``capability``: the endpoint's (gateway/http/endpoints.py), which says where its prompt is.
    Raises ``BadRequest`` for an ``X-Priority`` that is not an integer from -10 to 10.
    """
    priority_value = session = None
    for name, value in request.scope["headers"]:
        if name == _PRIORITY_HEADER:
            if priority_value is None:
                priority_value = value
        elif name == _SESSION_HEADER and session is None and value:
            session = value
    identity: Identity | None = request.scope.get(IDENTITY_KEY)
    priority = identity.priority if identity is not None else 0
    if priority_value is not None:
        asked = parse_priority(priority_value)
        # A key's priority is its ceiling: asking for more is clamped, not refused (the client asked to be
        # served sooner; it is served as soon as its key allows). An open gateway has no ceiling.
        priority = asked if identity is None else min(asked, identity.priority)
    affinity = None
    if entry.spec.replicas > 1 and entry.spec.affinity:  # one replica (or affinity off): nothing is hashed
        affinity = affinity_of(body, capability, session)
    if priority == 0 and affinity is None:
        return NO_CLAIM
    return Claim(priority, affinity)


def parse_priority(value: bytes) -> int:
    """An ``X-Priority`` header's value; ``BadRequest`` (param ``X-Priority``) unless an integer in range."""
    if _PRIORITY_VALUE.fullmatch(value) is not None:
        priority = int(value)
        if MIN_PRIORITY <= priority <= MAX_PRIORITY:
            return priority
    raise BadRequest(
        f"'X-Priority' must be an integer from {MIN_PRIORITY} to {MAX_PRIORITY} (higher is served sooner).",
        param="X-Priority",
        code="invalid_priority",
    )


def affinity_of(body: Mapping[str, Any] | None, capability: str | None, session: bytes | None = None) -> int | None:
    """The affinity key: ``session`` (an ``X-Session-ID``), else the body's ``user``, else the prompt's
    leading part for the endpoints whose prompt an engine caches; None when there is none of these."""
    if session is not None:
        return _hash(session, _SESSION)
    if body is None:
        return None
    user = body.get("user")
    if isinstance(user, str) and user:
        return _hash(user.encode(), _SESSION)
    text = prompt_prefix(body, capability)
    return None if text is None else _hash(text.encode(), _PROMPT)


def prompt_prefix(body: Mapping[str, Any], capability: str | None) -> str | None:
    """The leading part of the prompt (at most ``PREFIX_CHARS`` characters) that stays the same through a
    conversation, or None when the endpoint has no cached prompt or the body holds no text."""
    pieces = _Pieces()
    if capability in _CONVERSATIONS:
        # Each dialect's system text, then its messages up to the first user message. Tagged the same way in
        # every dialect: a model served natively in one and translated in another hashes alike.
        responses = capability == "responses"
        if capability == "messages":
            pieces.add("system", body.get("system"))  # Anthropic's: a string or text blocks, beside the messages
        elif responses:
            pieces.add("system", body.get("instructions"))
        turns = body.get("input") if responses else body.get("messages")
        if isinstance(turns, str) and responses:  # Responses' input as one user message
            pieces.add("user", turns)
        elif isinstance(turns, list):
            for turn in turns:
                if not isinstance(turn, dict):
                    continue
                role = turn.get("role")
                if role in _SYSTEM_ROLES:
                    pieces.add("system", turn.get("content"))
                elif role == "user":
                    pieces.add("user", turn.get("content"))
                    break
                if pieces.full:
                    break
    elif capability in _COMPLETIONS:
        prompt = body.get("prompt") if capability == "completions" else body.get("inputs")
        if isinstance(prompt, list) and prompt:
            first = prompt[0]
            # A list of prompts (the first one counts), or one prompt as token ids, or a list of those.
            prompt = first if isinstance(first, str | list) else prompt
            if isinstance(prompt, list):
                ids = prompt[:_TOKENS_HASHED]
                if all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                    pieces.add("tokens", ",".join(map(str, ids)))
                prompt = None
        if isinstance(prompt, str):
            pieces.add("prompt", prompt)
    return pieces.text()


class _Pieces:
    """The prompt's leading text as it is collected, a role tag before each message, cut at ``PREFIX_CHARS``."""

    __slots__ = ("_parts", "_size")

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._size = 0

    @property
    def full(self) -> bool:
        return self._size >= PREFIX_CHARS

    def add(self, role: str, content: Any) -> None:
        """One message's ``content``: a string, or a list of parts of which only the text ones count (an
        image's bytes or URL are not the conversation's identity: the same question about a re-fetched image
        is the same conversation). The role tag goes before the message, not each part, so a message sent as
        one string or as text parts hashes alike."""
        if self.full:
            return
        tag = len(self._parts)
        self._parts.append(f"\x00{role}\x00")
        if isinstance(content, str):
            self._text(content)
        elif isinstance(content, list):
            for part in content:
                text = part.get("text") if isinstance(part, dict) else part
                if isinstance(text, str):
                    self._text(text)
        if len(self._parts) == tag + 1:  # no text in it: no tag either
            self._parts.pop()

    def _text(self, text: str) -> None:
        if text and not self.full:
            text = text[: PREFIX_CHARS - self._size]
            self._parts.append(text)
            self._size += len(text)

    def text(self) -> str | None:
        return "".join(self._parts) if self._parts else None


def _hash(data: bytes, domain: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=domain).digest(), "big") & _MASK
