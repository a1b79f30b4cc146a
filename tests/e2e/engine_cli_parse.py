"""Parse command lines with an engine's own argument parser; run by that engine's Python, not the gateway's.

    ENGINE_VENV/bin/python tests/e2e/engine_cli_parse.py vllm|lmdeploy  < [[argv...], ...]  > "RESULTS [{...}, ...]"

Reads a JSON list of command lines (each without the executable: ``["serve", MODEL, "--flag", ...]``) and
prints one line ``RESULTS [...]``: per command line ``{"ok": bool, "error": str, "deprecated": [flags]}``
(one line with a marker: the engines log to stdout too). A line fails when the parser refuses it (an
unknown or renamed flag, a bad value, a missing argument) or, for vLLM, when ``vllm serve``'s own check of
the parsed arguments refuses the combination; a flag the parser marks deprecated is listed (the next
release renames or drops it). Abbreviations are turned off: argparse would otherwise take ``--foo`` for a
longer ``--foo-bar`` and a rename could pass unseen.
Used by tests/e2e/test_engine_cli.py.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any


class Refused(Exception):
    """What argparse would have printed before exiting 2."""


def _refuse(self: argparse.ArgumentParser, message: str) -> Any:
    raise Refused(f"{self.prog}: {message}")


def _walk(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _walk(sub)


def _deprecated(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Flags of ``argv`` that the parser marks deprecated (vLLM keeps its own set below Python 3.13)."""
    marked: set[argparse.Action] = set()
    for p in _walk(parser):
        marked |= set(getattr(p, "_deprecated", ()))
        marked |= {a for a in p._actions if getattr(a, "deprecated", False)}
    given = {arg.split("=", 1)[0] for arg in argv if arg.startswith("-")}
    return sorted(flag for action in marked for flag in action.option_strings if flag in given)


def vllm_parser() -> tuple[argparse.ArgumentParser, Callable[[argparse.Namespace], None]]:
    """``vllm``'s top-level parser with its ``serve`` subcommand, as vllm/entrypoints/cli/main.py builds it."""
    import vllm.entrypoints.cli.serve as serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm", description="vLLM CLI")
    subparsers = parser.add_subparsers(required=False, dest="subparser")
    (cmd,) = serve.cmd_init()
    cmd.subparser_init(subparsers).set_defaults(dispatch_function=cmd.cmd)
    return parser, cmd.validate


def lmdeploy_parser() -> tuple[argparse.ArgumentParser, Callable[[argparse.Namespace], None]]:
    """``lmdeploy``'s parser, as lmdeploy/cli/entrypoint.py builds it (it validates nothing after parsing)."""
    from lmdeploy.cli.cli import CLI
    from lmdeploy.cli.lite import SubCliLite
    from lmdeploy.cli.serve import SubCliServe

    CLI.add_parsers()
    SubCliServe.add_parsers()
    SubCliLite.add_parsers()
    return CLI.parser, lambda args: None


def check(
    argv: list[str], parser: argparse.ArgumentParser, validate: Callable[[argparse.Namespace], None]
) -> dict[str, Any]:
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = parser.parse_args(argv)
            validate(args)
    except (Refused, ValueError, TypeError) as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "deprecated": []}
    return {"ok": True, "error": "", "deprecated": _deprecated(parser, argv)}


def main() -> None:
    engine = sys.argv[1]
    parser, validate = {"vllm": vllm_parser, "lmdeploy": lmdeploy_parser}[engine]()
    argparse.ArgumentParser.error = _refuse  # type: ignore[method-assign]  # raise instead of exit(2)
    for p in _walk(parser):
        p.allow_abbrev = False
    lines = json.load(sys.stdin)
    results = [check(argv, parser, validate) for argv in lines]
    print("RESULTS " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
