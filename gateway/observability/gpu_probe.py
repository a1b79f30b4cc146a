"""GPUs as NVML sees them. NVML is optional: without a driver the answer is empty, with the reason.

NVML calls block (an ioctl each; ``nvmlInit`` can take a second), so a reading is cached for ``ttl``
seconds and the async entry point reads on a worker thread: ``/health``, ``/metrics`` and
``/gpu/status`` never wait on the driver more than once per ``ttl``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

log = logging.getLogger("gateway.observability.gpu_probe")

_TEMPERATURE_GPU = 0  # pynvml.NVML_TEMPERATURE_GPU, spelled out so a fake module need not define it

T = TypeVar("T")


class NvmlMemory(Protocol):
    @property
    def total(self) -> int: ...
    @property
    def used(self) -> int: ...
    @property
    def free(self) -> int: ...


class NvmlUtilization(Protocol):
    @property
    def gpu(self) -> int: ...  # percent


class NvmlProcess(Protocol):
    @property
    def pid(self) -> int: ...

    # ``usedGpuMemory`` is read with getattr: some drivers leave it out


class Nvml(Protocol):
    """The slice of ``pynvml`` the probe calls; the module itself satisfies it, and so does a fake.

    A device handle is opaque here: it is only passed back to NVML.
    """

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> object: ...
    def nvmlDeviceGetName(self, handle: object) -> bytes | str: ...
    def nvmlDeviceGetUUID(self, handle: object) -> bytes | str: ...
    def nvmlDeviceGetMemoryInfo(self, handle: object) -> NvmlMemory: ...
    def nvmlDeviceGetUtilizationRates(self, handle: object) -> NvmlUtilization: ...
    def nvmlDeviceGetTemperature(self, handle: object, sensor: int) -> int: ...
    def nvmlDeviceGetPowerUsage(self, handle: object) -> int: ...  # milliwatts
    def nvmlDeviceGetComputeRunningProcesses(self, handle: object) -> Sequence[NvmlProcess] | None: ...


@dataclass(frozen=True)
class GpuProcess:
    pid: int  # as the driver sees it: the host's pid namespace, which differs inside a container
    used_memory: int | None  # bytes; None where the driver does not say (MIG, WDDM)


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    uuid: str
    memory_total: int
    memory_used: int
    memory_free: int
    utilization: float | None  # 0..1
    temperature_c: int | None
    power_w: float | None
    processes: tuple[GpuProcess, ...] = ()


@dataclass(frozen=True)
class GpuReport:
    devices: tuple[GpuInfo, ...]
    reason: str | None  # why the list is empty or incomplete; None when every GPU was read
    read_at: float  # wall clock


class GpuProbe:
    """Reads NVML through ``nvml`` (``pynvml`` from nvidia-ml-py, or a fake in tests)."""

    def __init__(
        self, nvml: Nvml | None = None, *, ttl: float = 2.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._nvml = nvml
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()  # readers run on worker threads and on the event loop
        self.reason: str | None = None
        self._ready = False
        self._count: int | None = None
        self._cached: tuple[float, GpuReport] | None = None

    def _init(self) -> Nvml | None:
        """The initialised NVML, or None (and ``reason``) where there is none."""
        if self._ready:
            return self._nvml
        if self.reason is not None:
            return None  # a machine without a driver does not grow one: do not retry on every request
        try:
            nvml = self._nvml
            if nvml is None:
                import pynvml

                nvml = self._nvml = pynvml
            nvml.nvmlInit()
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
            self.reason = f"NVML is not available: {_describe(exc)}"
            log.info("no GPUs visible: %s", self.reason)
            return None
        self._ready = True
        return nvml

    def count(self) -> int:
        """How many GPUs NVML lists; after the first call, a plain attribute read (NVML enumerates at init)."""
        if self._count is not None:
            return self._count
        with self._lock:
            return self._count_locked()

    def _count_locked(self) -> int:
        if self._count is not None:
            return self._count
        nvml = self._init()
        if nvml is None:
            return 0
        try:
            self._count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:
            self.reason = f"NVML failed: {_describe(exc)}"
            return 0
        return self._count

    def read(self) -> GpuReport:
        """The cached reading if younger than ``ttl``, else a fresh one. Blocks; never raises."""
        with self._lock:
            if self._cached is not None and self._clock() - self._cached[0] < self._ttl:
                return self._cached[1]
            report = self._read_locked()
            self._cached = (self._clock(), report)
            return report

    async def report(self) -> GpuReport:
        """``read`` without blocking the event loop (a fresh cache is returned in place)."""
        cached = self._cached
        if cached is not None and self._clock() - cached[0] < self._ttl:
            return cached[1]
        return await asyncio.to_thread(self.read)

    def devices(self) -> list[GpuInfo]:
        return list(self.read().devices)

    def _read_locked(self) -> GpuReport:
        count = self._count_locked()
        nvml = self._nvml if self._ready else None
        if nvml is None or self._count is None:
            return GpuReport((), self.reason or "NVML is not available", time.time())
        out: list[GpuInfo] = []
        failures: list[str] = []
        for index in range(count):
            try:
                out.append(_device(nvml, index))
            except Exception as exc:  # one lost GPU (Xid 79, "GPU is lost") must not hide the others
                failures.append(f"GPU {index} could not be read: {_describe(exc)}")
        if count == 0:
            failures.append("NVML lists no GPUs")
        return GpuReport(tuple(out), "; ".join(failures) or None, time.time())

    def close(self) -> None:
        with self._lock:
            if self._ready and self._nvml is not None:
                try:
                    self._nvml.nvmlShutdown()
                except Exception:
                    pass
                self._ready = False
                self._count = None
                self._cached = None


def _device(nvml: Nvml, index: int) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    mem = nvml.nvmlDeviceGetMemoryInfo(handle)
    return GpuInfo(
        index=index,
        name=_text(nvml.nvmlDeviceGetName(handle)),
        uuid=_optional(lambda: _text(nvml.nvmlDeviceGetUUID(handle))) or "",
        memory_total=int(mem.total),
        memory_used=int(mem.used),
        memory_free=int(mem.free),
        utilization=_optional(lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0),
        temperature_c=_optional(lambda: int(nvml.nvmlDeviceGetTemperature(handle, _TEMPERATURE_GPU))),
        power_w=_optional(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0),
        processes=_optional(lambda: _processes(nvml.nvmlDeviceGetComputeRunningProcesses(handle))) or (),
    )


def _processes(found: Sequence[NvmlProcess] | None) -> tuple[GpuProcess, ...]:
    out = []
    for proc in found or ():
        used = getattr(proc, "usedGpuMemory", None)
        out.append(GpuProcess(int(proc.pid), None if used is None else int(used)))
    return tuple(out)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__} ({text})" if text and text != type(exc).__name__ else type(exc).__name__


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _optional(read: Callable[[], T]) -> T | None:
    try:
        return read()
    except Exception:  # some boards do not report power, temperature or processes (NVMLError_NotSupported)
        return None
