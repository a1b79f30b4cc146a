"""Which models run, and which replica answers a request.

Modules, one concept each::

    pool       ``EnginePool``: every served model, its supervisors, and the scheduler's effects
    scheduler  the decisions (start, stop, grant, refuse), synchronous and side-effect free
    tickets    what passes between the request path, the scheduler and its effects
    lease      a request's claim on a replica, or its place in a queue
    placement  which models may run side by side (GPUs, groups, max_loaded)
"""
