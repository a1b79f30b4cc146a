"""Fault switches, the request record file, and log output.

Faults come from the environment, not from flags: the stand-ins reject unknown flags exactly like the real
CLIs, so an extra ``--crash-after-chunks`` would make them exit 2. ``STANDIN_FAULTS`` is read once at start;
``STANDIN_FAULTS_FILE`` (a JSON object, same keys) is re-read at every use and overrides it, so a test can
change a running engine's behaviour.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

ENV_FAULTS = "STANDIN_FAULTS"
ENV_FAULTS_FILE = "STANDIN_FAULTS_FILE"
ENV_RECORD = "STANDIN_RECORD"


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("", "1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def _str(value: Any) -> str:
    return str(value)


# key -> converter; README.md documents each one.
KEYS: dict[str, Callable[[Any], Any]] = {
    # startup and process model
    "startup-delay": float,
    "exit-at-startup": int,
    "never-ready": _bool,
    "initializing": float,
    "crash-after-seconds": float,
    "engine-dead-after": float,
    "watchdog": float,
    "ignore-sigterm": _str,
    "sigterm-swallowed-after": float,
    "fork-workers": int,
    "setsid": _bool,
    "hold-port-in-child": _bool,
    "log-flood": float,
    # health
    "health": _str,
    # sleep mode (vLLM /sleep and /wake_up, LMDeploy /sleep and /wakeup)
    "sleep-delay": float,
    "wake-delay": float,
    "sleep-fails": _bool,
    "wake-fails": _bool,
    # per request (inference endpoints only)
    "status": int,
    "retry-after": _str,
    "status-times": int,
    "garbage": _str,
    "hang-before-headers": _bool,
    "crash-on-request": _bool,
    "refuse-connections": _bool,
    "first-token-delay": float,
    "token-interval": float,
    "crash-after-chunks": int,
    "close-after-chunks": int,
    "stall-after-chunks": int,
    "error-after-chunks": int,
    "drip": float,
    "burst": int,
    "record-disconnects": _bool,
    "echo-headers": _bool,
}


class FaultError(ValueError):
    pass


def parse_faults(text: str) -> dict[str, Any]:
    """``"a=1,b,c=slow:3"`` -> ``{"a": 1, "b": True, "c": "slow:3"}``; unknown keys are an error, not a no-op."""
    raw: dict[str, Any] = {}
    for item in text.split(","):
        item = item.strip()
        if item:
            key, eq, value = item.partition("=")
            raw[key.strip()] = value.strip() if eq else True
    return _convert(raw, ENV_FAULTS)


def _convert(raw: Mapping[str, Any], origin: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        norm = key.replace("_", "-")
        conv = KEYS.get(norm)
        if conv is None:
            raise FaultError(f"{origin}: unknown fault key {key!r} (known: {', '.join(sorted(KEYS))})")
        if value is None or value is False:
            continue
        try:
            out[norm] = conv(value)
        except (TypeError, ValueError) as exc:
            raise FaultError(f"{origin}: bad value for {key!r}: {exc}") from None
    return out


class Faults:
    """The current fault set: the environment's, overlaid by the file's when one is named."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.base = parse_faults(env.get(ENV_FAULTS, ""))
        self.file = env.get(ENV_FAULTS_FILE) or None

    def current(self) -> dict[str, Any]:
        if not self.file:
            return self.base
        try:
            with open(self.file, encoding="utf-8") as fh:
                text = fh.read()
        except FileNotFoundError:
            return self.base
        if not text.strip():
            return self.base
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise FaultError(f"{ENV_FAULTS_FILE}: invalid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise FaultError(f"{ENV_FAULTS_FILE}: expected a JSON object")
        return {**self.base, **_convert(data, ENV_FAULTS_FILE)}


class Recorder:
    """Appends one JSON line per event to ``STANDIN_RECORD``; each line is one ``write`` on an O_APPEND fd."""

    def __init__(self, path: str | None, engine: str) -> None:
        self.path = path
        self.engine = engine

    def __call__(self, event: str, **fields: Any) -> None:
        if not self.path:
            return
        line = json.dumps(
            {"event": event, "ts": time.time(), "pid": os.getpid(), "engine": self.engine, **fields},
            default=repr,
            ensure_ascii=False,
        )
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)


def emit(fd: int, text: str) -> None:
    """Blocking write to stdout (1) or stderr (2): a reader that stops draining the pipe stalls the engine, as
    real engines do, which is what A11 (log flood) needs to show."""
    data = (text if text.endswith("\n") else text + "\n").encode("utf-8", "replace")
    try:
        while data:
            n = os.write(fd, data)
            data = data[n:]
    except (BrokenPipeError, OSError):
        pass
