"""Progress of one repository's download: a redrawn bar on a terminal, plain lines otherwise (logs, CI).

Shared by the worker threads, hence the lock; the bar is redrawn at most ten times a second.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

_REDRAW_S = 0.1
_BAR = 24


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class Progress:
    def __init__(
        self, label: str, total_bytes: int, total_files: int, *, stream: TextIO | None = None, tty: bool | None = None
    ) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.label = label
        self.total_bytes = total_bytes
        self.total_files = total_files
        self.done_bytes = 0
        self.done_files = 0
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._fetched = 0  # bytes that came over the network in this run (the rate ignores resumed bytes)
        self._drawn_at = 0.0

    def have(self, n: int) -> None:
        """Bytes already on disk (a resumed partial file): counted done, not in the rate."""
        with self._lock:
            self.done_bytes += n

    def advance(self, n: int) -> None:
        with self._lock:
            self.done_bytes += n
            self._fetched += n
            now = time.monotonic()
            if self.tty and now - self._drawn_at >= _REDRAW_S:
                self._drawn_at = now
                self._draw()

    def file_done(self, path: str, size: int | None, how: str) -> None:
        with self._lock:
            self.done_files += 1
            line = f"  {path}  {human(size) if size is not None else '?'}  {how}"
            if self.tty:
                self.stream.write("\r\x1b[K" + line + "\n")
                self._draw()
            else:
                self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            with self._lock:
                self.stream.write("\r\x1b[K")
                self.stream.flush()

    def _draw(self) -> None:
        total = max(self.total_bytes, 1)
        part = min(self.done_bytes / total, 1.0)
        filled = int(part * _BAR)
        rate = self._fetched / max(time.monotonic() - self._started, 1e-3)
        self.stream.write(
            f"\r\x1b[K{self.label} [{'#' * filled}{'.' * (_BAR - filled)}] {part:4.0%} "
            f"{human(self.done_bytes)}/{human(self.total_bytes)} {human(rate)}/s "
            f"{self.done_files}/{self.total_files} files"
        )
        self.stream.flush()
