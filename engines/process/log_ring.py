"""The recent output of one engine: a bounded ring for crash reports and ``tail``, plus live followers.

Bounded three ways (lines, total bytes, bytes per line) so an engine that floods its output costs the
gateway a fixed amount of memory. A follower that reads slower than the engine writes loses lines
(and is told how many) rather than slowing the engine or the gateway down.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable

TRUNCATED = " …[truncated]"


class LogFollower:
    """A live view of a ring's new lines: ``async for line in follower``; ``close()`` (or ``async with``) ends it."""

    def __init__(self, ring: LogRing, maxsize: int) -> None:
        self._ring = ring
        # Lines, and at each place where lines were lost, a one-element list counting them: a reader
        # sees the gap where it happened and never mistakes it for continuous output.
        self._items: deque[str | list[int]] = deque()
        self._nlines = 0
        self._maxsize = maxsize
        self._wakeup = asyncio.Event()
        self._closed = False
        self.dropped = 0  # lines lost because this follower fell behind

    def _push(self, line: str) -> None:
        if self._nlines < self._maxsize:
            self._items.append(line)
            self._nlines += 1
        else:
            self.dropped += 1
            if self._items and isinstance(self._items[-1], list):
                self._items[-1][0] += 1
            else:
                self._items.append([1])
        self._wakeup.set()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._ring._followers.discard(self)
            self._wakeup.set()

    async def get(self) -> str | None:
        """The next line, or ``None`` once closed and drained."""
        while True:
            if self._items:
                item = self._items.popleft()
                if isinstance(item, list):
                    return f"[… {item[0]} lines dropped: follower too slow]"
                self._nlines -= 1
                return item
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
    def __init__(
        self,
        *,
        max_lines: int = 2000,
        max_bytes: int = 512 * 1024,
        max_line: int = 16 * 1024,
        follower_buffer: int = 1000,
    ) -> None:
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


class LineSplitter:
    """Cuts a byte stream into lines without a line-length limit on the reader (asyncio's ``readline``
    gives up at 64 KiB): a line longer than ``max_line`` is cut there and the rest of it is dropped."""

    def __init__(self, emit: Callable[[str], None], *, max_line: int = 16 * 1024) -> None:
        self._emit = emit
        self._max_line = max_line
        self._pending = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> None:
        pieces = data.split(b"\n")
        for piece in pieces[:-1]:
            if self._discarding:
                self._discarding = False
                continue
            if self._pending:
                self._pending += piece
                piece = bytes(self._pending)
                self._pending.clear()
            self._line(piece)
        last = pieces[-1]
        if last and not self._discarding:
            self._pending += last
            if len(self._pending) > self._max_line:
                self._line(bytes(self._pending))
                self._pending.clear()
                self._discarding = True

    def flush(self) -> None:
        if self._pending and not self._discarding:
            self._line(bytes(self._pending))
        self._pending.clear()
        self._discarding = False

    def _line(self, raw: bytes) -> None:
        truncated = len(raw) > self._max_line
        text = raw[: self._max_line].rstrip(b"\r").decode("utf-8", "replace")
        self._emit(text + TRUNCATED if truncated else text)
