"""What a replica looks like from outside its supervisor: a frozen snapshot, safe to show and to log."""

from __future__ import annotations

import re
from dataclasses import dataclass

from engines.replica.state import EngineState

_SECRET_WORDS = frozenset({"key", "apikey", "token", "secret", "password", "passwd", "credential", "credentials"})


def _is_secret_flag(flag: str) -> bool:
    # Whole words only: --api-key and --hf-token are secrets, --tokenizer and --ssl-keyfile are not.
    return any(word in _SECRET_WORDS for word in re.split(r"[-_]+", flag.lstrip("-").lower()))


def redact_argv(argv: list[str]) -> list[str]:
    """The command line fit for logs and status pages: values of secret-looking flags become ``***``."""
    out: list[str] = []
    hiding = False
    for arg in argv:
        if arg.startswith("-"):
            name, eq, _ = arg.partition("=")
            hiding = _is_secret_flag(name) and not eq
            out.append(f"{name}=***" if eq and _is_secret_flag(name) else arg)
        else:
            out.append("***" if hiding else arg)
    return out


@dataclass(frozen=True)
class ReplicaSnapshot:
    """What one replica looks like now: for status pages, metrics and advisory routing choices."""

    model: str
    replica: int
    state: EngineState
    base_url: str | None  # set only while READY
    pid: int | None  # the launch's reaper (its process group)
    engine_pid: int | None
    port: int | None
    restarts: int  # launches that followed a crash
    last_exit_code: int | None
    last_error: str | None
    state_since: float  # wall clock
    ready_since: float | None
    launches: int
    argv: list[str]  # secrets redacted
    health_failures: int  # failed probes in a row
    probe_failures: int = 0  # failed probes since the supervisor started (flapping shows here, not in states)
    inflight: int = 0
    passive_failures: int = 0
