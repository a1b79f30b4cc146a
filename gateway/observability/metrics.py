"""Prometheus metrics (prefix ``gateway_``), in a registry owned by one app — never the global one.

Labels are bounded: ``model`` is a configured name (or ``""`` for requests that named none we serve),
``endpoint`` one of a fixed set, ``status`` an HTTP code. No label carries a prompt, key or request id.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from engines.replica.state import EngineState
from gateway.observability.gpu_probe import GpuInfo

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_STARTUP_BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 900, 1800)
# A wake takes seconds (level 1: weights back from host RAM) to a minute or two (level 2: reloaded from disk).
_WAKE_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)


class _Callback(Collector):
    """Values read at scrape time (engine states, GPUs): no bookkeeping on the hot path."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


M = TypeVar("M", bound=MetricWrapperBase)


class _Children(Generic[M]):
    """A labelled metric's children by label values, each made once: ``labels()`` validates its values and
    takes a lock on every call (~4 µs, several times a request), a dict lookup does not. Label values are
    bounded (module docstring), so the cache is too."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: M) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # `_created` series double the scrape for no dashboard's benefit
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "gateway_requests",
            "Requests answered, by model, endpoint and status.",
            ["model", "endpoint", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "gateway_request_duration_seconds",
            "Time from request to the last byte.",
            ["model", "endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "gateway_time_to_first_token_seconds",
            "Time from request to the first streamed event.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.chunk_gap = Histogram(
            "gateway_time_between_chunks_seconds",
            "Mean gap between streamed events, one observation per stream.",
            ["model"],
            buckets=_GAP_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "gateway_requests_in_flight", "Requests being answered by an engine.", ["model"], registry=r
        )
        self.queued = Gauge(
            "gateway_queue_depth", "Requests waiting for a model to become ready.", ["model"], registry=r
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors", "Failures talking to engines, by kind.", ["model", "kind"], registry=r
        )
        self.tokens = Counter("gateway_tokens", "Tokens reported by engines in usage.", ["model", "kind"], registry=r)
        self.restarts = Counter(
            "gateway_engine_restarts",
            "Engine restarts after a crash or failed health.",
            ["model", "replica"],
            registry=r,
        )
        self.startup = Histogram(
            "gateway_engine_startup_seconds",
            "Time from launch to ready.",
            ["model"],
            buckets=_STARTUP_BUCKETS,
            registry=r,
        )
        self.wake = Histogram(
            "gateway_engine_wake_seconds",
            "Time from the wake of a sleeping engine to ready.",
            ["model"],
            buckets=_WAKE_BUCKETS,
            registry=r,
        )
        # What a swap, a cold start or a full model cost the requests that waited for it (queued ones only:
        # the common request, answered at once, is not observed).
        self.queue_wait = Histogram(
            "gateway_queue_wait_seconds",
            "Time a queued request waited for its replica (granted).",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # The request path's children, cached (``requests_of(model, endpoint, status).inc()``).
        self.requests_of = _Children(self.requests)
        self.duration_of = _Children(self.duration)
        self.ttft_of = _Children(self.ttft)
        self.chunk_gap_of = _Children(self.chunk_gap)
        self.in_flight_of = _Children(self.in_flight)
        self.queued_of = _Children(self.queued)
        self.queue_wait_of = _Children(self.queue_wait)
        self.upstream_errors_of = _Children(self.upstream_errors)
        self.tokens_of = _Children(self.tokens)

    def add_collector(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self.registry.register(_Callback(collect))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def probe_failures_family(rows: Iterable[tuple[str, int, int]]) -> CounterMetricFamily:
    """``gateway_engine_probe_failures_total{model,replica}``: a flapping engine shows here before any state."""
    family = CounterMetricFamily(
        "gateway_engine_probe_failures", "Failed health probes of a running engine.", labels=["model", "replica"]
    )
    for model, replica, count in rows:
        family.add_metric([model, str(replica)], float(count))
    return family


def affinity_family(rows: Iterable[tuple[str, int, int]]) -> CounterMetricFamily:
    """``gateway_affinity_total{model,outcome}``: requests with an affinity (several replicas) that went to the
    replica hashing gave them (``sticky``), or elsewhere because it was over the load bound (``spilled``)."""
    family = CounterMetricFamily(
        "gateway_affinity", "Requests routed by conversation affinity, by outcome.", labels=["model", "outcome"]
    )
    for model, sticky, spilled in rows:
        family.add_metric([model, "sticky"], float(sticky))
        family.add_metric([model, "spilled"], float(spilled))
    return family


def worker_families(connected: int, restarts: int) -> list[Metric]:
    """With ``server.workers`` > 1: ``gateway_workers`` (connected to the owner) and
    ``gateway_worker_restarts_total`` (died and replaced: a crash loop shows here)."""
    workers = GaugeMetricFamily("gateway_workers", "Worker processes connected to the engines' owner.")
    workers.add_metric([], float(connected))
    replaced = CounterMetricFamily("gateway_worker_restarts", "Worker processes that died and were replaced.")
    replaced.add_metric([], float(restarts))
    return [workers, replaced]


def engine_state_family(rows: Iterable[tuple[str, int, str]]) -> GaugeMetricFamily:
    """``gateway_engine_state{model,replica,state}``: 1 for the state each replica is in, 0 for the others."""
    family = GaugeMetricFamily(
        "gateway_engine_state", "Engine replica state (1 = current).", labels=["model", "replica", "state"]
    )
    for model, replica, current in rows:
        for state in EngineState:
            family.add_metric([model, str(replica), state.value], 1.0 if state.value == current else 0.0)
    return family


# (name, help, value of one GPU); a GPU that does not report a value is left out of that family
_GPU_GAUGES: tuple[tuple[str, str, Callable[[GpuInfo], float | None]], ...] = (
    ("gateway_gpu_memory_used_bytes", "GPU memory in use, as NVML reports it.", lambda g: g.memory_used),
    ("gateway_gpu_memory_total_bytes", "GPU memory in all.", lambda g: g.memory_total),
    ("gateway_gpu_utilization_ratio", "Share of the last sample period a kernel ran (0..1).", lambda g: g.utilization),
    ("gateway_gpu_temperature_celsius", "GPU core temperature.", lambda g: g.temperature_c),
    ("gateway_gpu_power_watts", "GPU board power draw.", lambda g: g.power_w),
)


def gpu_families(devices: Iterable[GpuInfo]) -> list[GaugeMetricFamily]:
    families = [GaugeMetricFamily(name, doc, labels=["gpu"]) for name, doc, _ in _GPU_GAUGES]
    for gpu in devices:
        for family, (_, _, value_of) in zip(families, _GPU_GAUGES, strict=True):
            value = value_of(gpu)
            if value is not None:
                family.add_metric([str(gpu.index)], float(value))
    return families


class GpuCollector(Collector):
    """GPU gauges read at scrape time from the probe's short-lived cache.

    ``describe`` answers without reading, so registering the collector does not call the driver.
    """

    def __init__(self, read: Callable[[], Iterable[GpuInfo]]) -> None:
        self._read = read

    def describe(self) -> Iterable[Metric]:
        return gpu_families(())

    def collect(self) -> Iterable[Metric]:
        return gpu_families(self._read())


def merge_expositions(texts: Iterable[str]) -> bytes:
    """Several processes' expositions as one: series with the same name and labels are added up.

    Every series the workers keep is a count, a sum or a bucket, or a gauge whose total is the answer
    (requests in flight, queue depth), so a sum is right for all of them. Families keep the order of
    their first appearance; the owner's text comes first.
    """
    families: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            _, _, samples = families.setdefault(family.name, (family.type, family.documentation, {}))
            for sample in family.samples:
                key = (sample.name, tuple(sample.labels.items()))
                samples[key] = samples.get(key, 0.0) + sample.value
    lines: list[str] = []
    for name, (type_, doc, samples) in families.items():
        shown = name + "_total" if type_ == "counter" else name  # as generate_latest names them (the parser drops it)
        lines.append(f"# HELP {shown} {_escape_help(doc)}")
        lines.append(f"# TYPE {shown} {type_}")
        for (sample_name, labels), value in samples.items():
            rendered = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels)
            lines.append(
                f"{sample_name}{{{rendered}}} {floatToGoString(value)}"
                if rendered
                else f"{sample_name} {floatToGoString(value)}"
            )
    return ("\n".join(lines) + "\n").encode()


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
