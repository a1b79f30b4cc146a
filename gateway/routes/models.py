"""``GET /v1/models``: every served name and alias, with the state of the model behind it.

One list for both SDKs: the OpenAI fields (``object``, ``created`` in Unix seconds, ``owned_by``) and
Anthropic's (``type: "model"``, ``created_at`` in RFC 3339, ``display_name``; beside ``data``, ``has_more``
false and ``first_id``/``last_id``), so ``client.models.list()`` works from either. Each SDK ignores the
other's fields, so the answer does not depend on who asks (no sniffing of ``anthropic-version``). The list
is one page: Anthropic's ``limit``, ``after_id`` and ``before_id`` are not applied, and ``has_more`` is false.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from fastapi import APIRouter, Response

from engines import EnginePool, ModelEntry
from gateway.deps import OwnerState, OwnerStateDep
from gateway.proxy.admission import resolve
from gateway.routes.ops import model_state

router = APIRouter()


def _cards(pool: EnginePool, entry: ModelEntry, created: int) -> list[dict[str, Any]]:
    spec = entry.spec
    status = model_state(pool, entry)  # state (stopped, starting, ready, draining, failed), queue_depth
    base = {
        "object": "model",
        "type": "model",
        "created": created,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)),
        "owned_by": "gateway",
        "engine": spec.engine,
        "display_name": spec.display_name or spec.name,
        **status,
        "loaded": status["state"] == "ready",  # a sleeping model is not: its weights are off the GPU
        "kind": spec.kind,
        "source": spec.source,
    }
    return [
        {"id": name, **base, "root": spec.name, "alias_of": None if name == spec.name else spec.name}
        for name in spec.served_names
    ]


def _created(state: OwnerState) -> int:
    return int(state.started_at)


def _skipped(state: OwnerState) -> dict[str, Any]:
    """Folders of ``models_dir`` that are not served, with why: beside ``data`` (not model cards, which
    clients would try to call), and only when a models_dir is configured, so the plain list stays plain."""
    found = state.config.discovered
    if found is None:
        return {}
    return {"skipped": [{"folder": s.folder, "reason": s.reason} for s in found.skipped]}


@router.get("/v1/models")
async def list_models(state: OwnerStateDep) -> Response:
    data = [card for e in state.pool.entries() for card in _cards(state.pool, e, _created(state))]
    first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
    body = {"object": "list", "data": data, "has_more": False, "first_id": first, "last_id": last, **_skipped(state)}
    return Response(orjson.dumps(body), media_type="application/json")


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, state: OwnerStateDep) -> Response:
    entry = resolve(state.pool, model_id)
    card = next(c for c in _cards(state.pool, entry, _created(state)) if c["id"] == model_id)
    return Response(orjson.dumps(card), media_type="application/json")
