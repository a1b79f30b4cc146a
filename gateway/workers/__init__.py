"""Several gateway processes on one port, one owner of the engines (``server.workers`` > 1).

One Python process forwards ~35,000 streamed events/s on one core (tests/bench/README.md); past that,
more processes. The process ``gateway serve`` starts stays the **owner**: it builds the ``EnginePool``
(launches, probes, restarts, reloads, drains the engines) and never accepts a client. It binds the port
and starts N **workers** that inherit the socket and answer every client (``worker.py``). A worker
handles the request path itself — keys, body checks, media, relay, its own metrics — and takes each
request's replica as a lease from the owner's scheduler over a Unix socket (``hub.py`` and
``remote.py``), so queues and limits stay exact. Everything else (``/health``, ``/ready``, ``/metrics``,
``/v1/models``, ``/gpu/status``, ``/admin/*``) is passed to the owner's own app on a second Unix socket
(``forward.py``); ``/metrics`` there adds up every worker's series. ``fleet.py`` starts the workers,
replaces one that dies, and drains them before the engines stop.
"""
