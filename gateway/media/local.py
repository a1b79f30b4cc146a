"""Reading a media file from ``local_media_dir``, and from nowhere else.

Refused unless the directory is configured. The path (``file://`` URL or bare, relative paths taken
from the directory) is resolved with every symlink followed and must land inside the directory; the
final file is opened without following a symlink, must be a regular file, and is checked again by
its descriptor, so a swap between the check and the open does not escape. Runs in a thread.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from yarl import URL

from gateway.media import failures


def _path_of(ref: str, param: str | None) -> Path:
    text = ref.strip()
    if text[:5].lower() == "file:":
        try:
            url = URL(text)
        except ValueError:
            raise failures.local_forbidden(param) from None
        if url.host not in (None, "", "localhost"):
            raise failures.local_forbidden(param)
        text = url.path
    if not text or "\x00" in text:
        raise failures.local_forbidden(param)
    return Path(text)


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def read_local_file(ref: str, root_dir: str | None, max_bytes: int, param: str | None = None) -> bytes:
    """The bytes of the file ``ref`` names inside ``root_dir``; ``MediaError`` for anything else."""
    if not root_dir:
        raise failures.local_forbidden(param)
    path = _path_of(ref, param)
    try:
        root = Path(root_dir).resolve(strict=True)
        resolved = (path if path.is_absolute() else root / path).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        raise failures.local_forbidden(param) from None
    if not _inside(resolved, root):
        raise failures.local_forbidden(param)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(resolved, flags)
    except OSError:
        raise failures.local_forbidden(param) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise failures.local_forbidden(param)
        proc_link = f"/proc/self/fd/{fd}"
        if os.path.exists(proc_link) and not _inside(Path(os.readlink(proc_link)), root):
            raise failures.local_forbidden(param)
        if info.st_size > max_bytes:
            raise failures.too_large_bytes(max_bytes, param)
        chunks: list[bytes] = []
        total = 0
        while chunk := os.read(fd, min(1 << 20, max_bytes + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise failures.too_large_bytes(max_bytes, param)
        return b"".join(chunks)
    finally:
        os.close(fd)
