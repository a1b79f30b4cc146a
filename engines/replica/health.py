"""One health probe: GET the adapter's health URL with a deadline and ask the adapter whether the answer
means ready. Never raises: every failure becomes ``(False, why)``, where ``why`` is short and safe to show."""

from __future__ import annotations

import asyncio

import aiohttp

from engines.adapters.base import EngineAdapter

MAX_BODY = 64 * 1024  # health bodies are tiny; a server that streams more is not a health endpoint


async def probe(
    session: aiohttp.ClientSession,
    adapter: EngineAdapter,
    url: str,
    limit: float,
    headers: dict[str, str] | None = None,
) -> tuple[bool, str]:
    try:
        async with asyncio.timeout(limit):
            async with session.get(url, headers=headers, allow_redirects=False) as resp:
                body = await resp.content.read(MAX_BODY)
                return adapter.is_ready(resp.status, body), f"HTTP {resp.status}"
    except TimeoutError:
        return False, f"no answer within {limit:g}s"
    except aiohttp.ClientConnectorError as exc:
        # Refused while the child lives means "still loading"; the caller decides what it means.
        refused = isinstance(exc.os_error, ConnectionRefusedError)
        return False, "connection refused" if refused else "cannot connect"
    except (aiohttp.ClientError, OSError) as exc:
        return False, type(exc).__name__
