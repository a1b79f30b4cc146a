"""Helpers for tests that launch the stand-ins: PATH, ports, readiness, and leaving no process behind.

Every launch gets its own session (process group) and a ``STANDIN_TAG`` in its environment, which its
children inherit; ``Proc.kill`` SIGKILLs the group and then every process still carrying the tag, so orphans
that left the group (the ``setsid`` fault) or outlived their parent (vLLM's EngineCore) are found too.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

STANDIN_DIR = Path(__file__).resolve().parent
VLLM = STANDIN_DIR / "vllm"
LMDEPLOY = STANDIN_DIR / "lmdeploy"
TAG_VAR = "STANDIN_TAG"


def standin_path(path: str | None = None) -> str:
    """``PATH`` with the stand-ins first and this interpreter's bin next, so ``vllm`` and ``python3`` resolve here."""
    parts = [str(STANDIN_DIR), str(Path(sys.executable).parent), path if path is not None else os.environ["PATH"]]
    return os.pathsep.join(parts)


def faults_text(faults: str | Mapping[str, Any] | None) -> str:
    if faults is None or isinstance(faults, str):
        return faults or ""
    return ",".join(k if v is True else f"{k}={v}" for k, v in faults.items() if v is not False)


def standin_env(
    faults: str | Mapping[str, Any] | None = None,
    *,
    faults_file: str | os.PathLike[str] | None = None,
    record: str | os.PathLike[str] | None = None,
    tag: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STANDIN_") and k != "VLLM_API_KEY"}
    env["PATH"] = standin_path(env.get("PATH", ""))
    env[TAG_VAR] = tag or uuid.uuid4().hex
    if faults:
        env["STANDIN_FAULTS"] = faults_text(faults)
    if faults_file:
        env["STANDIN_FAULTS_FILE"] = str(faults_file)
    if record:
        env["STANDIN_RECORD"] = str(record)
    env.update(extra or {})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pids_where(test: Any) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if test(int(entry)):
                    out.append(int(entry))
    return out


def tagged_pids(tag: str) -> list[int]:
    needle = f"{TAG_VAR}={tag}".encode()

    def has(pid: int) -> bool:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return needle in fh.read().split(b"\0")

    return _pids_where(has)


def group_pids(pgid: int) -> list[int]:
    def member(pid: int) -> bool:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
        fields = stat[stat.rindex(b")") + 2 :].split()
        return int(fields[2]) == pgid and fields[0] != b"Z"

    return _pids_where(member)


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 :][:1] != b"Z"


class Proc:
    """One launched stand-in: output in temp files (a full pipe must never stall it), killable as a tree."""

    def __init__(self, argv: list[str], env: Mapping[str, str], port: int = 0) -> None:
        self.tag = env.get(TAG_VAR) or ""
        self.port = port
        self.record_path = env.get("STANDIN_RECORD")
        self._out = tempfile.TemporaryFile()
        self._err = tempfile.TemporaryFile()
        self._final = ("", "")
        self.popen = subprocess.Popen(
            argv, env=dict(env), stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err, start_new_session=True
        )
        self.pid = self.popen.pid

    def stdout(self) -> str:
        if self._out.closed:
            return self._final[0]
        self._out.seek(0)
        return self._out.read().decode(errors="replace")

    def stderr(self) -> str:
        if self._err.closed:
            return self._final[1]
        self._err.seek(0)
        return self._err.read().decode(errors="replace")

    def output(self) -> str:
        return self.stdout() + self.stderr()

    def records(self, event: str | None = None) -> list[dict[str, Any]]:
        """The lines of ``STANDIN_RECORD`` so far (``event``: only those of that kind)."""
        return read_records(self.record_path, event) if self.record_path else []

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def wait_http(self, port: int, path: str = "/health", timeout: float = 10.0, status: int = 200) -> float:
        """Poll until ``path`` answers ``status``; returns the seconds it took. Fails fast if the process exits."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.popen.poll() is not None:
                raise AssertionError(f"stand-in exited {self.popen.returncode}:\n{self.output()[-3000:]}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                if get(port, path, timeout=1.0)[0] == status:
                    return time.monotonic() - start
            time.sleep(0.02)
        raise AssertionError(f"{path} did not answer {status} within {timeout}s:\n{self.output()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the group and every tagged straggler, then reap. Safe to call twice."""
        for _ in range(3):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            for pid in tagged_pids(self.tag) if self.tag else []:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(5)
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline and (group_pids(self.pid) or (self.tag and tagged_pids(self.tag))):
                time.sleep(0.02)
            if not group_pids(self.pid) and not (self.tag and tagged_pids(self.tag)):
                break
        if not self._out.closed:
            self._final = (self.stdout(), self.stderr())  # still readable after kill
            self._out.close()
            self._err.close()

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def launch(engine: str, args: list[str], env: Mapping[str, str] | None = None, port: int = 0) -> Proc:
    """``engine`` is "vllm" or "lmdeploy"; ``args`` what follows the executable (``serve MODEL ...``)."""
    exe = {"vllm": VLLM, "lmdeploy": LMDEPLOY}[engine]
    return Proc([sys.executable, str(exe), *args], env if env is not None else standin_env(), port)


