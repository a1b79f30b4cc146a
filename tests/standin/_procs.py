"""Child processes shaped like the real engines' trees: vLLM's EngineCore and TP workers, LMDeploy's mp engine.

They are forked (no new interpreter: cheap, and they inherit the environment, which is how a gateway tags an
engine's descendants) and retitled so ``/proc/PID/cmdline`` reads ``VLLM::EngineCore`` like setproctitle makes
it. Like the real ones, the engine process has no parent-death detection: SIGKILL the API server and it lives
on, reparented. Workers watch a death pipe to their engine process and leave when it goes.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from collections.abc import Callable

from _faults import emit


def set_title(title: str) -> None:
    """Rewrite argv in place through /proc/self/mem (what setproctitle does, without the dependency)."""
    try:
        with open("/proc/self/stat", "rb") as fh:
            stat = fh.read()
        fields = stat[stat.rindex(b")") + 2 :].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end: fields 48 and 49
        size = end - start
        raw = title.encode()[: size - 1]
        # A non-NUL last byte tells the kernel the area was retitled: cmdline then stops at our NUL.
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(start)
            mem.write(raw + b"\0" + b" " * (size - len(raw) - 1) if size - len(raw) > 1 else raw + b"\0")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import ctypes  # only forked children pay for it

        ctypes.CDLL(None).prctl(15, title.encode()[:15], 0, 0, 0)  # PR_SET_NAME: what ps -o comm shows
    except (OSError, AttributeError):
        pass


def fork_child(title: str, body: Callable[[], None]) -> int:
    """Fork; the child retitles itself, runs ``body`` and never returns into the caller's code."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        # Signals must not reach the parent's event loop through the inherited wakeup fd.
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        set_title(title)
        body()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    except BaseException:  # a forked child must never unwind into the parent's code
        code = 1
    os._exit(code)


def _log(prefix: str, message: str) -> None:
    emit(1, f"({prefix} pid={os.getpid()}) INFO {time.strftime('%m-%d %H:%M:%S')} {message}")


def _on_term(ignore: bool, then: Callable[[], None]) -> None:
    if ignore:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return

    def handler(signum: int, frame: object) -> None:
        then()
        os._exit(0)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _worker(death_r: int, death_w: int, setsid: bool, ignore_term: bool, prefix: str) -> None:
    os.close(death_w)
    if setsid:
        os.setsid()
    _on_term(ignore_term, lambda: None)
    _log(prefix, "worker ready")
    while True:
        try:
            ready, _, _ = select.select([death_r], [], [])
        except InterruptedError:
            continue
        if ready and not os.read(death_r, 1):
            return  # every write end closed: the engine process is gone


def _sleeper(death_w: int, setsid: bool, ignore_term: bool, prefix: str) -> None:
    os.close(death_w)  # holding it would keep the real workers' death pipe from ever reporting EOF
    if setsid:
        os.setsid()
    _on_term(ignore_term, lambda: None)
    _log(prefix, "worker ready (fault: fork-workers, no death pipe)")
    while True:
        signal.pause()


def engine_process(
    prefix: str, worker_titles: list[str], extra_titles: list[str], *, setsid: bool, ignore_term: bool
) -> None:
    """Body of the engine process: start workers, then idle until signalled (no parent-death check).

    ``worker_titles`` watch a death pipe to this process, like vLLM's TP workers; ``extra_titles`` (the
    fork-workers fault) do not, like Ray workers that outlive their driver.
    """
    _log(prefix, "Initializing engine (stand-in): no model is loaded, nothing touches a GPU")
    death_r, death_w = os.pipe()
    kids = [
        fork_child(t, lambda t=t: _worker(death_r, death_w, setsid, ignore_term, t.split("::")[-1]))
        for t in worker_titles
    ]
    os.close(death_r)
    kids += [fork_child(t, lambda t=t: _sleeper(death_w, setsid, ignore_term, t.split("::")[-1])) for t in extra_titles]

    def stop_kids() -> None:
        for pid in kids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    _on_term(ignore_term, stop_kids)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # so pause() wakes up to reap
    while True:
        signal.pause()
        while True:  # reap workers that died, so they do not linger as zombies
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if not pid:
                break


def port_holder(ignore_term: bool) -> None:
    """Body of the hold-port-in-child fault: keep the inherited listening socket open, accept nothing."""
    _on_term(ignore_term, lambda: None)
    while True:
        signal.pause()


def reap(pid: int) -> bool:
    """True when ``pid`` (our child) has exited; collects it so it does not stay a zombie."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return bool(done)


def stop_children(pids: list[int], timeout: float = 3.0) -> None:
    """Graceful path (what atexit and context managers do in the real engines): SIGTERM, wait, SIGKILL."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if not reap(p)]
        if alive:
            time.sleep(0.02)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
