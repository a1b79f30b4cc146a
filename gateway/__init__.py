"""The HTTP side of the gateway: clients in, engines (the ``engines`` package) behind.

Packages, one layer each (docs/architecture.md draws how a request crosses them)::

    http           the edge: uvicorn protocol and server, the one middleware, API keys, the endpoint
                   table, error shapes, graceful shutdown
    proxy          the request path's core: body checks, admission (model → lease), the relay and its
                   upstream exchanges, SSE framing
    routes         FastAPI handlers only: OpenAI, audio, stored responses, simple, LightLLM, models, ops,
                   GPU status, admin
    dialects       Anthropic Messages and OpenAI Responses translated to and from chat completions
    media          images (and vLLM's audio/video) fetched safely and inlined per engine dialect
    config         the YAML config, its sections (server, auth, passthrough), and reload
    observability  Prometheus metrics, log setup, NVML readings
    workers        several worker processes on one port, one owner of the engines
    commands       command-line tools beside ``serve``: download, demo-model

Modules at the top: ``app`` (``create_app`` and its lifespan), ``deps`` (``GatewayState``, what handlers
reach), ``cli`` (the ``gateway`` command), ``__main__`` (``python -m gateway``).
"""
