"""Sleep mode: vLLM 0.32's dev-mode /sleep, /wake_up, /is_sleeping (and /collective_rpc), LMDeploy 0.18's
/sleep, /wakeup, /is_sleeping, as their code does them (a GPU host's behaviour; nothing is freed here).

vLLM (``entrypoints/serve/dev/sleep/api_router.py``, ``v1/engine/core.py``): the routes exist only with
``VLLM_SERVER_DEV_MODE=1`` (404 otherwise). ``POST /sleep?level=0..2&mode=abort|wait|keep`` pauses the
scheduler (``abort``: requests in flight end with ``finish_reason: "abort"``; ``wait``: they finish first;
``keep``: they stop where they are until the wake), then at level ≥1 sleeps the executor, and answers
``{"status":"sleeping","level":N}``; a bad level or mode is vLLM's 400 (its RequestValidationError handler,
not FastAPI's 422). While paused, new requests are taken and held until the wake; ``/health`` stays 200.
``POST /wake_up[?tags=…]`` answers ``{"status":"awake"|"sleeping","tags":…}`` and resumes the scheduler once
nothing sleeps. ``GET /is_sleeping``: paused or asleep. Without ``--enable-sleep-mode`` a CUDA vLLM's sleep
still answers 200 but frees nothing (its cumem allocator holds no allocation): the log says so.

LMDeploy (``serve/openai/endpoints/management.py``, ``serve/core/async_engine.py``): ``POST /sleep?level=1|2``
(400 otherwise; 400 without ``Content-Type: application/json``) aborts every session and answers an empty
200; while asleep ``EngineSleepingMiddleware`` answers the inference routes 503 before the key is checked,
and ``/health`` is 200 ``{"status":"sleeping"}``. ``POST /wakeup[?tags=…]`` answers an empty 200.

Faults: ``sleep-delay``/``wake-delay`` (seconds the call takes), ``sleep-fails``/``wake-fails`` (it answers
500 and nothing changes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from _faults import emit
from _http import ClientGone, Request, Response
from _openai import error_body

if TYPE_CHECKING:
    from _engine import App

VLLM_ROUTES: dict[str, tuple[str, ...]] = {
    "/sleep": ("POST",),
    "/wake_up": ("POST",),
    "/is_sleeping": ("GET",),
    "/collective_rpc": ("POST",),
}
LMDEPLOY_ROUTES: dict[str, tuple[str, ...]] = {"/sleep": ("POST",), "/wakeup": ("POST",), "/is_sleeping": ("GET",)}
# EngineSleepingMiddleware.DEFAULT_PROTECTED_INFERENCE_ROUTES
LMDEPLOY_GUARDED = frozenset(
    {
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/responses"),
        ("POST", "/v1/messages"),
        ("POST", "/generate"),
    }
)
LMDEPLOY_SLEEPING = "Engine is sleeping; call POST /wakeup before inference (e.g. tags=weights&tags=kv_cache)."
SLEEP_TAGS = frozenset({"weights", "kv_cache"})  # v1/executor/abstract.py
PAUSE_MODES = ("abort", "wait", "keep")


@dataclass
class Sleep:
    """The engine's sleep state. ``awake`` is set while the scheduler runs (vLLM) / while not asleep (LMDeploy)."""

    awake: asyncio.Event = field(default_factory=asyncio.Event)
    tags: set[str] = field(default_factory=set)  # vLLM: the executor's sleeping tags
    level: int | None = None
    frozen: bool = False  # vLLM mode=keep: requests in flight stop until the wake
    abort: asyncio.Event = field(default_factory=asyncio.Event)  # set (and replaced) when a sleep aborts
    active: set[Response] = field(default_factory=set)  # requests the engine is working on (past the gate)

    def __post_init__(self) -> None:
        self.awake.set()

    @property
    def sleeping(self) -> bool:
        return not self.awake.is_set() or bool(self.tags)

    def abort_in_flight(self) -> None:
        self.abort.set()
        self.abort = asyncio.Event()


