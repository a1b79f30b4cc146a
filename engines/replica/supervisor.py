"""One replica's lifecycle, owned by one asyncio task (llama-swap's rule: one owner; the rest read snapshots).

    STOPPED ─start→ STARTING ─ready before the deadline→ READY
                      │ exit / deadline / spawn error      │ exit (the reaper tells at once), or
                      │                                    │ unhealthy_threshold failed probes
                      ▼                                    ▼
                   BACKOFF ◀───────────────────────────────┘   (the launch is killed, its log kept)
                      │ delay from backoff.py; budget spent → FAILED (until start/restart)
                      └─→ STARTING
    any state ─stop→ STOPPING (SIGTERM → stop_grace → SIGKILL, whole tree) → STOPPED

    READY ─sleep→ SLEEPING ─wake (or start)→ WAKING ─wake calls answered, health check passes→ READY
                     │ exit, or unhealthy_threshold           │ exit, a failed wake call, still asleep,
                     │ failed probes: STOPPED, never          │ not healthy by the startup timeout
                     ▼ restarted (nobody asked for its GPUs)  ▼
                  STOPPED                                  BACKOFF (a cold restart, by the usual path)

A sleep (``adapter.sleep_api``: vLLM's /sleep, LMDeploy's /sleep, SGLang's /release_memory_occupation) keeps
the process and gives its GPU memory back; it is confirmed by the engine's is-sleeping answer where it has
one. A sleep that cannot be done (no sleep API, the call fails or times out, the engine still says it is
awake, the replica is not READY) is a stop instead, ``last_error`` saying why: the scheduler reads STOPPED
as "stopped instead". The calls to the engine are never cut short by a command: one that arrives meanwhile
waits for them (a stop or restart ends them, with the launch).

``run()`` is the owner, the one writer of the replica's state; ``start()``, ``stop()``, ``restart()``,
``sleep()`` and ``wake()`` queue a command for it and wait for it to be taken up. Each move goes to
``on_event`` (the pool, which tells the scheduler) synchronously and unguarded: a subscriber that raises
ends this task loudly rather than leaving the scheduler's copy behind. Requests in flight are not counted
here: ``inflight`` reads the pool's lease count. "Connection refused while the child lives" is loading, not
failure; the child's exit is the strongest signal. A request that failed (``report_failure``) asks for a
probe at once, at most every PROMPT_PROBE_GAP: if it fails too, the replica is UNHEALTHY (out of rotation)
there and then. A remote engine (``adapter.spawns`` False) is only probed: READY while it answers, STARTING
while it does not, never FAILED.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import aiohttp

from engines.adapters.base import EngineAdapter
from engines.adapters.sleep import HttpCall, SleepApi
from engines.process import ports
from engines.process.launch import EngineProcess
from engines.process.log_ring import LogRing
from engines.process.redact import secret_values
from engines.replica.backoff import RestartBackoff
from engines.replica.health import MAX_BODY, probe
from engines.replica.mailbox import Command, Mailbox
from engines.replica.snapshot import ReplicaSnapshot, redact_argv
from engines.replica.state import EngineState, StateChanged, can_transition
from engines.spec import ModelSpec

S = EngineState
T = TypeVar("T")
_log = logging.getLogger(__name__)
HURRIED_GRACE = 1.0  # seconds between SIGTERM and SIGKILL when the operator said "now"
# A sleep call may take this long beyond stop_grace: at level 1 the engine copies its weights to host RAM first.
SLEEP_CALL_MARGIN = 60.0
# A call the engine's death cut short fails a moment before the reaper tells the exit: this long for it, at most.
EXIT_NOTICE_GRACE = 1.0
# At most one probe this often on the request path's word (a 5xx, a refused connection): a dead engine is
# seen within a probe's time, and a replica failing every request is not probed once per request.
PROMPT_PROBE_GAP = 1.0


class Supervisor:
    def __init__(
        self,
        spec: ModelSpec,
        adapter: EngineAdapter,
        *,
        replica: int = 0,
        session: aiohttp.ClientSession,
        on_event: Callable[[StateChanged], None] | None = None,
        on_report: Callable[[int, bool], None] | None = None,
        inflight: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        log: LogRing | None = None,
    ) -> None:
        self.spec = spec
        self.adapter = adapter
        self.replica = replica
        self.model = spec.name
        self.log = log if log is not None else LogRing()
        self._inflight = inflight
        self._session = session
        self._on_event = on_event
        self._on_report = on_report
        self._clock = clock
        self._mailbox = Mailbox(sleep)
        self._logger = logging.getLogger(f"engines.{spec.name}")
        self._backoff = RestartBackoff(spec.restart, clock=clock)
        self._state = S.STOPPED
        self._state_since = time.time()
        self._ready_since: float | None = None
        self._ready = asyncio.Event()
        self._changed = asyncio.Event()
        self._proc: EngineProcess | None = None
        self._exit_task: asyncio.Task[int] | None = None
        self._port: int | None = None
        self._argv: list[str] = []
        self._engine_pid: int | None = None
        self._next_delay = 0.0
        self.restarts = 0
        self.launches = 0
        self.last_exit_code: int | None = None
        self.last_error: str | None = None
        self.health_failures = 0
        self.probe_failures = 0
        self.passive_failures = 0
        self._hurried = False  # a second signal: every stop from then on gives the engine HURRIED_GRACE at most
        self._sleep_api: SleepApi | None = adapter.sleep_api(spec) if adapter.spawns else None
        self._deferred: list[Command] = []  # commands that came while the engine was being called (``_engine_work``)
        self._prompt_probe_at = -PROMPT_PROBE_GAP  # when a request's failure last asked for a probe

    # -- reading (any task) -------------------------------------------------------------------------

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def inflight(self) -> int:
        """Requests holding a lease on this replica now (advisory: the pool's count, read-only here)."""
        return self._inflight() if self._inflight is not None else 0

    @property
    def hurried(self) -> bool:
        """Whether a stop in a hurry was taken up: every stop since gives HURRIED_GRACE at most."""
        return self._hurried

    @property
    def ready(self) -> asyncio.Event:
        """Set while READY. Read it, wait on it; never set it."""
        return self._ready

    @property
    def base_url(self) -> str | None:
        if not self.adapter.spawns:
            return self.adapter.base_url(self.spec, self.spec.host, 0)
        return None if self._port is None else self.adapter.base_url(self.spec, self.spec.host, self._port)

    def snapshot(self) -> ReplicaSnapshot:
        return ReplicaSnapshot(
            model=self.model,
            replica=self.replica,
            state=self._state,
            base_url=self.base_url if self._state is S.READY else None,
            pid=self._proc.pid if self._proc else None,
            engine_pid=self._engine_pid,
            port=self._port,
            restarts=self.restarts,
            last_exit_code=self.last_exit_code,
            last_error=self.last_error,
            state_since=self._state_since,
            ready_since=self._ready_since,
            launches=self.launches,
            argv=redact_argv(self._argv),
            health_failures=self.health_failures,
            probe_failures=self.probe_failures,
            inflight=self.inflight,
            passive_failures=self.passive_failures,
        )

    async def wait_ready(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109 (the API's name)
        """Whether the replica is READY within ``timeout``; gives up early once it is FAILED."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            if self._state is S.READY:
                return True
            if self._state is S.FAILED or self._mailbox.closed:
                return False
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def report_failure(self) -> None:
        """Passive evidence from the request path (a connect error, a 5xx, a broken stream, a timeout).

        Routing state, not lifecycle state: the pool's scheduler counts it and may eject the replica from
        rotation for a while; this replica's own state machine is not touched.
        """
        self.passive_failures += 1
        if self._on_report is not None:
            self._on_report(self.replica, False)
        now = self._clock()
        if self._state is S.READY and now - self._prompt_probe_at >= PROMPT_PROBE_GAP:
            # Probe now rather than at the next interval: vLLM's /health is 503 within 0.1 s of its engine's
            # death, and a failed probe after a failed request takes the replica out of rotation at once.
            self._prompt_probe_at = now
            self._mailbox.post("probe")
        limit = self.spec.outlier.restart_after
        if limit and self.passive_failures == limit and self._state is S.READY and self.adapter.spawns:
            self._mailbox.post("broken")  # once per streak: the count only grows until a success or a launch

    def report_success(self) -> None:
        self.passive_failures = 0
        if self._on_report is not None:
            self._on_report(self.replica, True)

    # -- commands -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Launch if STOPPED or FAILED (a FAILED replica gets a fresh crash budget); skip a BACKOFF wait."""
        await self._mailbox.send("start", f"supervisor of {self.model}/{self.replica}")

    async def stop(self, *, hurried: bool = False) -> None:
        """Until STOPPED: the tree got SIGTERM, ``stop_grace``, then SIGKILL. ``hurried`` (a second signal):
        HURRIED_GRACE at most, for this stop and every one after it."""
        await self._mailbox.send("stop", f"supervisor of {self.model}/{self.replica}", hurried=hurried)

    async def restart(self) -> None:
        """End the current launch (if any) and start a new one with a fresh crash budget."""
        await self._mailbox.send("restart", f"supervisor of {self.model}/{self.replica}")

    async def sleep(self) -> None:
        """Until the replica is SLEEPING, or STOPPED instead: no sleep API, a failed or timed-out sleep call, an
        engine that still says it is awake, an UNHEALTHY replica (``last_error`` says why). In any state but
        READY and UNHEALTHY it is a stop; SLEEPING: nothing."""
        await self._mailbox.send("sleep", f"supervisor of {self.model}/{self.replica}")

    async def wake(self) -> None:
        """SLEEPING: until the wake is under way (WAKING), like ``start()``; READY follows (``wait_ready``), or a
        cold restart when the wake fails. STOPPED or FAILED: a start. Any other state: nothing."""
        await self._mailbox.send("wake", f"supervisor of {self.model}/{self.replica}")

    # -- the owner ----------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            while True:
                if self._deferred:  # commands that waited for a call to the engine, in the order they came
                    await self._command(self._deferred.pop(0))
                elif self._state in (S.STOPPED, S.FAILED):
                    await self._idle()
                elif self._state is S.STARTING:
                    await (self._launching() if self.adapter.spawns else self._connecting())
                elif self._state in (S.READY, S.UNHEALTHY):
                    await self._serving()
                elif self._state is S.BACKOFF:
                    await self._backing_off()
                elif self._state is S.SLEEPING:
                    await self._asleep()
                elif self._state is S.WAKING:
                    await self._waking()
                else:
                    raise AssertionError(f"run() found state {self._state}")
        finally:
            await self._shutdown()

    async def _idle(self) -> None:
        await self._end_launch()
        kind, value = await self._wait()
        if kind == "cmd":
            await self._command(value)

    async def _launching(self) -> None:
        if self._proc is None:
            try:
                await self._launch()
            except Exception as exc:
                self._crashed(f"launch failed: {exc}")
                return
        limit = self.adapter.startup_timeout(self.spec)
        outcome, why = await self._probe_until_ready(S.STARTING, self._clock() + limit, ours=True)
        if outcome == "ready":
            self._became_ready()
        elif outcome == "late":
            self._crashed(f"not ready after {limit:g}s (last probe: {why})")

    async def _probe_until_ready(
        self, state: EngineState, deadline: float, *, ours: bool
    ) -> tuple[Literal["ready", "late", "moved"], str]:
        """Probe every ``startup_interval`` while in ``state`` with this launch: "ready" once
        ``healthy_threshold`` probes passed in a row (and, ``ours``, the port is this launch's), "late" with
        the last probe's answer at ``deadline``, "moved" when a command or the engine's exit moved it on."""
        proc = self._proc
        passes = 0
        while self._state is state and self._proc is proc:
            kind, value = await self._wait(work=self._probe())
            if kind != "work":
                await self._interrupted(kind, value)
                continue
            ok, why = value
            passes = passes + 1 if ok else 0
            if ok and passes >= self.spec.health.healthy_threshold:
                if not ours or await self._answered_by_us():
                    return "ready", ""
                passes = 0
            if self._clock() >= deadline:
                return "late", why
            kind, value = await self._wait(after=self.spec.health.startup_interval)
            if kind != "timeout":
                await self._interrupted(kind, value)
        return "moved", ""

    async def _connecting(self) -> None:
        passes = 0
        while self._state is S.STARTING:
            kind, value = await self._wait(work=self._probe())
            if kind == "cmd":
                await self._command(value)
                continue
            ok, why = value
            passes = passes + 1 if ok else 0
            if not ok:
                self.last_error = f"remote not answering: {why}"
            elif passes >= self.spec.health.healthy_threshold:
                self._became_ready()
                return
            kind, value = await self._wait(after=self.spec.health.startup_interval)
            if kind == "cmd":
                await self._command(value)

    async def _serving(self) -> None:
        proc = self._proc
        health = self.spec.health
        loop = asyncio.get_running_loop()
        passing = 0  # probes passed in a row while UNHEALTHY
        failing_since = 0.0
        while self._state in (S.READY, S.UNHEALTHY) and self._proc is proc:
            kind, value = await self._wait(after=health.interval)
            prompted = False
            # A request's failure asks for a probe now (``report_failure``); one that comes during a probe
            # starts it again, so that its answer is the one the failure asked for.
            while kind == "timeout" or (kind == "cmd" and value.kind == "probe"):
                if kind == "cmd":
                    value.finish()
                    prompted = True
                kind, value = await self._wait(work=self._probe())
            if kind != "work":
                await self._interrupted(kind, value)
                continue
            ok, why = value
            if ok:
                self.health_failures = 0
                if self._state is S.UNHEALTHY:
                    passing += 1
                    if passing >= health.healthy_threshold:
                        self._enter(S.READY, "health check passes again")
                continue
            passing = 0
            self.health_failures += 1
            self.probe_failures += 1
            if self.health_failures == 1:
                failing_since = loop.time()
            if prompted and self._state is S.READY and self.adapter.spawns:
                # A request failed and the probe agrees: out of rotation now, not after the threshold's probes.
                self.last_error = f"a request failed and the health check agrees ({why})"
                self._enter(S.UNHEALTHY, f"{self.last_error}; out of rotation, restarted if it lasts")
                continue
            if self.health_failures < health.unhealthy_threshold:
                continue
            reason = f"health check failed {self.health_failures} times in a row ({why})"
            if not self.adapter.spawns:
                self.last_error = reason
                self._enter(S.STARTING, reason)
            elif loop.time() - failing_since >= health.restart_grace:
                self._crashed(
                    reason if self._state is S.READY else f"{reason}, for more than {health.restart_grace:g}s"
                )
            elif self._state is S.READY:
                self.last_error = reason
                self._enter(S.UNHEALTHY, f"{reason}; out of rotation, restarted if it lasts {health.restart_grace:g}s")

    async def _backing_off(self) -> None:
        await self._end_launch()
        kind, value = await self._wait(after=self._next_delay)
        if kind == "cmd":
            await self._command(value)
        elif self._state is S.BACKOFF:
            self.restarts += 1
            self._enter(S.STARTING, f"restart {self.restarts} after {self._next_delay:.2f}s")

    async def _asleep(self) -> None:
        """Asleep: the exit is still watched and the health probed (vLLM, LMDeploy and SGLang answer /health 200
        asleep). Neither an exit nor failed probes restart it: a restart would take GPU memory nobody asked for."""
        proc = self._proc
        health = self.spec.health
        while self._state is S.SLEEPING and self._proc is proc:
            kind, value = await self._wait(after=health.interval)
            if kind == "timeout":
                kind, value = await self._wait(work=self._probe())
            if kind == "work":
                ok, why = value
                if ok:
                    self.health_failures = 0
                    continue
                self.health_failures += 1
                self.probe_failures += 1
                if self.health_failures >= health.unhealthy_threshold:
                    self.last_error = (
                        f"health check failed {self.health_failures} times in a row while asleep ({why}); "
                        "stopped, not restarted"
                    )
                    await self._stop(self.last_error)
            elif kind == "exit":
                self.last_exit_code = value
                self.last_error = f"exited while asleep (code {value}); not restarted"
                await self._end_launch()  # what is left of its tree goes before it is said to be STOPPED
                self._enter(S.STOPPED, self.last_error)
            elif kind == "cmd":
                await self._command(value)

    async def _waking(self) -> None:
        """The wake calls, then the health check until it passes, all within the adapter's startup timeout. A
        failure is a crash: BACKOFF, and the restart is a cold start."""
        api, proc = self._sleep_api, self._proc
        if api is None or proc is None:  # only a sleeping launch is woken: a bug, but a restart cures it
            self._crashed("asked to wake with no sleeping launch")
            return
        limit = self.adapter.startup_timeout(self.spec)
        deadline = self._clock() + limit
        kind, value = await self._engine_work(self._wake_calls(api, limit))
        if kind == "exit":
            self.last_exit_code = value
            self._crashed(f"exited with code {value} while waking")
            return
        if kind == "cmd":
            await self._command(value)
            return
        ok, why = value
        if not ok and (code := await self._died()) is not None:
            self.last_exit_code = code
            self._crashed(f"exited with code {code} while waking")
            return
        if not ok:
            self._crashed(f"wake failed: {why}")
            return
        while self._deferred and self._state is S.WAKING:  # what came during the calls, before anything newer
            await self._command(self._deferred.pop(0))
        # The same process answers as before its sleep: no port check.
        outcome, why = await self._probe_until_ready(S.WAKING, deadline, ours=False)
        if outcome == "ready":
            self._became_ready("awake: health check passed")
        elif outcome == "late":
            self._crashed(f"not ready {limit:g}s after the wake began (last probe: {why})")

    # -- steps --------------------------------------------------------------------------------------

    async def _launch(self) -> None:
        host = self.spec.host
        if self.spec.port is not None:
            if not ports.port_is_free(host, self.spec.port):
                raise RuntimeError(f"port {host}:{self.spec.port} is already in use by another process")
            port = self.spec.port
        else:
            port = ports.pick_free_port(host)
        argv = self.adapter.argv(self.spec, host, port)
        self.launches += 1
        engine_id = f"{self.model}/{self.replica}/{self.launches}"
        self._argv, self._port, self._engine_pid = argv, port, None
        self.health_failures = self.passive_failures = 0
        self.log.append(f"[gateway] launch {self.launches}: {' '.join(redact_argv(argv))}")
        proc = EngineProcess(
            argv,
            engine_id=engine_id,
            env=self.adapter.env(self.spec),
            log=self.log,
            logger=self._logger,
            grace=self.spec.stop_grace,
            secrets=secret_values(self.spec),
        )
        await proc.start()
        self._proc = proc
        self._exit_task = asyncio.ensure_future(proc.ended())  # the main process's exit, as the reaper tells it

    async def _end_launch(self) -> None:
        """Make sure the current launch is gone (a no-op when there is none); keeps its log."""
        proc, self._proc = self._proc, None
        if self._exit_task is not None:
            if not self._exit_task.done():
                self._exit_task.cancel()
            self._exit_task = None
        self._engine_pid = None
        self._port = None
        if proc is None:
            return
        code = await proc.stop(min(self.spec.stop_grace, HURRIED_GRACE) if self._hurried else self.spec.stop_grace)
        if code is not None:
            self.last_exit_code = code

    async def _answered_by_us(self) -> bool:
        """Whether the port that answered is held by this launch, not by a stranger that got there first."""
        proc, port = self._proc, self._port
        if proc is None or port is None:
            return False
        owners = await asyncio.to_thread(lambda: ports.listener_pids(port, proc.members()))
        if owners is None or owners:
            return True
        self.last_error = f"port {port} answers, but not from this engine's processes"
        return False

    async def _probe(self) -> tuple[bool, str]:
        if self._proc is not None and self._engine_pid is None:
            self._engine_pid = self._proc.engine_pid
        port = self._port or 0
        key = self.spec.engine_key()
        headers = {"Authorization": f"Bearer {key}"} if key else None
        url = self.adapter.health_url(self.spec, self.spec.host, port)
        return await probe(self._session, self.adapter, url, self.spec.health.timeout, headers)

    def _became_ready(self, reason: str = "health check passed") -> None:
        self.health_failures = 0
        self.last_error = None
        self._backoff.ready()
        self._enter(S.READY, reason)

    async def _fall_asleep(self) -> None:
        """READY → SLEEPING, or a stop instead with ``last_error`` saying why (the caller's word for it)."""
        api = self._sleep_api
        if api is None:
            self.last_error = f"could not sleep: {self.adapter.no_sleep_reason(self.spec)}; stopped instead"
            await self._stop(self.last_error)
            return
        if self._state is S.UNHEALTHY:
            # Not put to sleep: an engine failing its probes may not wake (and the state table has no such move).
            self.last_error = "could not sleep: it is failing its health checks; stopped instead"
            await self._stop(self.last_error)
            return
        limit = self.spec.stop_grace + SLEEP_CALL_MARGIN
        kind, value = await self._engine_work(self._sleep_calls(api, limit))
        if kind == "work" and not value[0] and (code := await self._died()) is not None:
            kind, value = "exit", code
        if kind == "work" and value[0]:
            self.health_failures = 0
            self._enter(S.SLEEPING, f"asleep (level {api.level})")
        elif kind == "work":
            self.last_error = f"could not sleep: {value[1]}; stopped instead"
            await self._stop(self.last_error)
        elif kind == "exit":
            self.last_exit_code = value
            self.last_error = f"exited while falling asleep (code {value}); stopped, not restarted"
            await self._stop(self.last_error)
        else:
            await self._command(value)  # a stop or restart that came during the call: that is what happens now

    async def _sleep_calls(self, api: SleepApi, limit: float) -> tuple[bool, str]:
        try:
            async with asyncio.timeout(limit):
                answer = await self._call(api.sleep)
                if isinstance(answer, str):
                    return False, answer
                return await self._confirm(api, asleep=True, after=api.sleep)
        except TimeoutError:
            return False, f"{api.sleep.method} {api.sleep.path}: no answer within {limit:g}s"

    async def _wake_calls(self, api: SleepApi, limit: float) -> tuple[bool, str]:
        try:
            async with asyncio.timeout(limit):
                for call in api.wake:
                    answer = await self._call(call)
                    if isinstance(answer, str):
                        return False, answer
                return await self._confirm(api, asleep=False, after=api.wake[-1])
        except TimeoutError:
            return False, f"the wake calls had no answer within {limit:g}s"

    async def _confirm(self, api: SleepApi, *, asleep: bool, after: HttpCall) -> tuple[bool, str]:
        """Whether the engine's is-sleeping answer agrees (True when it has none: the 2xx is all there is)."""
        if api.is_sleeping is None:
            return True, ""
        answer = await self._call(HttpCall("GET", api.is_sleeping))
        if isinstance(answer, str):
            return False, answer
        said = api.asleep(answer[1])
        if said is None:
            return False, f"GET {api.is_sleeping} answered {answer[1][:200]!r}, not whether it sleeps"
        if said != asleep:
            now = "awake" if asleep else "asleep"
            return False, f"{after.method} {after.path} answered, but GET {api.is_sleeping} says it is still {now}"
        return True, ""

    async def _call(self, call: HttpCall) -> tuple[int, bytes] | str:
        """One call to the engine: (status, body) for a 2xx, else why not, short and safe to show."""
        port = self._port or 0
        url = self.adapter.base_url(self.spec, self.spec.host, port) + call.path
        headers = {"Content-Type": "application/json"}
        if key := self.spec.engine_key():
            headers["Authorization"] = f"Bearer {key}"
        data = call.body.encode() if call.method == "POST" else None
        what = f"{call.method} {call.path}"
        try:
            async with self._session.request(
                call.method, url, data=data, headers=headers, allow_redirects=False
            ) as resp:
                body = await resp.content.read(MAX_BODY)
                if 200 <= resp.status < 300:
                    return resp.status, body
                text = " ".join(body[:200].decode("utf-8", "replace").split())
                return f"{what} answered HTTP {resp.status}" + (f": {text}" if text else "")
        except aiohttp.ClientConnectorError as exc:
            refused = isinstance(exc.os_error, ConnectionRefusedError)
            return f"{what}: {'connection refused' if refused else 'cannot connect'}"
        except (aiohttp.ClientError, OSError) as exc:
            return f"{what}: {type(exc).__name__}"

    async def _died(self) -> int | None:
        """After a failed call: the engine's exit code if it exits within EXIT_NOTICE_GRACE, else None. A death
        breaks the call's connection a moment before the reaper tells the exit (and /proc may still show the
        process then): waited for, so that it reads as a death, not as the connection it broke. A failure from a
        live engine costs the grace, before a stop or a restart that takes longer anyway."""
        task = self._exit_task
        if task is None:
            return None
        if not task.done():
            await asyncio.wait({task}, timeout=EXIT_NOTICE_GRACE)
        return task.result() if task.done() and not task.cancelled() and task.exception() is None else None

    async def _engine_work(self, work: Awaitable[T]) -> tuple[str, Any]:
        """Run ``work`` (calls that must not be cut short: an engine half asleep, or a SGLang resume sent twice,
        is worse than a late command) while watching the exit and the mailbox. Returns ("work", its result),
        ("exit", code), or ("cmd", a stop or restart, which ends the work: the launch goes with it). Other
        commands wait in ``_deferred``; ``run()`` takes them up once the state is settled."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                kind, value = await self._wait(work=asyncio.shield(task))
                if kind == "cmd" and value.kind in ("probe", "broken"):
                    value.finish()  # health is known from the outcome; a replica out of rotation has no requests
                elif kind == "cmd" and value.kind not in ("stop", "restart"):
                    self._deferred.append(value)
                else:
                    return kind, value
        finally:
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _crashed(self, reason: str) -> None:
        self.last_error = reason
        tail = "".join(f"\n    {line}" for line in self.log.tail(10))
        self._logger.warning("%s/%d: %s%s", self.model, self.replica, reason, tail and f"; last output:{tail}")
        delay = self._backoff.crash()
        if delay is None:
            policy = self.spec.restart
            self._enter(S.FAILED, f"{reason}; more than {policy.max_restarts} crashes in {policy.window:g}s")
        else:
            self._next_delay = delay
            self._enter(S.BACKOFF, reason)

    async def _interrupted(self, kind: str, value: Any) -> None:
        if kind == "cmd":
            await self._command(value)
        elif kind == "exit":
            self.last_exit_code = value
            when = "during startup" if self._state is S.STARTING else f"while {self._state}"
            self._crashed(f"exited with code {value} {when}")

    async def _stop(self, reason: str) -> None:
        if self._state is not S.STOPPED:
            self._enter(S.STOPPING, reason)
            await self._end_launch()
            self._enter(S.STOPPED, reason)

    async def _command(self, cmd: Command) -> None:
        try:
            if cmd.kind == "stop":
                self._hurried = self._hurried or cmd.hurried
                await self._stop("stop requested")
            elif cmd.kind == "sleep":
                if self._state in (S.READY, S.UNHEALTHY):
                    await self._fall_asleep()
                elif self._state is not S.SLEEPING:
                    await self._stop(f"sleep requested while {self._state}: stopped instead")
            elif cmd.kind == "wake":
                if self._state is S.SLEEPING:
                    self._enter(S.WAKING, "wake requested")
                elif self._state in (S.STOPPED, S.FAILED):
                    self._backoff.reset()
                    self._enter(S.STARTING, "wake requested: not asleep, started")
            elif cmd.kind == "probe":
                pass  # taken up by ``_serving``; in any other state the next probe comes anyway
            elif cmd.kind == "broken":
                if self._state is S.READY and self.passive_failures >= self.spec.outlier.restart_after:
                    self._crashed(f"{self.passive_failures} requests in a row failed while its health check passed")
            elif cmd.kind == "start":
                if self._state in (S.STOPPED, S.FAILED, S.BACKOFF):
                    self._backoff.reset()
                    self._enter(S.STARTING, "start requested")
                elif self._state is S.SLEEPING:
                    self._enter(S.WAKING, "start requested: waking")
            else:
                self._backoff.reset()
                if self._state is not S.STOPPED:
                    self._enter(S.STOPPING, "restart requested")
                    await self._end_launch()
                self._enter(S.STARTING, "restart requested")
        except BaseException as exc:
            cmd.finish(exc)
            raise
        cmd.finish()

    async def _wait(self, *, after: float | None = None, work: Awaitable[Any] | None = None) -> tuple[str, Any]:
        return await self._mailbox.wait(exited=self._exit_task, after=after, work=work)

    def _enter(self, new: EngineState, reason: str) -> None:
        old = self._state
        if not can_transition(old, new):
            raise RuntimeError(f"{self.model}/{self.replica}: no transition {old} → {new} ({reason})")
        self._state = new
        self._state_since = time.time()
        if new is S.READY:
            self._ready_since = self._state_since
            self._ready.set()
        elif old is S.READY:
            self._ready_since = None
            self._ready.clear()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        _log.info("%s/%d: %s → %s (%s)", self.model, self.replica, old, new, reason)
        if self._on_event is not None:
            self._on_event(StateChanged(self.model, self.replica, old, new, self._state_since, reason))

    def _leave(self, new: EngineState, reason: str) -> None:
        """``_enter`` on the way out: the engine is ended and the commands answered even if a subscriber
        fails again (logged with its traceback; the first failure is what ends the task)."""
        try:
            self._enter(new, reason)
        except Exception:
            _log.exception("%s/%d: state-change subscriber failed while shutting down", self.model, self.replica)

    async def _shutdown(self) -> None:
        pending = [*self._deferred, *self._mailbox.close()]
        self._deferred.clear()
        proc = self._proc
        try:
            if self._state not in (S.STOPPED, S.STOPPING):
                self._leave(S.STOPPING, "supervisor shutting down")
            await self._end_launch()
        except asyncio.CancelledError:
            if proc is not None:
                proc.kill_now()
            raise
        finally:
            if self._state is S.STOPPING:
                self._leave(S.STOPPED, "supervisor shut down")
            for cmd in pending:
                cmd.finish(RuntimeError("supervisor shut down"))
            self._changed.set()
