"""One launch of one engine as operating-system processes: spawn, watch, end, and find what is left.

Modules, one concept each::

    launch    a launch: the reaper and the engine under it, their output, how they are ended
    reaper    the small process between the gateway and an engine (run as a script, never imported)
    procfs    /proc: every process of a launch, found by its environment tag
    ports     free ports, and who listens on one
    redact    secrets scrubbed from an engine's output at the pipe
    log_ring  an engine's recent output: a bounded ring plus live followers
"""
