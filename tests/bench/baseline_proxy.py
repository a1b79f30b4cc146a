"""The baseline: the smallest reasonable FastAPI + httpx proxy, what a gateway is measured against.

One shared ``httpx.AsyncClient`` with its default pool; the request body is forwarded as bytes (no JSON
parsing), the answer streamed back with ``aiter_raw`` (no decoding, no peeking). Paths under
``/paced/`` and ``/ttfb/`` go to ``--paced-upstream``, everything else to ``--upstream``, path kept.
Run with uvicorn, uvloop and httptools, no access log.

The alternatives the issue asks about, same proxy otherwise: ``--pool 512`` sizes httpx's pool for
hundreds of concurrent streams (``max_connections`` and ``max_keepalive_connections``); ``--client
httpx-aiohttp`` puts httpx on aiohttp's transport (the ``httpx-aiohttp`` package, as the openai SDK offers),
with the same pool size.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import uvicorn
from fastapi import FastAPI, Request
from starlette.responses import StreamingResponse


def create_app(upstream: str, paced_upstream: str, *, client: str = "httpx", pool: int | None = None) -> FastAPI:
    clients: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # By default httpx's pool limits (100 connections, 20 kept alive), as a minimal proxy has them; a
        # longer timeout only, so that clients queued for a pooled connection at c=256 do not fail.
        limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool) if pool else None
        kwargs = {"limits": limits} if limits else {}
        if client == "httpx-aiohttp":
            from httpx_aiohttp import HttpxAiohttpClient  # optional: pip install httpx-aiohttp

            shared: httpx.AsyncClient = HttpxAiohttpClient(timeout=httpx.Timeout(60.0), **kwargs)
        else:
            shared = httpx.AsyncClient(timeout=httpx.Timeout(60.0), **kwargs)
        async with shared:
            clients["shared"] = shared
            yield

    app = FastAPI(lifespan=lifespan)

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def proxy(path: str, request: Request) -> StreamingResponse:
        base = paced_upstream if path.startswith(("paced/", "ttfb/")) else upstream
        client = clients["shared"]
        upstream_request = client.build_request(
            request.method,
            f"{base}/{path}",
            content=await request.body(),
            headers={"content-type": request.headers.get("content-type", "application/json")},
        )
        response = await client.send(upstream_request, stream=True)

        async def passthrough() -> AsyncIterator[bytes]:
            try:
                async for chunk in response.aiter_raw():
                    yield chunk
            finally:  # also when the client leaves mid-stream: else the pooled connection leaks
                await response.aclose()

        return StreamingResponse(
            passthrough(), status_code=response.status_code, media_type=response.headers.get("content-type")
        )

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8001 (no trailing slash)")
    parser.add_argument("--paced-upstream", required=True)
    parser.add_argument("--client", choices=("httpx", "httpx-aiohttp"), default="httpx")
    parser.add_argument("--pool", type=int, help="max_connections = max_keepalive_connections (default: httpx's)")
    args = parser.parse_args()
    app = create_app(args.upstream.rstrip("/"), args.paced_upstream.rstrip("/"), client=args.client, pool=args.pool)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        server_header=False,
    )


if __name__ == "__main__":
    main()
