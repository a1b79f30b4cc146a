"""Talking to engines over HTTP: one exchange interface, two implementations.

Modules, one concept each::

    exchange  the interface the relay is written against: one request, its status and headers, its body to a sink
    raw       raw keep-alive engine connections whose body chunks reach the sink in protocol callbacks
    session   the same exchange over the shared aiohttp session (https:// remotes, raw connections off)
    client    the shared upstream (the aiohttp session, the raw connections, which carries a request) and the clocks
"""
