"""The request path's core: from a checked body to an engine's answer relayed byte for byte.

Modules, one concept each::

    pipeline   read → check → route → normalize → relay: a passthrough endpoint, and the steps others reuse
    body       reading and checking a request body (limits, JSON, required fields, stripped fields)
    claim      what a request asks of the scheduler: its priority (X-Priority, its key's) and affinity
    admission  a ``model`` name to a replica lease, or the right refusal (404, 429, 503)
    relay      one forwarded request as an ASGI response: the four clocks, failover, the client watch
    sse        an engine's SSE stream cut into whole events, model names rewritten
    upstream/  the exchanges with an engine: the aiohttp client and the raw keep-alive connections
"""
