"""``gateway download`` against a fake hub on 127.0.0.1: file list, files, Range, cut transfers, a CDN.

The fake hub answers the two calls the command makes (``/api/models/{id}/revision/{rev}?blobs=true`` and
``/{id}/resolve/{commit}/{path}``) in the hub's shapes. LFS files are redirected to a second server (another
origin, like the hub's CDN), which must never see the token. Both record every request.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import yaml

from gateway.cli import main
from tests.helpers import REPO, free_port

TOKEN = "hf_CANARYtokenDoNotLeak0123456789"


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


@dataclass
class Repo:
    files: dict[str, bytes]
    lfs: set[str] = field(default_factory=set)
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    gated: bool = False


@dataclass
class Seen:
    server: str
    path: str
    headers: dict[str, str]


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.seen: list[Seen] = []
        self.cuts: dict[str, list[int]] = {}  # file path → cut the next transfers after this many body bytes
        self.ignore_range = False
        self.hub = self._server("hub")
        self.cdn = self._server("cdn")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.hub.server_port}"

    def _server(self, name: str) -> ThreadingHTTPServer:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake.seen.append(Seen(name, self.path, {k.lower(): v for k, v in self.headers.items()}))
                fake.answer(name, self)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return server

    def close(self) -> None:
        for server in (self.hub, self.cdn):
            server.shutdown()
            server.server_close()

    def requests(self, server: str, part: str = "") -> list[Seen]:
        return [s for s in self.seen if s.server == server and part in s.path]

    # -- answers ------------------------------------------------------------------------------------

    def answer(self, server: str, h: BaseHTTPRequestHandler) -> None:
        path = unquote(urlsplit(h.path).path)
        if server == "cdn":
            sha = path.removeprefix("/blobs/")
            for repo in self.repos.values():
                for name, data in repo.files.items():
                    if hashlib.sha256(data).hexdigest() == sha:
                        return self._file(h, name, data)
            return self._send(h, 404, b"{}")
        if path.startswith("/api/models/"):
            repo_id, _, _revision = path.removeprefix("/api/models/").partition("/revision/")
            repo = self.repos.get(repo_id)
            if repo is None:
                return self._send(h, 404, b'{"error":"Repository not found"}')
            if repo.gated and h.headers.get("authorization") != f"Bearer {TOKEN}":
                return self._send(h, 401, b'{"error":"Access to model is restricted."}')
            return self._send(
                h,
                200,
                json.dumps(
                    {
                        "id": repo_id,
                        "sha": repo.commit,
                        "siblings": [self._sibling(repo, name, data) for name, data in repo.files.items()],
                    }
                ).encode(),
            )
        org, name, rest = path.lstrip("/").split("/", 2)
        _, commit, file_path = rest.split("/", 2)
        repo = self.repos[f"{org}/{name}"]
        if repo.gated and h.headers.get("authorization") != f"Bearer {TOKEN}":
            return self._send(h, 401, b"{}")
        if commit != repo.commit or file_path not in repo.files:
            return self._send(h, 404, b"{}")
        data = repo.files[file_path]
        if file_path in repo.lfs:
            location = f"http://127.0.0.1:{self.cdn.server_port}/blobs/{hashlib.sha256(data).hexdigest()}"
            return self._send(h, 302, b"", {"location": location})
        return self._file(h, file_path, data)

    @staticmethod
    def _sibling(repo: Repo, name: str, data: bytes) -> dict[str, Any]:
        if name in repo.lfs:
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\n"
            return {
                "rfilename": name,
                "size": len(data),
                "blobId": _git_blob_id(pointer.encode()),
                "lfs": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 120},
            }
        return {"rfilename": name, "size": len(data), "blobId": _git_blob_id(data)}

    def _file(self, h: BaseHTTPRequestHandler, name: str, data: bytes) -> None:
        start = 0
        ranged = h.headers.get("range", "")
        if ranged.startswith("bytes=") and ranged.endswith("-") and not self.ignore_range:
            start = int(ranged[6:-1])
            if start >= len(data):
                return self._send(h, 416, b"", {"content-range": f"bytes */{len(data)}"})
        body = data[start:]
        status = 206 if start else 200
        headers = {"content-range": f"bytes {start}-{len(data) - 1}/{len(data)}"} if start else {}
        cuts = self.cuts.get(name)
        if cuts:
            # Promise the whole body, send part of it, drop the connection: a transfer cut mid-file.
            cut = cuts.pop(0)
            self._send(h, status, body[:cut], {**headers, "content-length": str(len(body))}, close=True)
            return
        self._send(h, status, body, headers)

    @staticmethod
    def _send(
        h: BaseHTTPRequestHandler,
        status: int,
        body: bytes,
        headers: dict[str, str] | None = None,
        *,
        close: bool = False,
    ) -> None:
        h.send_response(status)
        headers = {"content-length": str(len(body)), **(headers or {})}
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)
        h.wfile.flush()
        if close:
            h.close_connection = True


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    fake = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no token file from the machine running the tests
    monkeypatch.setattr("gateway.commands.download.transfer.BACKOFF_S", 0.01)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE", "GATEWAY_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    yield fake
    fake.close()


WEIGHTS = os.urandom(300_000)


def _tiny(**kwargs: Any) -> Repo:
    return Repo(
        {
            "config.json": b'{"architectures": ["LlamaForCausalLM"]}',
            "model.safetensors": WEIGHTS,
            "pytorch_model.bin": b"duplicate weights" * 100,
            "tokenizer/tokenizer.json": b'{"version": "1.0"}',
        },
        lfs={"model.safetensors", "pytorch_model.bin"},
        **kwargs,
    )


def _download(*args: str) -> int:
    return main(["download", "--retries", "2", *args])


def test_downloads_checks_and_skips_finished_files_on_a_second_run(
    hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hub.repos["org/tiny"] = _tiny()
    assert _download("--model", "org/tiny", "--path", str(tmp_path / "m")) == 0
    folder = tmp_path / "m" / "tiny"
    assert (folder / "model.safetensors").read_bytes() == WEIGHTS
    assert (folder / "tokenizer" / "tokenizer.json").read_bytes() == b'{"version": "1.0"}'
    assert not (folder / "pytorch_model.bin").exists()  # the same weights again, in a format engines skip
    assert not list(folder.rglob("*.incomplete"))
    # Files come from the commit the revision resolved to, not from a moving branch.
    assert all(f"/resolve/{_tiny().commit}/" in s.path for s in hub.requests("hub", "/resolve/"))
    out = capsys.readouterr().out
    assert "3 files" in out and "0 already there" in out and "done" in out

    before = len(hub.seen)
    assert _download("--model", "org/tiny", "--path", str(tmp_path / "m")) == 0
    assert [s.path for s in hub.seen[before:]] == ["/api/models/org/tiny/revision/main?blobs=true"]
    assert "3 already there" in capsys.readouterr().out


def test_a_cut_transfer_resumes_with_range_in_the_same_run(hub: FakeHub, tmp_path: Path) -> None:
    hub.repos["org/tiny"] = _tiny()
    hub.cuts["model.safetensors"] = [100_000, 50_000]
    assert _download("--model", "org/tiny", "--path", str(tmp_path)) == 0
    assert (tmp_path / "tiny" / "model.safetensors").read_bytes() == WEIGHTS
    ranges = [s.headers.get("range") for s in hub.requests("cdn")]
    assert ranges == [None, "bytes=100000-", "bytes=150000-"]


def test_an_interrupted_run_leaves_a_partial_file_that_the_next_run_resumes(
    hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hub.repos["org/tiny"] = _tiny()
    hub.cuts["model.safetensors"] = [120_000]
    assert main(["download", "--retries", "0", "--model", "org/tiny", "--path", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "run the command again to resume" in err and "Traceback" not in err
    part = tmp_path / "tiny" / "model.safetensors.incomplete"
    assert part.stat().st_size == 120_000 and not (tmp_path / "tiny" / "model.safetensors").exists()

    assert _download("--model", "org/tiny", "--path", str(tmp_path)) == 0
    assert hub.requests("cdn")[-1].headers.get("range") == "bytes=120000-"
    assert (tmp_path / "tiny" / "model.safetensors").read_bytes() == WEIGHTS and not part.exists()
    assert "resumed" in capsys.readouterr().out


def test_a_server_that_ignores_range_gets_the_whole_file_again(hub: FakeHub, tmp_path: Path) -> None:
    hub.repos["org/tiny"] = _tiny()
    hub.ignore_range = True
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "model.safetensors.incomplete").write_bytes(WEIGHTS[:1000])
    assert _download("--model", "org/tiny", "--path", str(tmp_path)) == 0
    assert (tmp_path / "tiny" / "model.safetensors").read_bytes() == WEIGHTS


def test_a_corrupt_partial_file_fails_the_hash_and_is_fetched_again(hub: FakeHub, tmp_path: Path) -> None:
    hub.repos["org/tiny"] = _tiny()
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "model.safetensors.incomplete").write_bytes(b"\0" * 1000)
    assert _download("--model", "org/tiny", "--path", str(tmp_path)) == 0
    assert (tmp_path / "tiny" / "model.safetensors").read_bytes() == WEIGHTS
    assert [s.headers.get("range") for s in hub.requests("cdn")] == ["bytes=1000-", None]


def test_a_file_changed_on_the_hub_at_the_same_size_is_fetched_again(hub: FakeHub, tmp_path: Path) -> None:
    hub.repos["org/tiny"] = _tiny()
    assert _download("--model", "org/tiny", "--path", str(tmp_path)) == 0
    new = bytes(reversed(WEIGHTS))
    hub.repos["org/tiny"] = Repo({**_tiny().files, "model.safetensors": new}, lfs=_tiny().lfs, commit="f" * 40)
    assert _download("--model", "org/tiny", "--path", str(tmp_path)) == 0
    assert (tmp_path / "tiny" / "model.safetensors").read_bytes() == new
    assert len(hub.requests("cdn")) == 2  # only the changed file came again


def test_the_token_goes_to_the_hub_only_and_is_never_printed(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    hub.repos["org/gated"] = _tiny(gated=True)
    assert _download("--model", "org/gated", "--path", str(tmp_path)) == 1
    err = capsys.readouterr().err
    assert "access denied (HTTP 401)" in err and "HF_TOKEN" in err

    monkeypatch.setenv("HF_TOKEN", "hf_wrongWrongWrong")
    assert _download("--model", "org/gated", "--path", str(tmp_path)) == 1
    captured = capsys.readouterr()
    assert "the token has no access" in captured.err and "hf_wrong" not in captured.out + captured.err

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert _download("--model", "org/gated", "--path", str(tmp_path)) == 0
    assert hub.requests("hub", "/resolve/")[-1].headers["authorization"] == f"Bearer {TOKEN}"
    assert hub.requests("cdn") and all("authorization" not in s.headers for s in hub.requests("cdn"))
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err
    assert not any(TOKEN in p.read_text(errors="replace") for p in (tmp_path / "gated").glob(".gateway-*"))


def test_the_legacy_token_variable_and_the_login_file_work(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.repos["org/gated"] = _tiny(gated=True)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", TOKEN)
    assert _download("--model", "org/gated", "--path", str(tmp_path / "a")) == 0
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN")
    (tmp_path / "hf-home").mkdir()
    (tmp_path / "hf-home" / "token").write_text(TOKEN + "\n")
    assert _download("--model", "org/gated", "--path", str(tmp_path / "b")) == 0


def test_all_takes_the_configs_hub_ids_into_models_dir(
    hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hub.repos["org/tiny"] = _tiny()
    hub.repos["other/vl"] = Repo(
        {"config.json": b"{}", "weights.safetensors": b"w" * 5000}, lfs={"weights.safetensors"}
    )
    local = tmp_path / "local-model"
    local.mkdir()
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "models_dir": str(tmp_path / "models"),
                "models": {
                    "chat": {"engine": "vllm", "model": "org/tiny"},
                    "vl": {"engine": "lmdeploy", "model": "other/vl", "args": {"revision": "v1"}},
                    "mine": {"engine": "vllm", "model": str(local)},
                    "remote": {"engine": "openai", "url": "http://10.0.0.5:8000/v1", "model": "x/y"},
                },
            }
        )
    )
    assert _download("--all", "--config", str(config)) == 0
    assert (tmp_path / "models" / "tiny" / "model.safetensors").read_bytes() == WEIGHTS
    assert (tmp_path / "models" / "vl" / "weights.safetensors").exists()
    assert hub.requests("hub", "/api/models/other/vl/revision/v1")
    out = capsys.readouterr().out
    assert "skipped: mine, remote" in out


def test_bad_requests_fail_with_one_line(hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _download("--model", "org/missing", "--path", str(tmp_path)) == 1
    assert "org/missing: not found" in capsys.readouterr().err
    assert _download("--model", "a/same", "b/same", "--path", str(tmp_path)) == 2
    assert "would both go into" in capsys.readouterr().err
    assert _download("--model", "not-a-hub-id", "--path", str(tmp_path)) == 2
    assert _download("--path", str(tmp_path)) == 2
    hub.repos["org/evil"] = Repo({"../../escape.txt": b"x", "ok.json": b"{}"})
    assert _download("--model", "org/evil", "--path", str(tmp_path / "m")) == 1
    assert "outside the repository folder" in capsys.readouterr().err
    assert not (tmp_path / "escape.txt").exists()


def test_an_unreachable_hub_is_one_line_and_exit_code_1(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "download", "--model", "org/tiny", "--path", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        env={**env, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path)},
    )
    assert done.returncode == 1
    assert done.stderr.startswith(f"gateway download: cannot reach 127.0.0.1:{port}: "), done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1


def test_files_put_there_by_hand_are_hashed_once_and_kept_or_replaced(
    hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hub.repos["org/tiny"] = _tiny()
    folder = tmp_path / "tiny"
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(WEIGHTS)  # right content: kept
    (folder / "config.json").write_bytes(b"x" * len(_tiny().files["config.json"]))  # right size, wrong content
    assert _download("--model", "org/tiny", "--path", str(tmp_path)) == 0
    assert "checking 2 file(s)" in capsys.readouterr().out
    assert not hub.requests("cdn")  # the weights were not fetched again
    assert sorted(s.path.rsplit("/", 1)[-1] for s in hub.requests("hub", "/resolve/")) == [
        "config.json",
        "tokenizer.json",
    ]
    assert (folder / "config.json").read_bytes() == _tiny().files["config.json"]
