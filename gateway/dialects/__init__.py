"""Client dialects answered by translation to and from chat completions, for engines that lack them natively.

Pure: no I/O, no engine, no relay. Each dialect is one ``Translation`` per request (``chat.Translation``):
the client's body as a chat completions body (``chat_body``; a ``BadRequest`` names what cannot be
translated), a chat answer as the dialect's answer (``answer``), and a chat SSE stream as the dialect's
events, whole event by whole event (``feed``, then ``end`` at a complete end, or ``error_event`` at a broken
one). The relay drives a translation through its ``StreamTranslation`` hook (gateway/proxy/sse.py); the
pipeline chooses it per request (gateway/proxy/pipeline.py).

Modules: ``chat`` (the chat side: the stream's deltas, the SSE framing, the base class), ``anthropic``
(Anthropic Messages), ``responses`` (OpenAI Responses).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from gateway.dialects.anthropic import MessagesTranslation
from gateway.dialects.chat import Translation
from gateway.dialects.responses import ResponsesTranslation

# The capability an endpoint row asks for → the translation that serves it on a chat engine.
TRANSLATIONS: Final[dict[str, Callable[[dict[str, Any], str], Translation]]] = {
    "messages": MessagesTranslation,
    "responses": ResponsesTranslation,
}

__all__ = ["TRANSLATIONS", "MessagesTranslation", "ResponsesTranslation", "Translation"]
