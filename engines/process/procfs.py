"""Reading /proc: the processes a launch left behind, found by the environment tag every descendant inherits.

The tag (set by engines/process/launch.py) is ``GATEWAY_ENGINE_ID=<model>/<replica>/<launch>`` plus the owner's
pid and start time, so a gateway finds its own engines, and the leftovers of a gateway that died before
it could clean up, even after they called setsid or were reparented.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass

TAG_VAR = "GATEWAY_ENGINE_ID"
OWNER_VAR = "GATEWAY_OWNER_PID"
OWNER_START_VAR = "GATEWAY_OWNER_START"


def _stat_fields(pid: int) -> list[bytes] | None:
    """Fields 3.. of /proc/<pid>/stat (state, ppid, pgrp, ...); the command name is skipped."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot: with the pid, an identity that reuse cannot fake."""
    fields = _stat_fields(pid)
    return fields[19].decode() if fields and len(fields) > 19 else None


def is_alive(pid: int) -> bool:
    """Running or sleeping; a zombie has finished, it only waits to be reaped."""
    fields = _stat_fields(pid)
    return fields is not None and bool(fields) and fields[0] not in (b"Z", b"X")


def children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                found.extend(int(c) for c in fh.read().split())
        except FileNotFoundError:
            return _children_by_scan(pid)  # a kernel without CONFIG_PROC_CHILDREN
        except (OSError, ValueError):
            continue
    return found


def _children_by_scan(pid: int) -> list[int]:
    found: list[int] = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat_fields(int(name))
            if fields and len(fields) > 1 and int(fields[1]) == pid:
                found.append(int(name))
    return found


def oldest_child(pid: int) -> int | None:
    """The first child still alive: for a reaper, the engine (orphans reparented to it came later)."""
    best: tuple[int, int] | None = None
    for child in children(pid):
        started = start_time(child)
        if started is not None and is_alive(child):
            key = (int(started), child)
            best = key if best is None or key < best else best
    return best[1] if best else None


@dataclass(frozen=True)
class Tagged:
    pid: int
    engine_id: str
    owner_pid: int
    owner_start: str | None


def _gateway_vars(pid: int) -> dict[str, str] | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    if b"GATEWAY_ENGINE_ID=" not in raw:
        return None
    found: dict[str, str] = {}
    for entry in raw.split(b"\0"):
        if entry.startswith(b"GATEWAY_"):
            key, _, value = entry.decode("utf-8", "replace").partition("=")
            found[key] = value
    return found


def engine_tag(pid: int) -> Tagged | None:
    """The launch tag a process carries in its environment, if any."""
    tags = _gateway_vars(pid)
    if not tags or TAG_VAR not in tags:
        return None
    try:
        owner = int(tags.get(OWNER_VAR, "0"))
    except ValueError:
        owner = 0
    return Tagged(pid, tags[TAG_VAR], owner, tags.get(OWNER_START_VAR))


def tagged_processes(*, engine_id: str | None = None, owner_pid: int | None = None) -> list[Tagged]:
    """Live processes that carry an engine tag (optionally exactly this one, of this owner)."""
    me = os.getpid()
    found: list[Tagged] = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        tagged = engine_tag(int(name))
        if tagged is None or not is_alive(tagged.pid):
            continue
        if engine_id is not None and tagged.engine_id != engine_id:
            continue
        if owner_pid is not None and tagged.owner_pid != owner_pid:
            continue
        found.append(tagged)
    return found


def descendants(root: int, limit: int = 4096) -> set[int]:
    """``root`` and every process below it, at most ``limit`` (a fork bomb must not stall the caller)."""
    seen, todo = {root}, [root]
    while todo and len(seen) < limit:
        for child in children(todo.pop()):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def owner_alive(tagged: Tagged) -> bool:
    if tagged.owner_pid <= 0:
        return False
    started = start_time(tagged.owner_pid)
    if started is None or not is_alive(tagged.owner_pid):
        return False
    return tagged.owner_start is None or tagged.owner_start == started


def kill(pids: Iterable[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
