"""One engine replica's lifecycle, owned by one supervisor task; everyone else reads snapshots.

Modules, one concept each::

    supervisor  the owner task: the state machine of DESIGN's supervision loop
    state       the replica states and the moves between them
    mailbox     the owner's inbox: commands, and "whichever comes first"
    health      one readiness/health probe
    backoff     the wait before the next launch, and the crash budget
    outlier     passive health from real traffic (ejections)
    snapshot    a frozen view of a replica, safe to show
"""