def serve_args(engine: str, port: int, name: str = "m1", *aliases: str, model: str = "org/model") -> list[str]:
    """The command line the gateway's adapters build (engines/adapters/*.py), minus the executable."""
    if engine == "vllm":
        return ["serve", model, "--served-model-name", name, *aliases, "--host", "127.0.0.1", "--port", str(port)]
    return [
        "serve",
        "api_server",
        model,
        "--server-name",
        "127.0.0.1",
        "--server-port",
        str(port),
        "--model-name",
        name,
    ]


def read_records(path: str | os.PathLike[str], event: str | None = None) -> list[dict[str, Any]]:
    """The lines a stand-in wrote to its ``STANDIN_RECORD`` file (none yet: []); ``event``: of that kind only.
    The gateway's own ``/v1/models`` identity checks are left out: they are not what a client sent."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [r for r in rows if (event is None or r["event"] == event) and r.get("path") != "/v1/models"]


def write_faults(path: str | os.PathLike[str], faults: Mapping[str, Any]) -> None:
    """Replace a ``STANDIN_FAULTS_FILE`` atomically, so a running stand-in never reads half of it."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(dict(faults), fh)
    os.replace(tmp, path)


def raw_request(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 5.0,
    read: bool = True,
    total: float | None = None,
) -> bytes | socket.socket:
    """One HTTP/1.1 request on a bare socket; returns every byte until EOF, ``timeout`` seconds of silence or
    ``total`` seconds in all (no parsing, so a cut stream shows exactly where it was cut), or the open socket
    when ``read`` is False."""
    data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else (body or b"")
    head = [
        f"{method} {path} HTTP/1.1",
        f"host: 127.0.0.1:{port}",
        f"content-length: {len(data)}",
        "content-type: application/json",
        "connection: close",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
    if not read:
        return sock
    chunks = []
    end = time.monotonic() + total if total is not None else None
    with sock:
        with contextlib.suppress(TimeoutError, ConnectionError):
            while end is None or time.monotonic() < end:
                if end is not None:
                    sock.settimeout(max(0.01, min(timeout, end - time.monotonic())))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
    return b"".join(chunks)


def get(port: int, path: str, headers: Mapping[str, str] | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=dict(headers or {}))
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@contextlib.contextmanager
def post(
    port: int, path: str, body: bytes, headers: Mapping[str, str] | None = None, timeout: float = 5.0
) -> Iterator[http.client.HTTPResponse]:
    """POST and yield the response unread, for streaming; the connection is closed on exit."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"content-type": "application/json", **(headers or {})})
        yield conn.getresponse()
    finally:
        conn.close()
