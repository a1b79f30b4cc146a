"""``gateway download``: model weights from the Hugging Face hub into a folder, resumable.

An own small client over httpx (a core dependency) rather than ``huggingface_hub``, which only the
``cpu`` extra installs: the command has to work in the slim gateway image, where weights are fetched
before any engine starts. ``HF_ENDPOINT`` points it elsewhere (a mirror, or a test's fake hub).

    hub.py       the two hub calls: the file list of one commit, and one file from an offset
    plan.py      what to fetch: hub ids from the command line or the config, which files, into where
    fetch.py     one file: ``.incomplete`` until whole, resumed with Range, checked against its hash
    manifest.py  what a folder holds (repository, each file's size and etag) and a lock against a second run
    progress.py  a bar on a terminal, plain lines otherwise
    command.py   the command: arguments, the loop over models, messages and exit codes
"""

from gateway.commands.download.command import add_arguments, run

__all__ = ["add_arguments", "run"]
