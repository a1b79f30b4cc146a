"""Several gateway processes on one port, one owner of the engines (``server.workers`` > 1).

One Python process forwards ~35,000 streamed events/s on one core (tests/bench/README.md); past that,
more processes. The process ``gateway serve`` starts stays the **owner**: it builds the ``EnginePool``
(launches, probes, restarts, reloads, drains the engines) and never accepts a client. It binds the port
and starts N **workers** that inherit the socket and answer every client (``worker.py``). A worker
handles the request path itself — keys, body checks, media, relay, its own metrics — and takes each
request's replica as a lease from the owner's scheduler over a Unix socket, so queues and limits stay
exact. Everything else (``/health``, ``/ready``, ``/metrics``, ``/v1/models``, ``/gpu/status``,
``/admin/*``) is passed to the owner's own app on a second Unix socket; ``/metrics`` there adds up every
worker's series.

Modules, one concept each::

    messages      what the two ends say: one frozen dataclass per message
    wire          the control line: length-prefixed frames, writes coalesced per loop turn, the peer's uid
    lease_server  the owner's hub: leases from its EnginePool lent to the workers, liveness pings
    lease_client  a worker's RemotePool (a LeaseSource, as EnginePool is) and its line to the owner
    forward       a worker's pass-through of the owner's routes
    fleet         the owner's worker processes: started, replaced when one dies or hangs, drained
    worker        one worker process: its app, its orders from the owner, its part in the shutdown
"""
