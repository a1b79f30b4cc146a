"""Command-line tools beside ``gateway serve`` (``gateway.cli`` dispatches to them).

Modules, one concept each::

    download    ``gateway download``: model weights from the Hugging Face hub, resumable
    demo_model  ``gateway demo-model``: tiny random-weight models for the CPU demo, offline
"""
