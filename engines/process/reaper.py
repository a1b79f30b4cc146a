"""Sits between the gateway and one engine, so that no process of the engine outlives either of them.

Run by engines/process/launch.py, never imported by the gateway:

    python -I reaper.py --lifeline-fd N --grace S [--exit-grace S] [--status-fd N] -- ENGINE_ARGV...

It marks itself child subreaper (orphans of the engine's tree are reparented to it, not to init), starts
the engine as its only direct child, in its own process group (the gateway started it in a new session),
and then waits for one of three things:

* the engine's main process exits: ``exited CODE`` goes to the status pipe at once (the gateway stops
  routing to it now, not once the tree is gone), the rest of the tree is ended (SIGTERM, ``--exit-grace``,
  short: vLLM's orphaned EngineCore and Worker ignore SIGTERM; SIGKILL) and the reaper exits with the
  engine's status (a signal n becomes 128+n);
* SIGTERM/SIGINT/SIGHUP (a stop): SIGTERM to the tree, ``--grace``, SIGKILL, exit;
* EOF on the lifeline pipe: the gateway died (even by SIGKILL, the kernel closes its end); same as a stop.

"The tree" is every process in our process group, every descendant (one that called setsid left the
group but is still ours as subreaper), and every process carrying this launch's environment tag
(GATEWAY_ENGINE_ID together with GATEWAY_OWNER_PID), which survives setsid and double forks.

Standard library only and few imports: tests launch many of these, and a gateway restarts engines in a hurry.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
TAG_VARS = ("GATEWAY_ENGINE_ID", "GATEWAY_OWNER_PID")
KILL_WAIT = 10.0  # after SIGKILL: a process in uninterruptible sleep (a GPU driver call) may take a while
EXEC_FAILED = 127
EXIT_GRACE = 0.5  # default --exit-grace: the main process is gone, what is left is orphaned and owes nothing


def _say(msg: str) -> None:
    try:
        os.write(2, f"[reaper {os.getpid()}] {msg}\n".encode(errors="replace"))
    except OSError:
        pass


def _set_subreaper() -> None:
    import ctypes  # only here: ctypes is the slowest import this script has

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        _say(f"prctl(PR_SET_CHILD_SUBREAPER) failed: errno {ctypes.get_errno()}; orphans escape to init")


def _parse(argv: list[str]) -> tuple[int, float, float, int, list[str]]:
    if "--" not in argv:
        raise SystemExit("usage: reaper.py --lifeline-fd N --grace S [--exit-grace S] [--status-fd N] -- ARGV...")
    split = argv.index("--")
    opts, command = argv[:split], argv[split + 1 :]
    values = dict(zip(opts[::2], opts[1::2], strict=False))
    if not command:
        raise SystemExit("reaper.py: no engine command after --")
    lifeline = int(values.get("--lifeline-fd", "-1"))
    grace = float(values.get("--grace", "10"))
    exit_grace = float(values.get("--exit-grace", str(min(grace, EXIT_GRACE))))
    status = int(values.get("--status-fd", "-1"))
    return lifeline, grace, exit_grace, status, command


class Tree:
    """Finds and ends the processes that belong to this launch."""

    def __init__(self) -> None:
        self.me = os.getpid()
        if os.getpgrp() != self.me:
            # Not started in a new session: make our own group, so "our group" never means a caller's shell.
            os.setpgid(0, 0)
        self.pgid = os.getpgrp()
        needles = []
        for var in TAG_VARS:
            value = os.environ.get(var)
            if value:
                needles.append(f"{var}={value}".encode())
        self.needles = needles
        self._tagged: dict[tuple[int, str], bool] = {}  # (pid, start time) → carries our tag

    def _carries_tag(self, pid: int, start: str) -> bool:
        key = (pid, start)
        known = self._tagged.get(key)
        if known is None:
            try:
                with open(f"/proc/{pid}/environ", "rb") as fh:
                    entries = fh.read().split(b"\0")
            except OSError:
                entries = []
            known = bool(self.needles) and all(n in entries for n in self.needles)
            self._tagged[key] = known
        return known

    def members(self) -> set[int]:
        """Live processes of this launch, not counting the reaper itself."""
        parent: dict[int, int] = {}
        found: set[int] = set()
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            if pid == self.me:
                continue
            try:
                with open(f"/proc/{pid}/stat", "rb") as fh:
                    stat = fh.read()
            except OSError:
                continue
            # The command name may hold spaces and parentheses: fields start after the last ")".
            fields = stat[stat.rfind(b")") + 2 :].split()
            if len(fields) < 20 or fields[0] in (b"Z", b"X"):
                continue
            parent[pid] = int(fields[1])
            if int(fields[2]) == self.pgid or self._carries_tag(pid, fields[19].decode()):
                found.add(pid)
        # Descendants that left the group (setsid) are still below us: walk parent links up to the reaper.
        for pid in parent:
            if pid in found:
                continue
            seen = 0
            up = parent.get(pid, 0)
            while up > 1 and seen < 64:
                if up == self.me or up in found:
                    found.add(pid)
                    break
                up = parent.get(up, 0)
                seen += 1
        return found

    @staticmethod
    def signal(pids: set[int], sig: int) -> None:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass


class Reaper:
    def __init__(self, lifeline: int, grace: float, exit_grace: float, command: list[str], status: int = -1) -> None:
        self.lifeline = lifeline
        self.status = status
        self.grace = grace
        self.exit_grace = exit_grace
        self.command = command
        self.engine_pid = 0
        self.engine_status: int | None = None
        self.stop_requested = ""
        self.wake_r, self.wake_w = os.pipe()
        self.tree = Tree()

    def _on_stop(self, signum: int, _frame: object) -> None:
        self.stop_requested = self.stop_requested or signal.Signals(signum).name

    def install_signals(self) -> None:
        os.set_blocking(self.wake_w, False)
        os.set_blocking(self.wake_r, False)
        # Wakes poll() for every handled signal, also one that lands between reap() and poll().
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGCHLD, lambda _s, _f: None)

    def spawn(self) -> bool:
        for fd in (self.lifeline, self.status):
            if fd >= 0:
                os.set_inheritable(fd, False)
        # Dispositions that Python changed (SIGPIPE ignored, handlers above) go back to default for the engine.
        defaults = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
        try:
            self.engine_pid = os.posix_spawnp(
                self.command[0], self.command, os.environ, setsigdef=defaults, setsigmask=()
            )
        except OSError as exc:
            _say(f"cannot start {self.command[0]!r}: {exc.strerror or exc}")
            return False
        return True

    def reap(self) -> bool:
        """Collect every exited child; whether any child is left."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True
            if pid == self.engine_pid and self.engine_status is None:
                self.engine_status = status

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 512):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def watch(self) -> str:
        """Block until the engine exits, a stop signal arrives, or the lifeline breaks; says which."""
        poller = select.poll()
        poller.register(self.wake_r, select.POLLIN)
        if self.lifeline >= 0:
            poller.register(self.lifeline, select.POLLIN | select.POLLHUP)
        while True:
            self.reap()
            if self.engine_status is not None:
                return "exit"
            if self.stop_requested:
                return "signal"
            for fd, _events in poller.poll():
                if fd == self.wake_r:
                    self._drain_wakeups()
                elif fd == self.lifeline:
                    try:
                        data = os.read(self.lifeline, 512)
                    except OSError:
                        data = b""
                    if not data:
                        return "lifeline"

    def _wait_gone(self, seconds: float, sig: int | None = None) -> set[int]:
        """Wait until the tree is empty; with ``sig``, send it to every member, also those born meanwhile."""
        deadline = time.monotonic() + seconds
        signalled: set[int] = set()
        while True:
            self.reap()
            left = self.tree.members()
            if sig is not None and left - signalled:
                # A process that was forking during the last scan has a child we have not told yet.
                self.tree.signal(left - signalled, sig)
                signalled |= left
            now = time.monotonic()
            if not left or now >= deadline:
                return left
            try:
                select.select([self.wake_r], [], [], min(0.05, deadline - now))
            except InterruptedError:
                pass
            self._drain_wakeups()

    def terminate(self, grace: float) -> None:
        left = self._wait_gone(grace, signal.SIGTERM)
        if left:
            _say(f"{len(left)} process(es) still alive after {grace:g}s, sending SIGKILL")
            deadline = time.monotonic() + KILL_WAIT
            # Repeat: a process may fork between the scan and the kill.
            while left and time.monotonic() < deadline:
                self.tree.signal(left, signal.SIGKILL)
                left = self._wait_gone(0.2)
            if left:
                _say(f"processes {sorted(left)} survived SIGKILL for {KILL_WAIT:g}s")
        deadline = time.monotonic() + 1.0
        while self.reap() and time.monotonic() < deadline:
            time.sleep(0.01)

    def tell_exited(self) -> None:
        """``exited CODE`` on the status pipe: the gateway learns of the exit before the tree is ended."""
        if self.status < 0:
            return
        try:
            os.write(self.status, f"exited {self.exit_code()}\n".encode())
        except OSError:
            pass  # the gateway is gone: the lifeline says so too

    def exit_code(self) -> int:
        if self.engine_status is None:
            return 128 + signal.SIGKILL
        code = os.waitstatus_to_exitcode(self.engine_status)
        return 128 - code if code < 0 else code


def main(argv: list[str]) -> int:
    lifeline, grace, exit_grace, status, command = _parse(argv)
    reaper = Reaper(lifeline, grace, exit_grace, command, status)
    reaper.install_signals()
    _set_subreaper()
    if not reaper.spawn():
        return EXEC_FAILED
    why = reaper.watch()
    if why == "exit":
        reaper.tell_exited()
        reaper.terminate(exit_grace)
    else:
        if why == "lifeline":
            _say("gateway is gone (lifeline closed): stopping the engine")
        reaper.terminate(grace)
    return reaper.exit_code()


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(code)
