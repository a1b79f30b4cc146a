"""The real ``transformers serve`` on CPU, without the gateway, with the tiny demo models.

These pin what the gateway relies on (docs/ENGINES.md §13): the command line and environment, ``/health``
as readiness, the model path as the request's ``model``, the stream's shape and usage, and that a
``data:`` URL image reaches a vision-language model. The weights are random, so answers are noise:
only shape, determinism (greedy decoding) and token counts are checked.

Each engine takes ~10 s to start on two cores (mostly importing torch and transformers); one engine
per model is shared by the module's tests.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

STARTUP_TIMEOUT = 60.0
REQUEST_TIMEOUT = 20.0
STOP_GRACE = 5.0
IMAGE_TOKENS = 4  # (28 px / 14 px patches) ** 2, CLS dropped by the "default" feature strategy


def serve_argv(exe: str, model: Path, port: int) -> list[str]:
    """The command line that works here (and the one ``TransformersAdapter`` builds)."""
    return [exe, "serve", os.path.abspath(model), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]


def serve_env(hub_cache: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache), "TOKENIZERS_PARALLELISM": "false"}


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the engine's process group, then SIGKILL it after a grace period.

    Uvicorn's graceful shutdown waits for open streams to finish; a generation that runs on would hold
    the engine up for as long as it lasts, hence the SIGKILL.
    """
    for sig, wait in ((signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, STOP_GRACE)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(log: Path, n: int = 4000) -> str:
    return log.read_bytes()[-n:].decode(errors="replace") if log.exists() else ""


@contextlib.contextmanager
def transformers_serve(exe: str, model: Path, port: int, hub_cache: Path, log: Path) -> Iterator[str]:
    """Run ``transformers serve`` on ``model`` until ``/health`` answers 200; yield its base URL."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            serve_argv(exe, model, port),
            env=serve_env(hub_cache),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so _stop reaches every child
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        with httpx.Client(timeout=2.0) as client:
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"transformers serve exited with {proc.returncode} while starting:\n{_tail(log)}")
                if time.monotonic() > deadline:
                    pytest.fail(f"transformers serve not healthy after {STARTUP_TIMEOUT:.0f} s:\n{_tail(log)}")
                # The model loads before the server binds: connection refused until then, no 503 phase.
                with contextlib.suppress(httpx.TransportError):
                    r = client.get(f"{base}/health")
                    if r.status_code == 200:
                        assert r.json() == {"status": "ok"}
                        break
                time.sleep(0.2)
        yield base
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def chat_engine(
    transformers_exe: str,
    tiny_chat_model: Path,
    hf_hub_cache: Path,
    free_port: Callable[[], int],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    log = tmp_path_factory.mktemp("engine-logs") / "tiny-chat.log"
    with transformers_serve(transformers_exe, tiny_chat_model, free_port(), hf_hub_cache, log) as base:
        yield base


@pytest.fixture(scope="module")
def vl_engine(
    transformers_exe: str,
    tiny_vl_model: Path,
    hf_hub_cache: Path,
    free_port: Callable[[], int],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    log = tmp_path_factory.mktemp("engine-logs") / "tiny-vl.log"
    with transformers_serve(transformers_exe, tiny_vl_model, free_port(), hf_hub_cache, log) as base:
        yield base


@contextlib.contextmanager
def openai_client(base: str) -> Iterator[Any]:
    openai = pytest.importorskip("openai", reason="the e2e tests need the dev extra (openai)")
    with openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT) as client:
        yield client


def png_data_url(size: tuple[int, int] = (64, 48)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (220, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_chat_non_stream_and_stream_agree(chat_engine: str, tiny_chat_model: Path) -> None:
    model = os.path.abspath(tiny_chat_model)  # a local folder is addressed by its path
    messages = [{"role": "user", "content": "Hello there"}]
    with openai_client(chat_engine) as client:
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=6)
        assert reply.object == "chat.completion"
        assert reply.model == f"{model}@main"
        choice = reply.choices[0]
        assert choice.message.role == "assistant"
        assert choice.message.content  # random but printable (demo_model suppresses the rest)
        assert reply.usage is not None and reply.usage.prompt_tokens > 0
        assert reply.usage.completion_tokens <= 6
        assert (choice.finish_reason == "length") == (reply.usage.completion_tokens == 6)

        chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=6, stream=True))

    # Shape: a role-only chunk, content chunks, then one chunk with finish_reason and usage (sent even
    # without stream_options). transformers 5.23 sends no "data: [DONE]" (the SDK stops at EOF).
    assert chunks[0].choices[0].delta.role == "assistant"
    assert not chunks[0].choices[0].delta.content
    last = chunks[-1]
    assert last.choices[0].finish_reason == choice.finish_reason
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (
        reply.usage.prompt_tokens,
        reply.usage.completion_tokens,
    )
    assert all(c.choices[0].finish_reason is None and c.usage is None for c in chunks[:-1])
    assert all(c.model == f"{model}@main" for c in chunks)
    # Greedy decoding: the streamed text is the non-streamed text.
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content


def test_chat_list_content_and_completions(chat_engine: str, tiny_chat_model: Path) -> None:
    model = os.path.abspath(tiny_chat_model)
    with openai_client(chat_engine) as client:
        as_string = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hello there"}], max_tokens=3
        )
        as_parts = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}],
            max_tokens=3,
        )
        assert as_parts.choices[0].message.content == as_string.choices[0].message.content
        assert as_parts.usage is not None and as_string.usage is not None
        assert as_parts.usage.prompt_tokens == as_string.usage.prompt_tokens

        completion = client.completions.create(model=model, prompt="Hello", max_tokens=3)
        assert completion.object == "text_completion"
        assert completion.usage is not None and completion.usage.completion_tokens <= 3


def test_engine_rejects_another_model_name(chat_engine: str) -> None:
    # Pinned to its path: any other name is a 400 in FastAPI's shape (the gateway reshapes it).
    r = httpx.post(
        f"{chat_engine}/v1/chat/completions",
        json={"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
        timeout=REQUEST_TIMEOUT,
    )
    assert r.status_code == 400
    assert "pinned" in r.json()["detail"]


def test_vl_counts_image_tokens(vl_engine: str, tiny_vl_model: Path) -> None:
    model = os.path.abspath(tiny_vl_model)
    url = png_data_url()
    question = {"type": "text", "text": "What is in this image?"}
    with openai_client(vl_engine) as client:
        text_only = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": [question]}], max_tokens=3
        )
        with_image = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, question]}],
            max_tokens=3,
        )
        streamed = list(
            client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, question]}],
                max_tokens=3,
                stream=True,
            )
        )
    assert text_only.usage is not None and with_image.usage is not None
    # The template renders "<image>\n"; the processor expands <image> to the patch tokens.
    assert with_image.usage.prompt_tokens == text_only.usage.prompt_tokens + IMAGE_TOKENS + 1
    assert with_image.choices[0].message.content
    assert streamed[-1].usage is not None
    assert streamed[-1].usage.prompt_tokens == with_image.usage.prompt_tokens


def test_adapter_builds_this_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway's adapter spawns what these tests verified (its executable aside)."""
    from engines.adapters import adapter_for
    from engines.spec import ModelSpec

    model = tmp_path / "m"
    model.mkdir()
    spec = ModelSpec(name="tiny-chat", engine="transformers", model=str(model))
    adapter = adapter_for("transformers")
    argv = adapter.argv(spec, "127.0.0.1", 8123)
    assert argv[1:] == serve_argv("transformers", model, 8123)[1:]
    assert adapter.request_model(spec) == os.path.abspath(model)
    env = adapter.env(spec)
    assert env["HF_HUB_OFFLINE"] == "1" and env["TOKENIZERS_PARALLELISM"] == "false"
