"""The gateway's configuration: one YAML file, validated whole, every section a pydantic model.

Modules, one concept each::

    loader  ``Config`` and ``load_config``: the file, its models, discovery, errors that name the key
    server  the ``server:`` section (also settable by ``GATEWAY_*`` environment variables)
    auth    the ``auth:`` section: API keys and their permissions
    passthrough  the ``passthrough:`` section: more POST paths the engines serve (rows of the endpoint table)
    reload  re-reading the file (``POST /admin/reload``, SIGHUP) and applying its models in place

The ``media:`` section lives with its consumer (``gateway.media.settings``).
"""
