"""The HTTP surface of one stand-in engine: routing, auth scope, health, models, and request-level faults."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from _cli import VLLM_VERSION, EngineConfig
from _dialects import (
    anthropic_error,
    forced_tool,
    message_body,
    message_events,
    message_id,
    messages_as_chat,
    response_body,
    response_events,
    response_id,
    responses_as_chat,
)
from _faults import FaultError, Faults, Recorder, emit
from _http import ClientGone, Request, Response
from _openai import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    ApiError,
    Invalid,
    Plan,
    Prompt,
    chat_prompt,
    check_fields,
    check_length,
    check_sampling,
    completion_prompts,
    embeddings_body,
    error_body,
    error_type,
    new_id,
    plan,
    rerank_body,
    too_long_message,
)
from _shapes import (
    DONE,
    FIRST,
    TOKEN,
    Event,
    abort_tail,
    chat_body,
    completion_body,
    error_event,
    garbage_body,
    stream_events,
)
from _sleep import LMDEPLOY_ROUTES, VLLM_ROUTES, Sleep, frozen, gate, guarded, metrics_rows, refuse_asleep
from _sleep import serve as serve_sleep

VLLM_AUTH_PREFIXES = ("/v1", "/v2", "/inference", "/cohere")
LMDEPLOY_AUTH_FREE = ("/health", "/docs", "/redoc", "/nodes")
INFERENCE = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank", "/rerank", "/v2/rerank"}
DIALECTS = {"/v1/responses", "/v1/messages", "/v1/messages/count_tokens"}  # _dialects.py; inference too
ENGINE_500 = "The server had an error while processing your request."
ENGINE_DEAD_500 = "EngineCore encountered an issue. See stack trace (above) for the root cause."  # EngineDeadError


class Aborted(Exception):
    """vLLM's shutdown aborts in-flight requests (``--shutdown-timeout 0``)."""


@dataclass
class State:
    cfg: EngineConfig
    faults: Faults
    record: Recorder
    abort: asyncio.Event = field(default_factory=asyncio.Event)
    listening_at: float = 0.0
    engine_dead: str | None = None
    health_probes: int = 0
    status_hits: int = 0
    running: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    successes: int = 0
    sleep: Sleep = field(default_factory=Sleep)  # sleep mode (_sleep.py)
    stop_listening: Callable[[], None] | None = None  # the HTTP server's, for the refuse-connections fault
    dead_request: Callable[[], None] | None = None  # vLLM: a request met the dead engine (the server exits at once)


def sse(payload: Any) -> bytes:
    if isinstance(payload, bytes):
        return payload  # a named event, whole (_dialects.py)
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return f"data: {text}\n\n".encode()


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _wants_stream(req: Request) -> bool:
    try:
        body = json.loads(req.body)
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("stream") is True


def crash(code: int = 1) -> None:
    """An abrupt death: no cleanup, children orphaned, sockets closed by the kernel."""
    os._exit(code)


