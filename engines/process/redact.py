"""Secrets an engine may print (vLLM logs its non-default args, API keys included), scrubbed at the pipe.

Scrubbing where the output is read keeps every consumer clean at once: the log ring, the admin log
API, and the gateway's own log, which mirrors engine output under the engine's name.
"""

from __future__ import annotations

import os

from engines.replica.snapshot import redact_argv
from engines.spec import ModelSpec

MIN_SECRET = 6  # shorter values would be replaced all over ordinary text


def _secret_flag(name: str) -> bool:
    return redact_argv([f"--{name}", "x"])[1] == "***"  # the snapshot's own rule for secret flags


def secret_values(spec: ModelSpec) -> tuple[str, ...]:
    found: list[str] = []
    for key, value in spec.args.items():
        if _secret_flag(key):
            found.extend(str(v) for v in (value if isinstance(value, list | tuple) else [value]))
    found += [v for k, v in spec.env.items() if _secret_flag(k)]
    if spec.api_key_env and os.environ.get(spec.api_key_env):
        found.append(os.environ[spec.api_key_env])
    # Longest first, so a secret that contains another is replaced whole.
    return tuple(sorted({v for v in found if len(v) >= MIN_SECRET}, key=len, reverse=True))


def scrub(line: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if secret in line:
            line = line.replace(secret, "***")
    return line