async def until(app: App, resp: Response, event: asyncio.Event) -> None:
    """Wait for ``event``; ClientGone when the client leaves, Aborted on vLLM's shutdown abort or a sleep's."""
    from _engine import Aborted

    while not event.is_set():
        waits = [resp.gone, app.s.abort, event] + ([resp.sleep_abort] if resp.sleep_abort else [])
        tasks = [asyncio.ensure_future(e.wait()) for e in waits]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
        if resp.gone.is_set():
            raise ClientGone
        if app.s.abort.is_set() or (resp.sleep_abort is not None and resp.sleep_abort.is_set()):
            raise Aborted


async def gate(app: App, resp: Response) -> None:
    """The request reaches the engine: held while it is paused (vLLM queues new requests until the wake)."""
    sleep = app.s.sleep
    if resp in sleep.active:
        return
    await until(app, resp, sleep.awake)
    resp.sleep_abort = sleep.abort
    sleep.active.add(resp)


async def frozen(app: App, resp: Response) -> float:
    """mode=keep: a request in flight waits for the wake; the seconds it waited."""
    sleep = app.s.sleep
    if not sleep.frozen or sleep.awake.is_set():
        return 0.0
    loop = asyncio.get_running_loop()
    began = loop.time()
    await until(app, resp, sleep.awake)
    return loop.time() - began


def guarded(app: App, req: Request) -> bool:
    """LMDeploy: an inference route while asleep is refused by its middleware (before auth)."""
    return not app.vllm and app.s.sleep.sleeping and (req.method, req.path) in LMDEPLOY_GUARDED


async def refuse_asleep(app: App, req: Request, resp: Response) -> None:
    if req.path.startswith("/v1/messages"):
        body: dict[str, Any] = {"type": "error", "error": {"type": "overloaded_error", "message": LMDEPLOY_SLEEPING}}
    elif req.path.startswith("/v1/responses"):
        body = {"error": {"message": LMDEPLOY_SLEEPING, "type": "server_error", "param": None, "code": 503}}
    else:
        body = error_body("lmdeploy", 503, LMDEPLOY_SLEEPING)
    await resp.send(503, json.dumps(body, separators=(",", ":")).encode(), "application/json")


async def serve(app: App, req: Request, resp: Response, path: str, faults: dict[str, Any]) -> None:
    if app.vllm:
        if path == "/sleep":
            await _vllm_sleep(app, req, resp, faults)
        elif path == "/wake_up":
            await _vllm_wake(app, req, resp, faults)
        elif path == "/is_sleeping":
            await _json(resp, 200, {"is_sleeping": app.s.sleep.sleeping})
        else:
            await _collective_rpc(app, req, resp)
        return
    if path == "/is_sleeping":
        await _json(resp, 200, {"is_sleeping": app.s.sleep.sleeping})
        return
    ctype = (req.header("content-type") or "").split(";")[0].strip().lower()
    if ctype != "application/json":  # validate_json_request, through LMDeploy's validation handler
        msg = "Unsupported Media Type: Only 'application/json' is allowed"
        await _json(resp, 400, error_body("lmdeploy", 400, msg))
    elif path == "/sleep":
        await _lmdeploy_sleep(app, req, resp, faults)
    else:
        await _lmdeploy_wake(app, req, resp, faults)


