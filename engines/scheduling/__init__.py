"""Which models run, and which replica answers a request.

Modules, one concept each::

    contract   what the request path may ask of an engine owner (LeaseSource, ReplicaLease, QueuePlace,
               ReplicaHandle): Protocols both pools meet, checked by mypy at the bottom of ``pool``
    pool       ``EnginePool``: every served model, its supervisors, and the scheduler's effects
    entry      ``ModelEntry``: one served model as the pool keeps it
    scheduler  the decisions (start, stop, grant, refuse), synchronous and side-effect free
    phases     a model's lifecycle phases and the table of moves the scheduler may make
    tickets    what passes between the request path, the scheduler and its effects
    lease      a request's claim on a replica, or its place in a queue (talks to a ``Desk``, not the pool)
    placement  which models may run side by side (GPUs, groups, max_loaded)
"""
