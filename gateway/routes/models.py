"""``GET /v1/models``: every served name and alias, with the state of the model behind it."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Response

from engines import ModelEntry
from gateway.deps import GatewayState, StateDep
from gateway.routes.ops import model_state
from gateway.routing import resolve

router = APIRouter()


def _cards(entry: ModelEntry, created: int) -> list[dict[str, Any]]:
    spec = entry.spec
    state = model_state(entry)
    base = {"object": "model", "created": created, "owned_by": "gateway", "engine": spec.engine,
            "display_name": spec.display_name or spec.name, "state": state, "loaded": state == "ready"}
    return [{"id": name, **base, "root": spec.name, "alias_of": None if name == spec.name else spec.name}
            for name in spec.served_names]


def _created(state: GatewayState) -> int:
    return int(state.started_at)


@router.get("/v1/models")
async def list_models(state: StateDep) -> Response:
    data = [card for e in state.pool.entries() for card in _cards(e, _created(state))]
    return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, state: StateDep) -> Response:
    entry = resolve(state.pool, model_id)
    card = next(c for c in _cards(entry, _created(state)) if c["id"] == model_id)
    return Response(orjson.dumps(card), media_type="application/json")