# ---- vLLM ----------------------------------------------------------------------------------------------------
async def _vllm_sleep(app: App, req: Request, resp: Response, faults: dict[str, Any]) -> None:
    query = parse_qs(req.query, keep_blank_values=True)
    level_text, mode = query.get("level", ["1"])[-1], query.get("mode", ["abort"])[-1]
    errors: list[dict[str, Any]] = []
    level = 1
    try:
        level = int(level_text)
    except ValueError:
        msg = "Input should be a valid integer, unable to parse string as an integer"
        errors.append({"type": "int_parsing", "loc": "query.level", "msg": msg, "input": level_text})
    else:
        if level < 0:
            msg = "Input should be greater than or equal to 0"
            errors.append(
                {"type": "greater_than_equal", "loc": "query.level", "msg": msg, "input": level_text, "ctx": {"ge": 0}}
            )
        elif level > 2:
            msg = "Input should be less than or equal to 2"
            errors.append(
                {"type": "less_than_equal", "loc": "query.level", "msg": msg, "input": level_text, "ctx": {"le": 2}}
            )
    if mode not in PAUSE_MODES:
        expected = "'abort', 'wait' or 'keep'"
        errors.append(
            {
                "type": "literal_error",
                "loc": "query.mode",
                "msg": f"Input should be {expected}",
                "input": mode,
                "ctx": {"expected": expected},
            }
        )
    if errors:  # vLLM's validation_exception_handler: 400, its "N validation error(s):" text, param = loc
        text = f"{len(errors)} validation error{'s' if len(errors) > 1 else ''}:\n"
        text += "".join(f"  {e}\n" for e in errors)
        body = error_body("vllm", 400, text.rstrip(), errors[0]["loc"], "Bad Request")
        await _json(resp, 400, body)
        return
    await asyncio.sleep(float(faults.get("sleep-delay", 0)))
    if faults.get("sleep-fails"):
        await _json(resp, 500, _vllm_500("Call to sleep method failed: stand-in fault sleep-fails"))
        return
    sleep = app.s.sleep
    sleep.awake.clear()  # pause_scheduler: new requests are queued from here on
    if mode == "abort":
        sleep.abort_in_flight()
    elif mode == "wait":
        while sleep.active:  # noqa: ASYNC110 (requests end on their own schedule)
            await asyncio.sleep(0.01)
    else:
        sleep.frozen = True
    if level >= 1:
        if "weights" in sleep.tags:
            _log(app, "WARNING", "abstract.py", "Executor is already sleeping.")
        else:
            sleep.tags |= SLEEP_TAGS
            freed = "0.00" if not app.cfg.sleep_mode else "0.50"
            _log(app, "INFO", "gpu_worker.py", f"Sleep mode freed {freed} GiB memory, 0.10 GiB memory is still in use.")
    sleep.level = level
    app.s.record("sleep", level=level, mode=mode, frees_memory=app.cfg.sleep_mode and level >= 1)
    await _json(resp, 200, {"status": "sleeping", "level": level})


async def _vllm_wake(app: App, req: Request, resp: Response, faults: dict[str, Any]) -> None:
    tags: list[str] | None = parse_qs(req.query).get("tags") or None
    await asyncio.sleep(float(faults.get("wake-delay", 0)))
    if faults.get("wake-fails"):
        await _json(resp, 500, _vllm_500("Call to wake_up method failed: stand-in fault wake-fails"))
        return
    sleep = app.s.sleep
    wanted = None if tags is None else [t for t in tags if t != "scheduling"]
    if wanted is None or wanted:
        if not sleep.tags:
            _log(app, "WARNING", "abstract.py", "Executor is not sleeping.")
        elif wanted and any(t not in sleep.tags for t in wanted):
            _log(app, "WARNING", "abstract.py", f"Tag {wanted} is not in sleeping tags {sorted(sleep.tags)}")
        else:
            sleep.tags -= set(wanted or sleep.tags)
    fully_awake = not sleep.tags
    if fully_awake:  # resume_scheduler: the queued requests go on
        sleep.level = None
        sleep.frozen = False
        sleep.awake.set()
    app.s.record("wake", tags=tags, awake=fully_awake)
    await _json(resp, 200, {"status": "awake" if fully_awake else "sleeping", "tags": tags})


async def _collective_rpc(app: App, req: Request, resp: Response) -> None:
    try:
        body = json.loads(req.body or b"null")
    except ValueError as exc:
        await _json(resp, 400, error_body("vllm", 400, f"JSON decode error: {exc}", None, "Bad Request"))
        return
    if not isinstance(body, dict) or body.get("method") is None:
        text = "Missing 'method' in request body" if isinstance(body, dict) else "Request body must be a JSON object"
        await _json(resp, 400, error_body("vllm", 400, text, None, "Bad Request"))
        return
    if body["method"] != "reload_weights":  # the one worker method the stand-in has
        msg = f"Call to collective_rpc method failed: 'Worker' object has no attribute {body['method']!r}"
        await _json(resp, 500, _vllm_500(msg))
        return
    app.s.record("reload_weights")
    await _json(resp, 200, {"results": [None] * app.cfg.tp * app.cfg.pp})


