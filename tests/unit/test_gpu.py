"""GpuProbe over a fake NVML module: readings, missing values, no driver, the cache, the metrics."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.observability.gpu_probe import GpuProbe
from gateway.observability.metrics import GpuCollector

GiB = 1024**3


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


class NVMLError_LibraryNotFound(NVMLError):
    def __str__(self) -> str:
        return "NVML Shared Library Not Found"


@dataclass
class FakeGpu:
    name: str
    total: int
    used: int
    util: int = 0
    temp: int = 40
    power_mw: int | None = 100_000  # None: the board does not report power
    processes: list[tuple[int, int | None]] = field(default_factory=list)
    lost: bool = False


class FakeNvml:
    """The slice of pynvml that GpuProbe uses; counts calls so tests can see the cache work."""

    def __init__(self, gpus: list[FakeGpu], *, init_error: Exception | None = None) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.calls: dict[str, int] = {}
        self.shutdowns = 0

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def nvmlInit(self) -> None:
        self._count("init")
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        if self.gpus[index].lost:
            raise NVMLError("GPU is lost")
        return self.gpus[index]

    def nvmlDeviceGetName(self, gpu: FakeGpu) -> bytes:
        return gpu.name.encode()  # older pynvml returns bytes

    def nvmlDeviceGetUUID(self, gpu: FakeGpu) -> str:
        return f"GPU-{gpu.name}"

    def nvmlDeviceGetMemoryInfo(self, gpu: FakeGpu) -> Any:
        self._count("memory")
        return SimpleNamespace(total=gpu.total, used=gpu.used, free=gpu.total - gpu.used)

    def nvmlDeviceGetUtilizationRates(self, gpu: FakeGpu) -> Any:
        return SimpleNamespace(gpu=gpu.util, memory=0)

    def nvmlDeviceGetTemperature(self, gpu: FakeGpu, sensor: int) -> int:
        assert sensor == 0
        return gpu.temp

    def nvmlDeviceGetPowerUsage(self, gpu: FakeGpu) -> int:
        if gpu.power_mw is None:
            raise NVMLError_NotSupported()
        return gpu.power_mw

    def nvmlDeviceGetComputeRunningProcesses(self, gpu: FakeGpu) -> list[Any]:
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in gpu.processes]


def three_gpus() -> FakeNvml:
    return FakeNvml(
        [
            FakeGpu("H100-a", 80 * GiB, 60 * GiB, util=87, temp=61, power_mw=412_500, processes=[(4242, 59 * GiB)]),
            FakeGpu("H100-b", 80 * GiB, 1 * GiB, util=0, temp=35),
            FakeGpu("A10", 24 * GiB, 2 * GiB, util=5, power_mw=None, processes=[(7, None)]),
        ]
    )


def test_reads_every_gpu_and_leaves_out_what_a_board_does_not_report() -> None:
    probe = GpuProbe(three_gpus())
    report = probe.read()
    assert report.reason is None
    assert [g.name for g in report.devices] == ["H100-a", "H100-b", "A10"]
    a, _, a10 = report.devices
    assert (a.index, a.uuid, a.memory_total, a.memory_used, a.memory_free) == (
        0,
        "GPU-H100-a",
        80 * GiB,
        60 * GiB,
        20 * GiB,
    )
    assert a.utilization == pytest.approx(0.87) and a.temperature_c == 61 and a.power_w == pytest.approx(412.5)
    assert [(p.pid, p.used_memory) for p in a.processes] == [(4242, 59 * GiB)]
    assert a10.power_w is None and a10.temperature_c == 40
    assert [(p.pid, p.used_memory) for p in a10.processes] == [(7, None)]
    assert probe.count() == 3


def test_no_driver_gives_an_empty_list_with_the_reason_and_is_not_retried() -> None:
    nvml = FakeNvml([], init_error=NVMLError_LibraryNotFound())
    probe = GpuProbe(nvml, ttl=0)
    for _ in range(3):
        report = probe.read()
        assert report.devices == ()
        assert report.reason == "NVML is not available: NVMLError_LibraryNotFound (NVML Shared Library Not Found)"
    assert probe.count() == 0
    assert nvml.calls["init"] == 1
    probe.close()
    assert nvml.shutdowns == 0


def test_a_lost_gpu_does_not_hide_the_others() -> None:
    nvml = three_gpus()
    nvml.gpus[1].lost = True
    report = GpuProbe(nvml).read()
    assert [g.index for g in report.devices] == [0, 2]
    assert report.reason is not None and "GPU 1 could not be read" in report.reason


def test_driver_without_gpus_says_so() -> None:
    report = GpuProbe(FakeNvml([])).read()
    assert report.devices == () and report.reason == "NVML lists no GPUs"


def test_readings_are_cached_for_the_ttl_and_read_off_the_loop() -> None:
    now = [100.0]
    nvml = three_gpus()
    probe = GpuProbe(nvml, ttl=2.0, clock=lambda: now[0])
    first = asyncio.run(probe.report())
    assert nvml.calls["memory"] == 3
    nvml.gpus[0].used = 70 * GiB
    now[0] += 1.0
    assert asyncio.run(probe.report()) is first and probe.read() is first
    assert nvml.calls["memory"] == 3
    now[0] += 1.5
    assert asyncio.run(probe.report()).devices[0].memory_used == 70 * GiB
    assert nvml.calls["init"] == 1
    probe.close()
    assert nvml.shutdowns == 1


def test_gpu_gauges_at_scrape_time() -> None:
    probe = GpuProbe(three_gpus(), ttl=0)
    registry = CollectorRegistry(auto_describe=True)
    registry.register(GpuCollector(lambda: probe.read().devices))
    assert probe._nvml.calls.get("memory", 0) == 0  # registering does not read the driver
    samples = {
        (s.name, s.labels["gpu"]): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }
    assert samples[("gateway_gpu_memory_used_bytes", "0")] == 60 * GiB
    assert samples[("gateway_gpu_memory_total_bytes", "2")] == 24 * GiB
    assert samples[("gateway_gpu_utilization_ratio", "0")] == pytest.approx(0.87)
    assert samples[("gateway_gpu_power_watts", "1")] == 100.0
    assert ("gateway_gpu_power_watts", "2") not in samples  # not reported, not invented


def test_no_gpu_gauges_without_nvml() -> None:
    probe = GpuProbe(FakeNvml([], init_error=NVMLError_LibraryNotFound()))
    registry = CollectorRegistry()
    registry.register(GpuCollector(lambda: probe.read().devices))
    assert 'gpu="' not in generate_latest(registry).decode()
