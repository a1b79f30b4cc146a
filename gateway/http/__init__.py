"""The edge: what every request meets before and after the request path.

Modules, one concept each::

    protocol    uvicorn's httptools protocol with a header deadline and header size caps
    cycle       uvicorn's response cycle reached past ASGI: a stream's events written to the client's transport
    server      the uvicorn config every gateway process runs with
    endpoints   the endpoint table: every path's metrics label, permission, engine capability, body rule
    middleware  the one ASGI middleware: request id, keys, metrics, last-resort errors, the fast path
    keys        API keys: who is calling and whether the key grants a permission
    scope       the keys the gateway adds to a request's ASGI scope
    errors      every error the gateway answers with, in the OpenAI shape
    shutdown    graceful shutdown: drain, in-flight tracking, the signal handlers
"""
