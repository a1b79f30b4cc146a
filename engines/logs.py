"""The recent output of one engine: a bounded ring for crash reports and ``tail``, plus live followers.

Bounded three ways (lines, total bytes, bytes per line) so an engine that floods its output costs the
gateway a fixed amount of memory. A follower that reads slower than the engine writes loses lines
(and is told how many) rather than slowing the engine or the gateway down.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

TRUNCATED = " …[truncated]"


class LogFollower:
    """A live view of a ring's new lines: ``async for line in follower``; ``close()`` (or ``async with``) ends it."""

    def __init__(self, ring: LogRing, maxsize: int) -> None:
        self._ring = ring
        self._lines: deque[str] = deque()
        self._maxsize = maxsize
        self._wakeup = asyncio.Event()
        self._closed = False
        self.dropped = 0  # lines lost because this follower fell behind
        self._unreported = 0

    def _push(self, line: str) -> None:
        if len(self._lines) >= self._maxsize:
            self.dropped += 1
            self._unreported += 1
        else:
            self._lines.append(line)
        self._wakeup.set()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._ring._followers.discard(self)
            self._wakeup.set()

    async def get(self) -> str | None:
        """The next line, or ``None`` once closed and drained."""
        while True:
            if self._unreported and (self._lines or self._closed):
                # Said where the gap is, in order, so a reader never mistakes a gap for continuous output.
                n, self._unreported = self._unreported, 0
                return f"[… {n} lines dropped: follower too slow]"
            if self._lines:
                return self._lines.popleft()
            if self._closed:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str]:
        while (line := await self.get()) is not None:
            yield line

    async def __aenter__(self) -> LogFollower:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class LogRing:
    def __init__(self, *, max_lines: int = 2000, max_bytes: int = 512 * 1024, max_line: int = 16 * 1024,
                 follower_buffer: int = 1000) -> None:
        if max_lines < 1 or max_bytes < 1 or max_line < 1:
            raise ValueError("LogRing bounds must be positive")
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.max_line = max_line
        self.follower_buffer = follower_buffer
        self._lines: deque[tuple[str, int]] = deque()
        self._bytes = 0
        self._followers: set[LogFollower] = set()
        self.total_lines = 0  # ever appended, for "N lines, M kept"

    def __len__(self) -> int:
        return len(self._lines)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def append(self, line: str) -> None:
        size = len(line.encode("utf-8", "replace"))
        if size > self.max_line:
            line = line.encode("utf-8", "replace")[: self.max_line].decode("utf-8", "ignore") + TRUNCATED
            size = len(line.encode("utf-8", "replace"))
        self._lines.append((line, size))
        self._bytes += size
        self.total_lines += 1
        while len(self._lines) > self.max_lines or (self._bytes > self.max_bytes and len(self._lines) > 1):
            self._bytes -= self._lines.popleft()[1]
        for follower in tuple(self._followers):
            follower._push(line)

    def tail(self, n: int | None = None) -> list[str]:
        """The last ``n`` lines kept (all of them when ``n`` is None), oldest first."""
        if n is None or n >= len(self._lines):
            return [line for line, _ in self._lines]
        if n <= 0:
            return []
        return [line for line, _ in list(self._lines)[-n:]]

    def subscribe(self, *, maxsize: int | None = None) -> LogFollower:
        """Follow new lines from now on (read ``tail`` first for the past)."""
        follower = LogFollower(self, maxsize or self.follower_buffer)
        self._followers.add(follower)
        return follower

    def close_followers(self) -> None:
        for follower in tuple(self._followers):
            follower.close()
