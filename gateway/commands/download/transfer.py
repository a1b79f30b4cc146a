"""One file: written to ``<name>.incomplete``, resumed with a Range request, checked, then renamed.

A file only gets its real name once it has the listed size and hash (sha256 for LFS files, the git
blob id for small ones), so an interrupted run never leaves a truncated file that looks finished.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Protocol

from gateway.commands.download.hub_api import DownloadError, Hub, RepoFile, Retryable, Snapshot
from gateway.commands.download.manifest import Manifest
from gateway.commands.download.progress import Progress

CHUNK = 1 << 20
PARTIAL_SUFFIX = ".incomplete"
BACKOFF_S = 0.5  # the first wait after a cut transfer; doubled each time, at most 10 s


class Interrupted(DownloadError):
    """The command is stopping (Ctrl-C): the partial file stays for the next run."""


class _Hasher(Protocol):
    """What ``hashlib``'s sha256 and sha1 objects offer that a download uses."""

    def update(self, data: bytes, /) -> None: ...
    def hexdigest(self) -> str: ...


def _hasher(file: RepoFile) -> _Hasher | None:
    if file.sha256:
        return hashlib.sha256()
    if file.blob_id and file.size is not None:
        h = hashlib.sha1(usedforsecurity=False)  # git's blob id: sha1 of a header and the content
        h.update(b"blob %d\0" % file.size)
        return h
    return None


def _hash_file(path: Path, hasher: _Hasher, stop: threading.Event | None = None) -> None:
    with open(path, "rb") as f:
        while block := f.read(CHUNK * 8):
            if stop is not None and stop.is_set():
                raise Interrupted("interrupted")
            hasher.update(block)


def _matches(file: RepoFile, hasher: _Hasher | None) -> bool:
    return hasher is None or hasher.hexdigest() == (file.sha256 or file.blob_id)


def is_complete(path: Path, file: RepoFile, manifest: Manifest, stop: threading.Event | None = None) -> bool:
    """Whether ``path`` already holds this file: size and etag as recorded, or, unrecorded, size and hash."""
    try:
        size = path.stat().st_size
    except OSError:
        return False
    if not path.is_file() or (file.size is not None and size != file.size):
        return False
    entry = manifest.recorded(file)
    if entry is not None and entry.get("size") == size:
        return file.etag is None or entry.get("etag") == file.etag
    # Unrecorded: a run that died between rename and record, or a copy put there by hand. Hash it once.
    hasher = _hasher(file)
    if hasher is None:
        return file.size is not None
    _hash_file(path, hasher, stop)
    return _matches(file, hasher)


class FileFetch:
    """The state of one file across attempts; ``counted`` is what the progress bar has been told."""

    def __init__(
        self, hub: Hub, snapshot: Snapshot, file: RepoFile, local_dir: Path, progress: Progress, stop: threading.Event
    ) -> None:
        self.hub, self.snapshot, self.file, self.progress, self.stop = hub, snapshot, file, progress, stop
        self.final = local_dir / file.path
        self.part = self.final.with_name(self.final.name + PARTIAL_SUFFIX)
        self.counted = 0

    def run(self, retries: int) -> str:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        resumed = self.part.exists() and self.part.stat().st_size > 0
        for attempt in range(retries + 1):
            try:
                self._attempt()
                break
            except Retryable as exc:
                if attempt == retries:
                    raise DownloadError(f"{exc}; run the command again to resume") from None
                self._sleep(exc.retry_after if exc.retry_after is not None else min(BACKOFF_S * 2**attempt, 10.0))
        os.replace(self.part, self.final)
        return "resumed" if resumed else "downloaded"

    def _sleep(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise Interrupted("interrupted")

    def _count(self, on_disk: int) -> None:
        self.progress.have(on_disk - self.counted)
        self.counted = on_disk

    def _attempt(self) -> None:
        file, part = self.file, self.part
        offset = part.stat().st_size if part.exists() else 0
        if file.size is not None and offset > file.size:
            offset = 0  # not this file's beginning: start over
        hasher = _hasher(file)
        if offset and hasher is not None:
            _hash_file(part, hasher, self.stop)
        self._count(offset)
        with self.hub.open(self.snapshot, file, offset) as (response, start):
            if response is not None:
                if start == 0 and offset:  # the server ignored the range: the body is the whole file
                    hasher = _hasher(file)
                    self._count(0)
                with open(part, "ab" if start else "wb") as out:
                    # Raw bytes as they arrive: what reached the disk before a cut is kept, and offsets
                    # are offsets in the file (the request asks for no content encoding).
                    for chunk in response.iter_raw():
                        if self.stop.is_set():
                            raise Interrupted("interrupted")
                        out.write(chunk)
                        if hasher is not None:
                            hasher.update(chunk)
                        self.counted += len(chunk)
                        self.progress.advance(len(chunk))
                    out.flush()
                    os.fsync(out.fileno())  # the rename below must not outrun the data after a power loss
        size = part.stat().st_size
        if file.size is not None and size < file.size:
            raise Retryable(f"{file.path}: the transfer ended at {size} of {file.size} bytes")
        if (file.size is not None and size > file.size) or not _matches(file, hasher):
            part.unlink()
            self._count(0)
            raise Retryable(f"{file.path}: the content does not match the hub's hash (removed)")
