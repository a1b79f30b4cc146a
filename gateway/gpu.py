"""GPUs as NVML sees them. NVML is optional: without a driver the answer is empty, with the reason."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

log = logging.getLogger("gateway.gpu")


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


class GpuProbe:
    """Reads NVML through ``nvml`` (``pynvml`` from nvidia-ml-py, or a fake in tests)."""

    def __init__(self, nvml: ModuleType | Any | None = None) -> None:
        self._nvml = nvml
        self.reason: str | None = None
        self._ready = False

    def _init(self) -> bool:
        if self._ready:
            return True
        if self.reason is not None:
            return False
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            self._nvml.nvmlInit()
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
            self.reason = f"NVML is not available: {type(exc).__name__}"
            log.info("no GPUs visible: %s", self.reason)
            return False
        self._ready = True
        return True

    def count(self) -> int:
        if not self._init():
            return 0
        try:
            return int(self._nvml.nvmlDeviceGetCount())
        except Exception as exc:
            self.reason = f"NVML failed: {type(exc).__name__}"
            return 0

    def devices(self) -> list[GpuInfo]:
        if not self._init():
            return []
        nvml = self._nvml
        out = []
        for index in range(self.count()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            out.append(GpuInfo(
                index=index,
                name=_text(nvml.nvmlDeviceGetName(handle)),
                uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                memory_total=int(mem.total), memory_used=int(mem.used), memory_free=int(mem.free),
                utilization=_optional(lambda h=handle: nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100.0),
                temperature_c=_optional(lambda h=handle: int(nvml.nvmlDeviceGetTemperature(h, 0))),
                power_w=_optional(lambda h=handle: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0),
            ))
        return out

    def close(self) -> None:
        if self._ready:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._ready = False


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _optional(read: Any) -> Any:
    try:
        return read()
    except Exception:  # some boards do not report power or temperature
        return None
