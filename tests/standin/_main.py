"""Start-up, process tree, signals and shutdown: the lifecycle a gateway supervises (ENGINES.md §3-4).

Order of events, as in the real servers: vLLM forks its EngineCore and ``bind()``s the port at once but only
``listen()``s when loading is done; LMDeploy binds nothing until loading is done. Either way a client gets
"connection refused" during the load, never an HTTP "loading" answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from typing import Any

from _cli import LMDEPLOY_VERSION, VLLM_VERSION, EngineConfig, parse_lmdeploy, parse_vllm
from _engine import App, State
from _faults import ENV_RECORD, FaultError, Faults, Recorder, emit
from _http import HttpServer, Request
from _procs import engine_process, fork_child, port_holder, reap, stop_children

LMDEPLOY_GRACE_CAP = 30.0  # the real one waits for open streams without any limit
# vLLM 0.32 dies at once on a SIGTERM in the first seconds of its load; later (seen at 25 s and 40 s) the first
# one is swallowed and the load goes on to serving. The fault key sigterm-swallowed-after moves the boundary.
VLLM_SIGTERM_SWALLOWED_AFTER = 5.0


class Runner:
    def __init__(self, cfg: EngineConfig, faults: Faults, record: Recorder) -> None:
        self.cfg = cfg
        self.vllm = cfg.engine == "vllm"
        self.faults = faults
        self.record = record
        self.pid = os.getpid()
        self.engine_pid: int | None = None
        self.holder_pid: int | None = None
        self.phase = "loading"
        self.started = time.monotonic()
        self.swallowed = False  # vLLM: a late SIGTERM during the load was already ignored
        self.dying = False  # vLLM: a request met the dead engine; the exit is scheduled
        self.exit_code: int | None = None
        self.done = asyncio.Event()
        self.force = asyncio.Event()
        self.child_exit = asyncio.Event()
        self.shutdown_task: asyncio.Task[None] | None = None
        self.server: HttpServer | None = None
        self.state: State | None = None

    # ---- logging -------------------------------------------------------------------------------------------
    def log(self, message: str, level: str = "INFO", where: str = "api_server.py") -> None:
        if self.vllm:
            emit(1, f"(APIServer pid={self.pid}) {level} {time.strftime('%m-%d %H:%M:%S')} [{where}] {message}")
        elif level != "INFO":  # LMDeploy's default --log-level is WARNING
            emit(2, f"{time.strftime('%Y-%m-%d %H:%M:%S')} - lmdeploy - {level} - {where} - {message}")

    def uv(self, message: str, level: str = "INFO") -> None:
        if level == "INFO" and self.cfg.quiet_uvicorn:
            return
        prefix = f"(APIServer pid={self.pid}) " if self.vllm else ""
        emit(2, f"{prefix}{level + ':':<9} {message}")

    def access(self, req: Request, status: int) -> None:
        cfg = self.cfg
        if cfg.quiet_uvicorn or not cfg.access_log or req.path in cfg.no_log_paths:
            return
        from http import HTTPStatus

        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
        prefix = f"(APIServer pid={self.pid}) " if self.vllm else ""
        emit(1, f'{prefix}INFO:     {req.peer} - "{req.method} {req.target} {req.version}" {status} {phrase}')

    def current_faults(self) -> dict[str, Any]:
        try:
            return self.faults.current()
        except FaultError as exc:
            emit(2, f"standin: {exc}")
            return self.faults.base

    # ---- process tree --------------------------------------------------------------------------------------
    def spawn_tree(self, faults: dict[str, Any]) -> None:
        cfg = self.cfg
        extra = int(faults.get("fork-workers", 0))
        ignore_all = faults.get("ignore-sigterm") == "all"
        if self.vllm:
            prefix = os.environ.get("VLLM_PROCESS_NAME_PREFIX", "VLLM")
            title = f"{prefix}::EngineCore"
            world = cfg.tp * cfg.pp
            if world == 1 and cfg.executor in (None, "mp", "uni"):
                workers = [f"{prefix}::Worker"]  # 0.32 runs one Worker process under EngineCore even at TP=1
            elif world > 1 and cfg.executor in (None, "mp"):
                workers = [
                    f"{prefix}::Worker_TP{t}" if cfg.pp == 1 else f"{prefix}::Worker_PP{p}_TP{t}"
                    for p in range(cfg.pp)
                    for t in range(cfg.tp)
                ]
            else:
                workers = ["ray::RayWorkerWrapper"] * world if world > 1 and cfg.executor == "ray" else []
            extras = [f"{prefix}::Worker_TP{len(workers) + i}" for i in range(extra)]
        else:
            if cfg.backend != "pytorch" and not extra:
                return  # turbomind runs in the API server process; TP uses threads
            title = "ZMQMPEngine" if cfg.backend == "pytorch" else "lmdeploy-standin::engine"
            executor = cfg.executor or os.environ.get("LMDEPLOY_EXECUTOR_BACKEND") or ("ray" if cfg.tp > 1 else "uni")
            workers = (
                []
                if cfg.backend != "pytorch" or cfg.tp == 1 or executor == "uni"
                else [
                    "ray::RayWorkerWrapper" if executor == "ray" else f"lmdeploy::Worker_TP{t}" for t in range(cfg.tp)
                ]
            )
            extras = ["ray::RayWorkerWrapper"] * extra
        self.engine_pid = fork_child(
            title,
            lambda: engine_process(
                "EngineCore_DP0" if self.vllm else title,
                workers,
                extras,
                setsid=bool(faults.get("setsid")),
                ignore_term=ignore_all,
            ),
        )

    def cleanup(self) -> None:
        """What atexit/context managers do on an orderly exit; never runs on SIGKILL."""
        if self.engine_pid:
            stop_children([self.engine_pid])
            self.engine_pid = None

    # ---- signals -------------------------------------------------------------------------------------------
    def on_signal(self, sig: int) -> None:
        faults = self.current_faults()
        if sig == signal.SIGTERM and faults.get("ignore-sigterm"):
            emit(2, "standin: ignoring SIGTERM (fault ignore-sigterm)")
            return
        if self.phase == "loading" and self.vllm and sig == signal.SIGTERM and not self.swallowed:
            after = float(faults.get("sigterm-swallowed-after", VLLM_SIGTERM_SWALLOWED_AFTER))
            if time.monotonic() - self.started >= after:
                self.swallowed = True  # the second signal stops it (below)
                emit(2, "standin: SIGTERM late in the load swallowed, as vLLM 0.32 does (sigterm-swallowed-after)")
                return
        if self.phase == "loading":
            self.exit_code = 1  # vLLM: KeyboardInterrupt during load, cleaned up by its context managers
            self.done.set()
        elif self.phase == "serving":
            self.phase = "stopping"
            self.shutdown_task = asyncio.ensure_future(self.shutdown())
        elif not self.vllm and sig == signal.SIGINT:
            self.force.set()  # uvicorn: a second Ctrl+C forces the exit; a second SIGTERM does nothing

    async def shutdown(self) -> None:
        assert self.server is not None and self.state is not None
        server = self.server
        self.uv("Shutting down")
        server.stop_listening()
        if self.vllm:
            await self._drain(self.cfg.shutdown_timeout)
            self.state.abort.set()  # --shutdown-timeout 0 (the default): abort what is still running
            await self._drain(2.0)
        else:
            if server.in_flight:
                self.uv("Waiting for connections to close. (CTRL+C to force quit)")
            await self._drain(LMDEPLOY_GRACE_CAP)
        server.close_all()
        self.uv("Waiting for application shutdown.")
        self.cleanup()
        self.uv("Application shutdown complete.")
        self.uv(f"Finished server process [{self.pid}]")
        self.exit_code = 0
        self.done.set()

    async def _drain(self, seconds: float) -> None:
        """Wait until no request is in flight, the timeout passes, or a forced exit is asked for."""
        assert self.server is not None
        waits = {asyncio.ensure_future(self.server.drained.wait()), asyncio.ensure_future(self.force.wait())}
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()

    # ---- background tasks ----------------------------------------------------------------------------------
    async def flood(self, rate: float) -> None:
        """log-flood: blocking writes from the event loop, so an undrained pipe stalls serving, as for real."""
        n, owed = 0, 0.0
        while True:
            owed += rate / 100
            while owed >= 1:
                owed -= 1
                n += 1
                emit(1 + n % 2, f"(APIServer pid={self.pid}) INFO flood line {n}: " + "x" * 60)
            await asyncio.sleep(0.01)

    async def watch_engine(self) -> None:
        assert self.state is not None
        while self.engine_pid and not reap(self.engine_pid):
            self.child_exit.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.child_exit.wait(), 0.5)
        if self.phase == "loading" and self.engine_pid:
            self.engine_pid = None
            emit(2, "RuntimeError: Engine core initialization failed. See root cause above.")
            self.exit_code = 1
            self.done.set()
            return
        if self.phase != "serving" or not self.engine_pid:
            return
        self.engine_pid = None
        if not self.vllm:
            self.state.engine_dead = "PyTorch ZMQ engine process is not alive."
            self.log("PyTorch ZMQ engine process is not alive.", "ERROR", "health.py")
            return
        self.state.engine_dead = "EngineCore died"
        self.log("Engine core proc EngineCore_DP0 died unexpectedly, shutting down client.", "ERROR", "core_client.py")
        if os.environ.get("VLLM_KEEP_ALIVE_ON_ENGINE_DEATH", "0").lower() in ("1", "true"):
            return
        await asyncio.sleep(float(self.current_faults().get("watchdog", 5.0)))  # launcher.py watchdog_loop
        if self.phase == "serving":
            self.phase = "stopping"
            await self.shutdown()

    def dead_request(self) -> None:
        """A request met the dead engine: vLLM answers it 500 and its server exits within ~0.1 s."""
        if self.dying or os.environ.get("VLLM_KEEP_ALIVE_ON_ENGINE_DEATH", "0").lower() in ("1", "true"):
            return
        self.dying = True

        def stop() -> None:
            if self.phase == "serving":
                self.phase = "stopping"
                self.shutdown_task = asyncio.ensure_future(self.shutdown())

        asyncio.get_running_loop().call_later(0.1, stop)

    def engine_dies(self) -> None:
        if self.engine_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.engine_pid, signal.SIGKILL)
        elif self.state is not None:
            self.state.engine_dead = "Backend health probe timed out after 10.0s."

    # ---- main ----------------------------------------------------------------------------------------------
    def bind(self) -> socket.socket | None:
        cfg = self.cfg
        if cfg.uds:
            return None
        family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.vllm:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # vLLM's create_server_socket
        try:
            sock.bind((cfg.host, cfg.port))
        except OSError as exc:
            sock.close()
            if self.vllm:
                emit(2, f"Traceback (most recent call last):\nOSError: [Errno {exc.errno}] {exc.strerror}")
            else:
                self.uv(
                    f"[Errno {exc.errno}] error while attempting to bind on address {(cfg.host, cfg.port)}: "
                    f"{(exc.strerror or '').lower()}",
                    "ERROR",
                )
            raise SystemExit(1) from None
        return sock

    async def run(self) -> int:
        cfg, loop = self.cfg, asyncio.get_running_loop()
        faults = self.current_faults()
        tasks: list[asyncio.Task[None]] = []  # referenced so the loop does not drop them
        if faults.get("log-flood"):
            tasks.append(asyncio.create_task(self.flood(float(faults["log-flood"]))))
        if self.vllm:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.on_signal, sig)
        elif faults.get("ignore-sigterm"):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.state = State(cfg, self.faults, self.record)
        keep_alive = float(os.environ.get("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", "5")) if self.vllm else 5.0
        self.server = HttpServer(App(self.state), self.access, keep_alive)
        self.state.stop_listening = self.server.stop_listening
        if self.vllm:
            self.state.dead_request = self.dead_request
        loop.add_signal_handler(signal.SIGCHLD, self.child_exit.set)
        tasks.append(asyncio.create_task(self.watch_engine()))
        sock = self.bind() if self.vllm else None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.done.wait(), float(faults.get("startup-delay", 0)))
        if self.done.is_set():
            self.cleanup()
            return self.exit_code or 0
        faults = self.current_faults()
        if "exit-at-startup" in faults:
            where = "EngineCore_DP0" if self.vllm else "lmdeploy"
            emit(
                2,
                f"Traceback (most recent call last):\nRuntimeError: Engine core initialization failed ({where}). "
                "See root cause above. (stand-in fault exit-at-startup)",
            )
            self.cleanup()
            return int(faults["exit-at-startup"])
        if not self.vllm:
            for _ in range(3):
                emit(1, f"HINT:    Please open http://{cfg.host}:{cfg.port} in a browser for detailed api usage!!!")
            sock = self.bind()
        port = sock.getsockname()[1] if sock else cfg.port
        url = (
            f"unix socket {cfg.uds}"
            if cfg.uds
            else f"http://{'[' + cfg.host + ']' if ':' in cfg.host else cfg.host}:{port}"
        )
        if self.vllm:
            if cfg.dev_mode:
                self.log(
                    "SECURITY WARNING: Development endpoints are enabled! This should NOT be used in production!",
                    "WARNING",
                    "__init__.py",
                )
            self.log(f"Starting vLLM server on {url}", where="launcher.py")
            for route, methods in self.server.handler.routes.items():  # type: ignore[attr-defined]
                self.log(f"Route: {route}, Methods: {', '.join(methods)}", where="launcher.py")
        self.uv(f"Started server process [{self.pid}]")
        self.uv("Waiting for application startup.")
        self.uv("Application startup complete.")
        await self.server.start(sock, cfg.uds)
        self.state.listening_at = time.monotonic()
        self.phase = "serving"
        self.uv(f"Uvicorn running on {url} (Press CTRL+C to quit)")
        self.record("ready", port=port)
        if not self.vllm:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.on_signal, sig)
        if faults.get("hold-port-in-child"):
            self.holder_pid = fork_child(
                "standin::port-holder", lambda: port_holder(faults.get("ignore-sigterm") == "all")
            )
        if "crash-after-seconds" in faults:
            loop.call_later(float(faults["crash-after-seconds"]), lambda: os.kill(self.pid, signal.SIGKILL))
        if "engine-dead-after" in faults:
            loop.call_later(float(faults["engine-dead-after"]), self.engine_dies)
        await self.done.wait()
        # Leave now: letting asyncio.run cancel the connection tasks makes 3.11's streams print tracebacks, and
        # everything worth cleaning up (children, sockets) has been handled by the shutdown path already.
        os._exit(self.exit_code or 0)


def main(engine: str, argv: list[str]) -> None:
    cfg = parse_vllm(argv) if engine == "vllm" else parse_lmdeploy(argv)  # exits 2 on a bad flag
    try:
        faults = Faults(os.environ)
        first = faults.current()
    except FaultError as exc:
        sys.stderr.write(f"standin: {exc}\n")
        sys.exit(2)
    record = Recorder(os.environ.get(ENV_RECORD), engine)
    record("start", argv=sys.argv, version=VLLM_VERSION if engine == "vllm" else LMDEPLOY_VERSION)
    runner = Runner(cfg, faults, record)
    if engine == "vllm":
        runner.log(f"vLLM API server version {VLLM_VERSION}", where="utils.py")
        runner.log(f"non-default args: {cfg.non_default}", where="utils.py")
    runner.spawn_tree(first)
    try:
        code = asyncio.run(runner.run())
    except SystemExit as exc:
        runner.cleanup()
        code = exc.code if isinstance(exc.code, int) else 1
    except KeyboardInterrupt:  # LMDeploy during load: Python's default SIGINT handling, then atexit
        runner.cleanup()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
