"""The ``passthrough:`` section: more POST paths the engines serve, relayed as they are, routed by ``model``.

So the next endpoint an engine adds works without a gateway release::

    passthrough:
      /v2/rerank: {permission: rerank, engines: [vllm]}
      /v1/load_lora_adapter: {engines: [vllm]}          # permission: admin

Each key is a path; gateway/http/endpoints.py makes it one row of the endpoint table (``endpoint_table``),
so keys, the metrics label, the request id, clocks, limits, cancellation and drain apply as to chat.

- ``engines`` (required): the engine kinds that serve the path. The gateway cannot know what an engine
  serves beyond its adapter, so the operator says it; a model on another kind gets a 400 naming the model
  and the path, and its engine is never sent the request.
- ``permission`` (default ``admin``): what a key needs. An engine's unlisted paths include ones that change
  the engine (vLLM's ``/reset_prefix_cache``, ``/sleep``, ``/load_lora_adapter``), so a config line that
  names none must not open a path to every application key; naming ``chat``, ``rerank``, ... opens it.
- ``label`` (default: the path): the ``endpoint`` label of the request metrics.

A path the gateway answers itself (a row of the table, or below a tree of its rows) is refused at load. The
table is built when the app is: a reload that changes this section reports ``restart_required``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from engines.spec import EngineKind
from gateway.config.auth import Permission

# Plain segments only: no query, no empty, '.' or '..' segment, no percent-escapes (the table is looked up by
# the decoded ``scope["path"]``, which must equal the key exactly).
_SEGMENT = re.compile(r"[A-Za-z0-9_~:@+.-]+")


class PassthroughPath(BaseModel):
    """One configured path: who may call it, which engine kinds serve it, how its metrics are labelled."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engines: tuple[EngineKind, ...] = Field(min_length=1)
    permission: Permission = "admin"
    label: str | None = Field(None, min_length=1, max_length=64)


def _entries_may_be_empty(raw: Any) -> Any:
    """``/path:`` with nothing after it is an entry with its defaults (then ``engines`` is reported missing)."""
    if isinstance(raw, dict):
        return {path: {} if entry is None else entry for path, entry in raw.items()}
    return raw


def check_path(path: str) -> str:
    """``path`` if it can be a row of the endpoint table, else a ValueError saying why."""
    segments = path.split("/")
    if (
        len(segments) < 2
        or segments[0] != ""
        or not all(_SEGMENT.fullmatch(s) for s in segments[1:])
        or any(s in (".", "..") for s in segments)
    ):
        raise ValueError(f"{path!r}: a passthrough path is '/' and plain segments (letters, digits, _~:@+.-)")
    return path


def _paths_are_plain(entries: dict[str, PassthroughPath]) -> dict[str, PassthroughPath]:
    for path in entries:
        check_path(path)
    return entries


Passthrough = Annotated[
    dict[str, PassthroughPath], BeforeValidator(_entries_may_be_empty), AfterValidator(_paths_are_plain)
]
