"""The keys the gateway adds to a request's ASGI scope, and who writes each.

Here rather than in the middleware that sets most of them: the request path (gateway/proxy) reads and
writes them too, and the middleware imports the request path for its fast path.
"""

from __future__ import annotations

from typing import Final

REQUEST_ID_KEY: Final = "gateway.request_id"  # the middleware: the client's valid x-request-id, or a new one
T0_KEY: Final = "gateway.t0"  # the middleware: the loop time the request arrived (durations, the relay's clocks)
IDENTITY_KEY: Final = "gateway.identity"  # the middleware: the calling key's Identity (None: open or public)
MODEL_KEY: Final = "gateway.model"  # the pipeline: the served model a request was routed to (metrics label)
