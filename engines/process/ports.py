"""Free ports, and who listens on a port (so a stranger's server is never taken for our engine)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def pick_free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago. Another process may take it before the engine binds it; the
    supervisor checks who listens before it trusts a probe."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    """Whether an engine could bind ``host:port`` now. SO_REUSEADDR as servers set it, so a port in
    TIME_WAIT counts as free, and one with a listener does not."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _listening_inodes(port: int) -> set[str] | None:
    inodes: set[str] = set()
    seen_table = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                next(fh, None)
                seen_table = True
                for row in fh:
                    fields = row.split()
                    # local_address is HEXIP:HEXPORT; state 0A is LISTEN.
                    if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(fields[9])
        except OSError:
            continue
    return inodes if seen_table else None


def listener_pids(port: int, pids: Iterable[int]) -> set[int] | None:
    """Which of ``pids`` hold a socket listening on ``port`` (any address); ``None`` when /proc cannot tell."""
    inodes = _listening_inodes(port)
    if inodes is None:
        return None
    wanted = {f"socket:[{inode}]" for inode in inodes}
    owners: set[int] = set()
    if not wanted:
        return owners
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue
        for name in names:
            try:
                if os.readlink(f"{fd_dir}/{name}") in wanted:
                    owners.add(pid)
                    break
            except OSError:
                continue
    return owners
