"""What a folder holds, written after each finished file: which repository, and each file's size and etag.

It lets a second run skip finished files without hashing gigabytes again, notice a file that changed
on the hub at the same size, and refuse to mix two repositories in one folder. A lock file keeps two
downloads from writing the same folder at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from gateway.commands.download.hub_api import DownloadError, RepoFile

MANIFEST = ".gateway-download.json"
LOCK = ".gateway-download.lock"


@contextlib.contextmanager
def folder_lock(local_dir: Path) -> Iterator[None]:
    local_dir.mkdir(parents=True, exist_ok=True)
    with open(local_dir / LOCK, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DownloadError(f"another download into {local_dir} is running") from None
        yield  # the lock goes with the file descriptor, also when the process dies


class Manifest:
    def __init__(self, local_dir: Path, repo_id: str) -> None:
        self.path = local_dir / MANIFEST
        self._lock = threading.Lock()
        data: dict[str, object] = {}  # as read from disk: unchecked JSON
        with contextlib.suppress(OSError, ValueError):
            loaded = json.loads(self.path.read_text())
            data = loaded if isinstance(loaded, dict) else {}
        if data.get("repo_id") not in (None, repo_id):
            raise DownloadError(f"{local_dir} already holds {data['repo_id']}; choose another --path for {repo_id}")
        files = data.get("files")
        self.files: dict[str, dict[str, object]] = files if isinstance(files, dict) else {}
        self.data = {"repo_id": repo_id, "files": self.files}

    def recorded(self, file: RepoFile) -> dict[str, object] | None:
        entry = self.files.get(file.path)
        return entry if isinstance(entry, dict) else None

    def record(self, file: RepoFile, size: int, commit: str) -> None:
        with self._lock:
            self.files[file.path] = {"size": size, "etag": file.etag, "commit": commit}
            self._write()

    def set_commit(self, revision: str, commit: str) -> None:
        with self._lock:
            self.data.update(revision=revision, commit=commit)
            self._write()

    def _write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)
