"""Talking to engines over HTTP.

Modules, one concept each::

    client  the shared upstream (one aiohttp session, the raw connections) and the four clocks
    raw     raw keep-alive engine connections whose stream bodies reach the client in protocol callbacks
"""