class App:
    def __init__(self, state: State) -> None:
        self.s = state
        self.cfg = state.cfg
        self.vllm = state.cfg.engine == "vllm"
        self.routes: dict[str, tuple[str, ...]] = {
            "/health": ("GET",),
            "/v1/models": ("GET",),
            "/v1/chat/completions": ("POST",),
            "/v1/completions": ("POST",),
            "/v1/embeddings": ("POST",),
            # Both engines speak these (vLLM 0.32; LMDeploy since 0.13/0.14): _dialects.py.
            "/v1/responses": ("POST",),
            "/v1/messages": ("POST",),
            "/v1/messages/count_tokens": ("POST",),
        }
        if self.vllm:
            self.routes.update(
                {
                    "/version": ("GET",),
                    "/ping": ("GET", "POST"),
                    "/load": ("GET",),
                    "/v1/rerank": ("POST",),
                    "/rerank": ("POST",),
                    "/v2/rerank": ("POST",),
                    "/tokenize": ("POST",),
                    "/detokenize": ("POST",),
                    "/metrics": ("GET",),
                }
            )
        elif state.cfg.metrics:
            self.routes["/metrics"] = ("GET",)
        # Sleep mode (_sleep.py): vLLM's routes exist only in dev mode; LMDeploy's always.
        self.sleep_routes = (VLLM_ROUTES if state.cfg.dev_mode else {}) if self.vllm else LMDEPLOY_ROUTES
        self.routes.update(self.sleep_routes)

    # ---- helpers -------------------------------------------------------------------------------------------
    async def _send_json(
        self, resp: Response, status: int, obj: Any, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        await resp.send(status, _json(obj), "application/json", headers)

    async def _error(self, resp: Response, err: ApiError) -> None:
        await self._send_json(
            resp, err.status, error_body(self.cfg.engine, err.status, err.message, err.param, err.type), err.headers
        )

    async def pause(self, resp: Response, seconds: float, keep_alive: bool = False, engine: bool = True) -> None:
        """Sleep, but wake for a client that leaves (ClientGone) or a vLLM shutdown abort or a sleep's (Aborted).
        ``engine``: the request is the engine's work, held while the engine is paused (_sleep.py)."""
        if resp.gone.is_set():
            raise ClientGone
        if self._aborted(resp):
            raise Aborted
        if engine:
            await gate(self, resp)
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        tick = self.cfg.sse_keep_alive if keep_alive and self.cfg.sse_keep_alive > 0 else None
        while True:
            if engine:
                end += await frozen(self, resp)
            left = end - loop.time()
            if left <= 0:
                return
            step = min(left, tick) if tick else (None if left == float("inf") else left)
            events = [resp.gone, self.s.abort] + ([resp.sleep_abort] if resp.sleep_abort else [])
            waits = {asyncio.ensure_future(e.wait()) for e in events}
            await asyncio.wait(waits, timeout=step, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            if resp.gone.is_set():
                raise ClientGone
            if self._aborted(resp):
                raise Aborted
            if tick and end - loop.time() > 0:
                await resp.write(b": keep-alive\n\n")

    def _aborted(self, resp: Response) -> bool:
        return self.s.abort.is_set() or (resp.sleep_abort is not None and resp.sleep_abort.is_set())

    def _gone(self, req: Request, faults: dict[str, Any], sent: int, rid: str | None = None) -> None:
        elapsed = round(time.monotonic() - req.started, 3)
        self.s.record("disconnect", method=req.method, path=req.path, events_sent=sent, elapsed=elapsed)
        if faults.get("record-disconnects"):
            emit(2, f"standin: client disconnected: {req.method} {req.path} after {sent} events, {elapsed}s")
        if self.vllm and rid and self.cfg.log_requests:
            # vLLM 0.32 logs these only with --enable-log-requests; its internal id has a suffix of 8 hex digits.
            head = f"(APIServer pid={os.getpid()}) INFO {time.strftime('%m-%d %H:%M:%S')}"
            emit(1, f"{head} [async_llm.py:922] Aborted request(s) {rid}-{os.urandom(4).hex()}.")
            emit(1, f"{head} [async_llm.py:783] Request {rid} aborted.")

    # ---- entry ---------------------------------------------------------------------------------------------
    async def __call__(self, req: Request, resp: Response) -> None:
        path = req.path
        if path not in ("/health", "/ping", "/metrics"):
            self._record_request(req)  # before auth: a test may assert that a request never got this far
        if guarded(self, req):  # LMDeploy's EngineSleepingMiddleware runs before its auth middleware
            await refuse_asleep(self, req, resp)
            return
        if req.method != "OPTIONS" and self.cfg.api_keys and self._guarded(path) and not self._authorized(req):
            if self.vllm:
                await self._send_json(resp, 401, {"error": "Unauthorized"})
            else:
                await self._send_json(resp, 401, error_body("lmdeploy", 401, "Unauthorized."))
            return
        methods = self.routes.get(path)
        if methods is None:
            await self._send_json(resp, 404, {"detail": "Not Found"})
            return
        # vLLM 0.32 answers HEAD /health with 405 (allow: GET); LMDeploy's routes take HEAD with GET.
        allowed = methods + (("HEAD",) if "GET" in methods and not self.vllm else ())
        if req.method not in allowed:
            await self._send_json(resp, 405, {"detail": "Method Not Allowed"}, (("allow", ", ".join(methods)),))
            return
        try:
            faults = self.s.faults.current()
        except FaultError as exc:
            await resp.send(500, f"standin: {exc}".encode(), "text/plain; charset=utf-8")
            return
        if path in INFERENCE or path in DIALECTS:
            try:
                await self._inference(req, resp, faults)
            finally:
                self.s.sleep.active.discard(resp)
        elif path in self.sleep_routes:
            await serve_sleep(self, req, resp, path, faults)
        else:
            await self._utility(req, resp, path, faults)

    def _guarded(self, path: str) -> bool:
        if self.vllm:
            return path.startswith(VLLM_AUTH_PREFIXES)
        return path not in LMDEPLOY_AUTH_FREE

    def _authorized(self, req: Request) -> bool:
        auth = req.header("authorization") or ""
        return any(auth == f"Bearer {key}" for key in self.cfg.api_keys)

    # ---- health, models, metrics ---------------------------------------------------------------------------
    async def _utility(self, req: Request, resp: Response, path: str, faults: dict[str, Any]) -> None:
        cfg = self.cfg
        if path in ("/health", "/ping"):
            await self._health(resp, faults)
        elif path == "/version":
            await self._send_json(resp, 200, {"version": VLLM_VERSION})
        elif path == "/load":
            await self._send_json(resp, 200, {"server_load": self.s.running})
        elif path == "/v1/models":
            created = int(time.time())
            perm = {
                "id": new_id("modelperm"),
                "object": "model_permission",
                "created": created,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
            cards = []
            for name in cfg.served_names:
                card: dict[str, Any] = {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "vllm" if self.vllm else "lmdeploy",
                    "root": cfg.model if self.vllm else name,
                    "parent": None,
                }
                if self.vllm:
                    card["max_model_len"] = cfg.max_model_len
                cards.append({**card, "permission": [perm]})
            await self._send_json(resp, 200, {"object": "list", "data": cards})
        elif path == "/metrics":
            # prometheus_client >= 0.22 (vLLM 0.32's) says version=1.0.0 for the text format.
            ctype = (
                "text/plain; version=1.0.0; charset=utf-8" if self.vllm else "text/plain; version=0.0.4; charset=utf-8"
            )
            await resp.send(200, self._metrics().encode(), ctype)
        elif path in ("/tokenize", "/detokenize"):
            body = self._body(req)
            if path == "/tokenize":
                if isinstance(body.get("messages"), list):  # a chat prompt: every message's words (no template)
                    words = ["w"] * chat_prompt(body, cfg).tokens
                else:
                    words = str(body.get("prompt", "")).split()
                tokens = [zlib.crc32(w.encode()) % 50000 for w in words]
                await self._send_json(
                    resp,
                    200,
                    {"count": len(words), "max_model_len": cfg.max_model_len, "tokens": tokens, "token_strs": None},
                )
            else:
                await self._send_json(resp, 200, {"prompt": " ".join(f"<{t}>" for t in body.get("tokens", []))})

    async def _health(self, resp: Response, faults: dict[str, Any]) -> None:
        mode = "fail" if faults.get("never-ready") else str(faults.get("health", "ok"))
        name, _, arg = mode.partition(":")
        self.s.health_probes += 1
        if name == "slow":
            with contextlib.suppress(Aborted):
                await self.pause(resp, float(arg or 3), engine=False)
        ok = not self.s.engine_dead
        if name == "fail":
            ok = False
        elif name == "flap":
            ok = ok and ((self.s.health_probes - 1) // max(1, int(arg or 1))) % 2 == 0
        if self.vllm:
            await resp.send(200 if ok else 503, b"", None)
            return
        init = faults.get("initializing", 0.0)
        if ok and self.s.sleep.sleeping:  # LMDeploy's health monitor: "sleeping" is healthy
            status, message = "sleeping", "Engine is sleeping."
        elif ok and time.monotonic() - self.s.listening_at < init:
            status, message = "initializing", "Engine health monitor is starting."
        elif ok:
            status, message = "healthy", "Engine is healthy."
        else:
            status, message = "unhealthy", self.s.engine_dead or "Backend health probe timed out after 10.0s."
        await self._send_json(
            resp, 200 if status in ("healthy", "sleeping") else 503, {"status": status, "message": message}
        )

    def _metrics(self) -> str:
        p = "vllm" if self.vllm else "lmdeploy"
        labels = f'{{engine="0",model_name="{self.cfg.served_names[0]}"}}'
        rows = [
            ("num_requests_running", "gauge", self.s.running),
            ("num_requests_waiting", "gauge", 0),
            ("kv_cache_usage_perc" if self.vllm else "gpu_cache_usage_perc", "gauge", 0.0),
            ("prompt_tokens_total", "counter", self.s.prompt_tokens),
            ("generation_tokens_total", "counter", self.s.generation_tokens),
            ("request_success_total", "counter", self.s.successes),
        ]
        out = []
        for name, kind, value in rows:
            out += [
                f"# HELP {p}:{name} stand-in value",
                f"# TYPE {p}:{name} {kind}",
                f"{p}:{name}{labels} {float(value)}",
            ]
        if self.vllm:
            out += metrics_rows(self, labels)
        return "\n".join(out) + "\n"

    # ---- inference -----------------------------------------------------------------------------------------
    def _body(self, req: Request) -> Any:
        ctype = (req.header("content-type") or "").split(";")[0].strip().lower()
        if ctype != "application/json" and (self.vllm or ctype):
            if self.vllm:
                raise ApiError(
                    400,
                    "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed",
                    None,
                    "Bad Request",
                )
            raise ApiError(400, "Content-Type must be application/json")
        try:
            return json.loads(req.body or b"null")
        except json.JSONDecodeError as exc:
            raise Invalid(
                [
                    {
                        "type": "json_invalid",
                        "loc": ("body", exc.pos),
                        "msg": "JSON decode error",
                        "input": {},
                        "ctx": {"error": exc.msg},
                    }
                ],
                self.cfg.engine,
            ) from None

    def _record_request(self, req: Request) -> None:
        try:
            body: Any = json.loads(req.body) if req.body else None
            extra: dict[str, Any] = {"body": body}
        except ValueError:
            extra = {"body": None, "body_text": req.body[:4096].decode("utf-8", "replace")}
        self.s.record(
            "request",
            method=req.method,
            path=req.path,
            query=req.query,
            headers=req.headers(),
            raw_headers=req.raw_headers,
            **extra,
        )

    async def _inference(self, req: Request, resp: Response, faults: dict[str, Any]) -> None:
        if faults.get("crash-on-request"):
            crash(1)
        if faults.get("refuse-connections") and self.s.stop_listening is not None:
            self.s.stop_listening()  # this answer still goes out; then the connection closes
        broken = str(faults.get("health", ""))
        try:
            if faults.get("hang-before-headers") or broken == "ok-but-broken:hang":
                try:
                    await self.pause(resp, float("inf"))
                except ClientGone:
                    self._gone(req, faults, 0)
                    raise
            if await self._canned(req, resp, faults):
                return
            if self.s.engine_dead:
                if not self.vllm:
                    raise ApiError(503, "The engine is not available.")
                if self.s.dead_request is not None:
                    self.s.dead_request()  # vLLM: the API server exits ~0.1 s after a request meets a dead engine
                raise ApiError(500, ENGINE_DEAD_500)
            if broken == "ok-but-broken":
                raise ApiError(500, ENGINE_500 if self.vllm else "Internal server error.")
            body = self._body(req)
            if req.path in DIALECTS:
                await self._dialect(req, resp, faults, body)
            elif req.path.endswith("/chat/completions"):
                await self._generate(req, resp, faults, body, "chat")
            elif req.path.endswith("/v1/completions"):
                await self._generate(req, resp, faults, body, "completion")
            elif req.path.endswith("embeddings"):
                if not self.vllm:
                    raise ApiError(400, "Unsupported by turbomind.")
                check_fields(body, {"input": ("str|list", True)}, "vllm")
                await self._pooled(req, resp, faults, embeddings_body(body, self._model(body)))
            else:
                check_fields(body, {"query": ("str", True), "documents": ("list", True)}, "vllm")
                await self._pooled(req, resp, faults, rerank_body(body, self._model(body)))
        except ApiError as err:
            if not resp.started and req.path.startswith("/v1/messages"):
                await self._send_json(resp, err.status, anthropic_error(err.status, err.message), err.headers)
            elif not resp.started:
                await self._error(resp, err)
        except Aborted:
            if not resp.started:
                await self._error(resp, ApiError(500, ENGINE_500))

    async def _canned(self, req: Request, resp: Response, faults: dict[str, Any]) -> bool:
        """status= and garbage= faults: answers that never reach the "model"."""
        status = faults.get("status")
        if status is not None and faults.get("status-times") is not None:
            self.s.status_hits += 1
            if self.s.status_hits > faults["status-times"]:
                status = None
        garbage = faults.get("garbage")
        if status is None and garbage is None:
            return False
        headers = (("retry-after", str(faults["retry-after"])),) if faults.get("retry-after") else ()
        if garbage is None:
            assert status is not None
            await self._send_json(
                resp, status, error_body(self.cfg.engine, status, self._fault_message(status)), headers
            )
            return True
        content_type, parts = garbage_body(str(garbage), _wants_stream(req))
        if len(parts) == 1:
            await resp.send(status or 200, parts[0], content_type, headers)
            return True
        await resp.start(status or 200, content_type, headers)
        for part in parts:
            await resp.write(part)
        await resp.end()
        return True

    def _fault_message(self, status: int) -> str:
        cfg = self.cfg
        if status == 400:
            n = cfg.max_model_len + 1
            return (
                too_long_message(cfg.max_model_len)
                if self.vllm
                else f"Input length ({n}) must be smaller than the model context length ({cfg.max_model_len})."
            )
        return {
            429: "Too many requests, please try again later.",
            500: ENGINE_500,
            503: "The engine is not available.",
        }.get(status, f"stand-in fault: HTTP {status}")

    def _model(self, body: dict) -> str:
        """vLLM: optional, aliases allowed, answers with the first served name. LMDeploy: exact, echoed."""
        names = self.cfg.served_names
        model = body.get("model")
        if self.vllm:
            if model and model not in names:
                raise ApiError(404, f"The model `{model}` does not exist. Valid aliases: {', '.join(names)}.", "model")
            return names[0]
        if model is None:
            raise Invalid(
                [{"type": "missing", "loc": ("body", "model"), "msg": "Field required", "input": body}], "lmdeploy"
            )
        if model not in names:
            raise ApiError(404, f"The model '{model}' does not exist.")
        return str(model)

    async def _dialect(self, req: Request, resp: Response, faults: dict[str, Any], body: Any) -> None:
        """/v1/responses, /v1/messages and /v1/messages/count_tokens, read as the chat request they amount to."""
        cfg, engine = self.cfg, self.cfg.engine
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        messages = req.path.startswith("/v1/messages")
        if messages and engine == "lmdeploy" and not req.header("anthropic-version"):
            raise ApiError(400, "Missing required header: anthropic-version")
        count = req.path.endswith("/count_tokens")
        chat = messages_as_chat(body, count=count) if messages else responses_as_chat(body)
        if not self.vllm:
            check_fields(body, {"model": ("str", True)}, engine)
        model = self._model(body)
        prompt = chat_prompt(chat, cfg)
        check_length(prompt, cfg)
        for m in prompt.media:
            self.s.record("media", path=req.path, **m)
        if count:
            await self._send_json(resp, 200, {"input_tokens": prompt.tokens})
            return
        tool = forced_tool(body) if messages else None
        if body.get("tools") and not cfg.tool_parser:
            raise ApiError(
                400, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
            )
        the_plan = plan(prompt, chat, cfg)
        rid = new_id("chatcmpl", req.header("x-request-id")) if messages else response_id()
        headers = (("x-standin-images", str(prompt.images)),) if prompt.images else ()
        self.s.running += 1
        try:
            if body.get("stream"):
                if messages:
                    events = message_events(message_id(engine, rid), model, the_plan, prompt.tokens, tool)
                else:
                    events = response_events(engine, rid, model, body, the_plan, prompt.tokens)
                await self._stream(req, resp, faults, events, rid, headers)
            else:
                try:
                    await self.pause(resp, float(faults.get("first-token-delay", 0)))
                except ClientGone:
                    self._gone(req, faults, 0, rid)
                    raise
                if messages:
                    out = message_body(engine, message_id(engine, rid), model, the_plan, prompt.tokens, tool)
                else:
                    out = response_body(rid, model, body, the_plan, prompt.tokens)
                if faults.get("echo-headers"):
                    out["standin_echo"] = {"method": req.method, "path": req.path, "headers": req.raw_headers}
                await self._send_json(resp, 200, out, headers)
            self.s.successes += 1
            self.s.prompt_tokens += prompt.tokens
            self.s.generation_tokens += len(the_plan.tokens)
        finally:
            self.s.running -= 1

    async def _pooled(self, req: Request, resp: Response, faults: dict[str, Any], out: dict) -> None:
        await self.pause(resp, float(faults.get("first-token-delay", 0)))
        if faults.get("echo-headers"):
            out["standin_echo"] = {"method": req.method, "path": req.path, "headers": req.raw_headers}
        await self._send_json(resp, 200, out)

    async def _generate(self, req: Request, resp: Response, faults: dict[str, Any], body: Any, kind: str) -> None:
        engine, cfg = self.cfg.engine, self.cfg
        check_fields(body, CHAT_FIELDS if kind == "chat" else COMPLETION_FIELDS, engine)
        if not self.vllm:
            check_fields(body, {"model": ("str", True)}, engine)
        model = self._model(body)
        check_sampling(body, cfg)
        prompts: list[Prompt] = [chat_prompt(body, cfg)] if kind == "chat" else completion_prompts(body, engine)
        for p in prompts:
            check_length(p, cfg)
            for m in p.media:
                self.s.record("media", path=req.path, **m)
                if m.get("source") in ("http", "file"):
                    verb = "fetch" if m["source"] == "http" else "read local file"
                    emit(2, f"standin: {engine} would {verb} {m['url']} (not done by the stand-in)")
        n = body.get("n") or 1
        plans = [plan(p, body, cfg) for p in prompts for _ in range(n)]
        xrid = req.header("x-request-id")
        rid = new_id("chatcmpl" if kind == "chat" else "cmpl", xrid)
        headers = (("x-request-id", xrid or rid),) if cfg.request_id_headers else ()
        if images := sum(p.images for p in prompts):
            headers += (("x-standin-images", str(images)),)
        prompt_tokens = sum(p.tokens for p in prompts)  # once per prompt, however many choices
        echo = (
            {"method": req.method, "path": req.path, "headers": req.raw_headers} if faults.get("echo-headers") else None
        )
        self.s.running += 1
        try:
            if body.get("stream"):
                events = stream_events(
                    kind,
                    engine,
                    rid,
                    model,
                    plans,
                    prompt_tokens,
                    body.get("stream_options") or {},
                    cfg.force_include_usage,
                )
                if echo:
                    events[0][1]["standin_echo"] = echo
                await self._stream(req, resp, faults, events, rid, headers)
            else:
                await self._non_stream(req, resp, faults, kind, rid, model, plans, prompt_tokens, headers, echo)
            self.s.successes += 1
            self.s.prompt_tokens += prompt_tokens
            self.s.generation_tokens += sum(len(p.tokens) for p in plans)
        finally:
            self.s.running -= 1

    async def _non_stream(
        self,
        req: Request,
        resp: Response,
        faults: dict[str, Any],
        kind: str,
        rid: str,
        model: str,
        plans: list,
        prompt_tokens: int,
        headers: tuple,
        echo: dict | None,
    ) -> None:
        if faults.get("drip"):
            await resp.start(200, "application/json", headers)
            await self._drip(req, resp, faults, itertools.repeat(b" "))
            return
        steps = max((len(p.tokens) for p in plans), default=1)
        first, interval = float(faults.get("first-token-delay", 0)), float(faults.get("token-interval", 0))
        began: float | None = None
        try:
            await gate(self, resp)  # held while the engine is paused: the clock starts when it works
            began = time.monotonic()
            await self.pause(resp, first + interval * (steps - 1))
        except ClientGone:
            self._gone(req, faults, 0, rid)
            raise
        except Aborted:
            # vLLM 0.32: 200 with the text made so far and finish_reason "abort".
            elapsed = -1.0 if began is None else time.monotonic() - began
            made = 0 if elapsed < first else 1 + int((elapsed - first) / interval) if interval > 0 else steps
            plans = [Plan(p.tokens[:made], "abort") for p in plans]
        out = (chat_body if kind == "chat" else completion_body)(self.cfg.engine, rid, model, plans, prompt_tokens)
        if echo:
            out["standin_echo"] = echo
        await self._send_json(resp, 200, out, headers)

    async def _drip(self, req: Request, resp: Response, faults: dict[str, Any], source: Any) -> None:
        sent = 0
        try:
            for byte in source:
                await resp.write(byte)
                sent += 1
                await self.pause(resp, float(faults["drip"]))
        except ClientGone:
            self._gone(req, faults, sent)
            raise

    @staticmethod
    async def _write_burst(resp: Response, held: list[bytes]) -> None:
        """The held events in one write, each its own HTTP chunk (``burst``); the list is emptied."""
        framed = [b"%x\r\n%b\r\n" % (len(d), d) for d in held] if resp.chunked else held
        held.clear()
        await resp.write_raw(b"".join(framed))

    async def _stream(
        self, req: Request, resp: Response, faults: dict[str, Any], events: list[Event], rid: str, headers: tuple
    ) -> None:
        await resp.start(200, "text/event-stream; charset=utf-8", headers)
        if faults.get("drip"):
            body = b"".join(sse(p) for _, p in events[:-1] if isinstance(p, dict) and p.get("choices"))
            await self._drip(req, resp, faults, (body[i : i + 1] for i in itertools.cycle(range(len(body)))))
            return
        first, interval = float(faults.get("first-token-delay", 0)), float(faults.get("token-interval", 0))
        limits = {
            k: faults.get(k)
            for k in ("crash-after-chunks", "close-after-chunks", "stall-after-chunks", "error-after-chunks")
        }
        sent = 0
        try:
            await gate(self, resp)  # headers are out; the first event waits while the engine is paused
        except ClientGone:
            self._gone(req, faults, 0, rid)
            raise
        except Aborted:
            with contextlib.suppress(ClientGone):
                if any(isinstance(p, dict) for _, p in events):
                    await resp.write(b"".join(sse(p) for p in abort_tail(events, 0)))
            return
        # burst=N: events go out N at a time, one HTTP chunk each but in one socket write, as real vLLM's tokens
        # often arrive several to a read; the pauses come between bursts.
        burst, held = int(faults.get("burst", 1)), list[bytes]()
        try:
            for wait, payload in events:
                if not held:
                    delay = first if wait == FIRST else interval if wait == TOKEN else 0
                    await self.pause(resp, delay, keep_alive=True)
                data = sse(payload)
                if burst > 1:
                    held.append(data)
                    sent += 1
                    if len(held) >= burst or sent == len(events):
                        await self._write_burst(resp, held)
                    continue
                if sent == limits["crash-after-chunks"]:
                    crash(1)
                if sent == limits["close-after-chunks"]:
                    await resp.write(data[: max(8, len(data) // 2)])
                    resp.close()
                    self.s.record("closed-mid-line", path=req.path, events_sent=sent)
                    return
                if sent == limits["stall-after-chunks"]:
                    await self.pause(resp, float("inf"))
                if sent == limits["error-after-chunks"]:
                    err = error_event(self.cfg.engine, 500, ENGINE_500, error_type(self.cfg.engine, 500))
                    await resp.write(sse(err) + sse(DONE))
                    return
                await resp.write(data)
                sent += 1
        except ClientGone:
            self._gone(req, faults, sent, rid)
            raise
        except Aborted:
            if not any(isinstance(p, dict) for _, p in events):
                return  # a dialect's stream (_dialects.py): cut where it was
            # vLLM 0.32: an aborted stream ends like a finished one, with finish_reason "abort" (no error event).
            with contextlib.suppress(ClientGone):
                await resp.write(b"".join(sse(p) for p in abort_tail(events, sent)))
