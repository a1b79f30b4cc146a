"""Stored responses (``GET``/``DELETE /v1/responses/{id}``, ``POST …/cancel``, ``GET …/input_items``): not
routed, with a 404 that says why.

A stored response lives only in the memory of the one engine process that made it: vLLM keeps one only when
started with ``VLLM_ENABLE_RESPONSES_API_STORE=1`` (an unbounded in-process store its docs warn about),
SGLang and LMDeploy in their process, and a translated response nowhere. Routing a retrieval would need the
gateway to remember which replica made each id, for as long as that replica keeps it, across the gateway's
workers and restarts; and a replica that restarted has lost it anyway. The gateway answers what clients
that do not store (``store: false``, the whole conversation as ``input``: Codex, the Agents SDK's default
loop) never ask, and says so to those that do. A ``previous_response_id`` in a new request is passed to the
engine as it is: it works where the model has one replica that kept the response.
"""

from __future__ import annotations

from fastapi import APIRouter

from gateway.http.errors import NotFound

router = APIRouter()

WHY = (
    "The gateway does not keep or route stored responses: response '{id}' lives, if anywhere, in the memory of "
    "the one engine process that made it, which the gateway cannot find from its id. Send the conversation "
    "again as 'input' (with store: false)."
)


def _not_routed(response_id: str) -> NotFound:
    return NotFound(WHY.format(id=response_id[:64]), param="response_id", code="response_not_routed")


@router.get("/v1/responses/{response_id}", name="retrieve_response")
async def retrieve(response_id: str) -> None:
    raise _not_routed(response_id)


@router.delete("/v1/responses/{response_id}", name="delete_response")
async def delete(response_id: str) -> None:
    raise _not_routed(response_id)


@router.post("/v1/responses/{response_id}/cancel", name="cancel_response")
async def cancel(response_id: str) -> None:
    raise _not_routed(response_id)


@router.get("/v1/responses/{response_id}/input_items", name="list_response_input_items")
async def input_items(response_id: str) -> None:
    raise _not_routed(response_id)
