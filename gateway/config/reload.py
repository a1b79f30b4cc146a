"""Config reload (``POST /admin/reload``, SIGHUP): re-read the file the gateway started with, apply its models.

Models are applied in place (``EnginePool.reload``): added ones start if eager, removed ones drain and
stop, changed ones drain and come back with the new spec, untouched ones keep serving without a break.
``groups`` and ``max_loaded`` apply to the next decisions. The ``server``, ``auth``, ``media`` and
``passthrough`` blocks are built into the running app (the listener, the clocks, the key ring, the media
fetcher, the endpoint table and its routes in the owner and every worker): a change
there is reported as ``restart_required`` and not applied. An invalid file changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from engines import EnginePool
from gateway.config.loader import Config, ConfigError, load_config

log = logging.getLogger("gateway.config.reload")
_RESTART_ONLY = ("server", "auth", "media", "passthrough")


class ReloadTarget(Protocol):
    """What a reload reads and changes: the owner's state (``gateway.deps.OwnerState``)."""

    @property
    def config(self) -> Config: ...

    @property
    def pool(self) -> EnginePool: ...

    def apply_config(self, config: Config) -> None:
        """The new config becomes the running one, in this process and in its workers."""


@dataclass
class Reloader:
    path: str
    # The command line's --host/--port, applied again so that they do not read as a change to the file.
    overrides: Mapping[str, Any] = field(default_factory=dict)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def reload(self, state: ReloadTarget) -> dict[str, Any]:
        """Apply the file; raises ConfigError (nothing changed) when it is not valid."""
        async with self._lock:  # one reload at a time: each diffs against the result of the last
            old = state.config
            # A thread: a models_dir scan reads files and may ask NVML.
            new = await asyncio.to_thread(load_config, self.path, previous=old)
            if self.overrides:
                new = new.model_copy(update={"server": new.server.model_copy(update=dict(self.overrides))})
            restart = [name for name in _RESTART_ONLY if getattr(new, name) != getattr(old, name)]
            try:
                report = await state.pool.reload(new.models, new.placement)
            except ValueError as exc:
                raise ConfigError(f"invalid config: {exc}") from None
            state.apply_config(new.model_copy(update={name: getattr(old, name) for name in _RESTART_ONLY}))
        result: dict[str, Any] = {
            "object": "reload",
            "added": list(report.added),
            "removed": list(report.removed),
            "changed": list(report.changed),
            "unchanged": list(report.unchanged),
            "restart_required": restart,
        }
        if restart:
            result["message"] = (
                f"Changes to {', '.join(restart)} take effect only after a restart; they were "
                "not applied. Model changes were applied."
            )
        log.info(
            "config reloaded from %s: added %s, removed %s, changed %s%s",
            self.path,
            report.added or "none",
            report.removed or "none",
            report.changed or "none",
            f"; restart required for {', '.join(restart)}" if restart else "",
        )
        return result


def install_sighup(state: ReloadTarget, reloader: Reloader) -> Callable[[], None]:
    """SIGHUP reloads (uvicorn handles only INT and TERM); returns the undo. A no-op off the main thread."""
    loop = asyncio.get_running_loop()
    running: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        try:
            await reloader.reload(state)
        except ConfigError as exc:
            log.error("SIGHUP: config not reloaded, nothing changed: %s", exc)
        except Exception:
            log.exception("SIGHUP: config reload failed")

    def on_hup() -> None:
        task = loop.create_task(reload(), name="SIGHUP reload")
        running.add(task)
        task.add_done_callback(running.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    except (ValueError, RuntimeError, NotImplementedError):  # not the main thread (an in-process test)
        return lambda: None

    def remove() -> None:
        loop.remove_signal_handler(signal.SIGHUP)
        for task in running:
            task.cancel()

    return remove
