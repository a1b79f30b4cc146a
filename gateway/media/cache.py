"""A small LRU of checked ``data:`` URLs, so a conversation that resends an image is not redone.

Keys are content addresses: the SHA-256 of the decoded bytes for inline images, of the URL for
fetched ones (those expire after a TTL, since what a URL serves can change). Bounded by entries and
by total characters held. Used from the event loop only (no locking).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable


def key_for_bytes(data: bytes) -> str:
    return "b:" + hashlib.sha256(data).hexdigest()


def key_for_url(url: str) -> str:
    return "u:" + hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()


class MediaCache:
    def __init__(self, max_entries: int, max_bytes: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._items: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def get(self, key: str) -> str | None:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        value, expires = item
        if expires and expires <= self._clock():
            self._drop(key)
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: str, value: str, *, ttl: float | None = None) -> None:
        """Store ``value``; too large a value (over a quarter of the byte budget) is not cached."""
        if self.max_entries <= 0 or len(value) > self.max_bytes // 4:
            return
        if key in self._items:
            self._drop(key)
        expires = self._clock() + ttl if ttl else 0.0
        self._items[key] = (value, expires)
        self._bytes += len(value)
        while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
            self._drop(next(iter(self._items)))

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0

    def _drop(self, key: str) -> None:
        value, _ = self._items.pop(key)
        self._bytes -= len(value)