def _vllm_500(message: str) -> dict[str, Any]:
    return error_body("vllm", 500, message, None, "InternalServerError")


# ---- LMDeploy ------------------------------------------------------------------------------------------------
async def _lmdeploy_sleep(app: App, req: Request, resp: Response, faults: dict[str, Any]) -> None:
    text = parse_qs(req.query).get("level", ["1"])[-1]
    try:
        level = int(text)
    except ValueError:
        await _json(resp, 400, error_body("lmdeploy", 400, 'The "level" query parameter must be an integer.'))
        return
    if level not in (1, 2):
        await _json(resp, 400, error_body("lmdeploy", 400, 'The "level" query parameter must be 1 or 2.'))
        return
    await asyncio.sleep(float(faults.get("sleep-delay", 0)))
    if faults.get("sleep-fails"):
        await resp.send(500, b"Internal Server Error", "text/plain; charset=utf-8")  # an unhandled exception
        return
    sleep = app.s.sleep
    sleep.awake.clear()
    sleep.tags = set(SLEEP_TAGS)
    sleep.level = level
    sleep.abort_in_flight()  # stop_all_session
    app.s.record("sleep", level=level, mode="abort", frees_memory=True)
    await resp.send(200, b"", None)


async def _lmdeploy_wake(app: App, req: Request, resp: Response, faults: dict[str, Any]) -> None:
    tags = parse_qs(req.query).get("tags") or None
    await asyncio.sleep(float(faults.get("wake-delay", 0)))
    if faults.get("wake-fails"):
        await resp.send(500, b"Internal Server Error", "text/plain; charset=utf-8")
        return
    sleep = app.s.sleep
    wanted = tags or sorted(sleep.tags)
    if any(t not in sleep.tags for t in wanted):
        _log(app, "WARNING", "async_engine.py", f"some tag in {wanted} not in sleeping tags {sleep.tags}")
    else:
        sleep.tags -= set(wanted)
        if not sleep.tags:
            sleep.level = None
            sleep.awake.set()
    app.s.record("wake", tags=tags, awake=not sleep.tags)
    await resp.send(200, b"", None)


# ---- shared --------------------------------------------------------------------------------------------------
def metrics_rows(app: App, labels: str) -> list[str]:
    """vLLM's ``vllm:engine_sleep_state`` gauge (v1/metrics/loggers.py), always exported."""
    sleep = app.s.sleep
    asleep = sleep.sleeping
    values = {
        "awake": 0 if asleep else 1,
        "weights_offloaded": 1 if asleep and sleep.level == 1 else 0,
        "discard_all": 1 if asleep and sleep.level == 2 else 0,
    }
    doc = (
        "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is awake; "
        "weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2."
    )
    rows = [f"# HELP vllm:engine_sleep_state {doc}", "# TYPE vllm:engine_sleep_state gauge"]
    inner = labels[:-1]
    rows += [f'vllm:engine_sleep_state{inner},sleep_state="{k}"}} {float(v)}' for k, v in values.items()]
    return rows


async def _json(resp: Response, status: int, obj: Any) -> None:
    with contextlib.suppress(ClientGone):
        await resp.send(status, json.dumps(obj, separators=(",", ":")).encode(), "application/json")


def _log(app: App, level: str, where: str, message: str) -> None:
    if app.vllm:
        emit(1, f"(EngineCore pid={os.getpid()}) {level} {time.strftime('%m-%d %H:%M:%S')} [{where}] {message}")
    elif level != "INFO":
        emit(2, f"{time.strftime('%Y-%m-%d %H:%M:%S')} - lmdeploy - {level} - {where} - {message}")
