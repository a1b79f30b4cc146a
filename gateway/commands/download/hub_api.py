"""The two Hugging Face hub calls a download needs: the file list of one commit, and one file from an offset.

The token goes in the ``Authorization`` header only. httpx drops that header when a redirect leaves the
hub's origin (large files are served from a CDN through a signed redirect), so the CDN never sees it.
Nothing here puts the token in a message, a URL or an exception.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx

DEFAULT_ENDPOINT = "https://huggingface.co"
TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_USER_AGENT = "inference-gateway-download/0.1"


class DownloadError(Exception):
    """A failure reported as one line (exit code 1), never as a traceback."""


class HubUnreachable(DownloadError):
    """No answer from the hub at all: every other model would fail the same way, so the command stops."""


class Retryable(DownloadError):
    """A failure that another attempt may not see: a cut transfer, 429, 5xx."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class RepoFile:
    path: str
    size: int | None
    blob_id: str | None  # git blob sha1 of the file itself (small files) or of its LFS pointer
    sha256: str | None  # LFS files: the sha256 of the content

    @property
    def etag(self) -> str | None:
        """What identifies this content on the hub; a changed etag at the same size is a changed file."""
        return self.sha256 or self.blob_id


@dataclass(frozen=True)
class Snapshot:
    repo_id: str
    revision: str  # as asked (a branch, tag or commit)
    commit: str  # what it resolved to: every file is fetched from this one commit
    files: tuple[RepoFile, ...]


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def find_token() -> str | None:
    """``HF_TOKEN`` / ``HUGGING_FACE_HUB_TOKEN``, else the file ``huggingface-cli login`` writes."""
    for name in TOKEN_VARS:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    path = os.environ.get("HF_TOKEN_PATH")
    if not path:
        home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
        path = os.path.join(home, "token")
    with contextlib.suppress(OSError, UnicodeDecodeError):
        return Path(path).expanduser().read_text().strip() or None
    return None


def _string(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _parse_files(siblings: object) -> tuple[RepoFile, ...]:
    if not isinstance(siblings, list):
        raise DownloadError("the hub's file list has an unexpected shape")
    files = []
    for entry in siblings:
        path = _string(entry.get("rfilename")) if isinstance(entry, dict) else None
        if path is None:
            raise DownloadError("the hub's file list has an unexpected shape")
        lfs_entry = entry.get("lfs")
        lfs: dict[str, object] = lfs_entry if isinstance(lfs_entry, dict) else {}
        size = lfs.get("size", entry.get("size"))
        files.append(
            RepoFile(
                path=path,
                size=size if isinstance(size, int) else None,
                blob_id=_string(entry.get("blobId")),
                sha256=_string(lfs.get("sha256")),
            )
        )
    return tuple(files)


class Hub:
    def __init__(self, base_url: str | None = None, token: str | None = None, *, timeout: float = 60.0) -> None:
        self.base_url = base_url or endpoint()
        self.host = urlsplit(self.base_url).netloc or self.base_url
        headers = {"user-agent": _USER_AGENT}
        if token:
            headers["authorization"] = f"Bearer {token}"
        self.has_token = bool(token)
        self._client = httpx.Client(
            headers=headers, follow_redirects=True, timeout=httpx.Timeout(timeout, connect=10.0)
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Hub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def unreachable(self, exc: Exception) -> HubUnreachable:
        reason = str(exc) or type(exc).__name__
        return HubUnreachable(f"cannot reach {self.host}: {reason}")

    def snapshot(self, repo_id: str, revision: str) -> Snapshot:
        url = f"{self.base_url}/api/models/{repo_id}/revision/{quote(revision, safe='')}"
        try:
            response = self._client.get(url, params={"blobs": "true"})
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise self.unreachable(exc) from None
        except httpx.HTTPError as exc:
            raise DownloadError(f"{repo_id}: the hub did not answer: {exc or type(exc).__name__}") from None
        self._raise_for_status(response, repo_id, revision)
        try:
            data = response.json()
        except ValueError:
            raise DownloadError(f"{repo_id}: the hub's answer is not JSON (is HF_ENDPOINT right?)") from None
        if not isinstance(data, dict):
            raise DownloadError(f"{repo_id}: the hub's answer has an unexpected shape")
        sha = _string(data.get("sha"))
        commit = sha if sha is not None else revision
        return Snapshot(repo_id, revision, commit, _parse_files(data.get("siblings")))

    @contextlib.contextmanager
    def open(self, snapshot: Snapshot, file: RepoFile, offset: int) -> Iterator[tuple[httpx.Response | None, int]]:
        """The file from ``offset`` on: yields the response and where its body starts (0 when the server
        ignored the range), or ``(None, offset)`` when there is nothing after ``offset`` (HTTP 416)."""
        url = f"{self.base_url}/{snapshot.repo_id}/resolve/{quote(snapshot.commit, safe='')}/{quote(file.path)}"
        headers = {"accept-encoding": "identity"}
        if offset:
            headers["range"] = f"bytes={offset}-"
        try:
            with self._client.stream("GET", url, headers=headers) as response:
                if response.status_code == 416 and offset:
                    yield None, offset
                    return
                self._raise_for_status(response, snapshot.repo_id, snapshot.revision, file.path)
                if response.status_code == 206:
                    content_range = response.headers.get("content-range", "")
                    if not content_range.startswith(f"bytes {offset}-"):
                        raise Retryable(f"{file.path}: the server answered another range than asked")
                    yield response, offset
                else:
                    yield response, 0
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise Retryable(f"{file.path}: {self.unreachable(exc)}") from None
        except httpx.TransportError as exc:  # read error, cut body, timeout mid-transfer
            raise Retryable(f"{file.path}: transfer interrupted: {exc or type(exc).__name__}") from None

    def _raise_for_status(self, response: httpx.Response, repo_id: str, revision: str, path: str | None = None) -> None:
        status = response.status_code
        if status < 400:
            return
        what = f"{repo_id}/{path}" if path else repo_id
        if status in (401, 403):
            hint = (
                "the token has no access to it"
                if self.has_token
                else "it is gated or private: accept its terms on the hub and set HF_TOKEN"
            )
            raise DownloadError(f"{what}: access denied (HTTP {status}); {hint}")
        if status == 404:
            hint = "" if self.has_token else "; a private repository needs HF_TOKEN"
            raise DownloadError(f"{what}: not found at revision {revision!r} (HTTP 404){hint}")
        if status == 429 or status >= 500:
            retry_after = response.headers.get("retry-after", "")
            raise Retryable(
                f"{what}: the hub answered HTTP {status}", float(retry_after) if retry_after.isdigit() else None
            )
        raise DownloadError(f"{what}: the hub answered HTTP {status}")
