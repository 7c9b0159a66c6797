"""Prometheus metrics: counters and histograms updated as things happen, gauges read at scrape.

Rendered by ``metrics.get`` (``necroctl metrics``) and, when ``daemon.metrics_listen`` is set,
served over HTTP. Pools with ``metrics: false`` are left out of the per-pool series.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

_FAST = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_MEMORY = tuple(float(m << 20) for m in (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536))
_SLOW = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)


class _Gauges(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.allocations = Counter("necrod_allocations", "Leases granted.", ["pool"], registry=r)
        self.allocation_seconds = Histogram(
            "necrod_allocation_seconds",
            "Time to answer slots.allocate, waiting included.",
            ["pool"],
            buckets=_FAST,
            registry=r,
        )
        self.releases = Counter("necrod_releases", "Leases released by their holder.", ["pool"], registry=r)
        self.lease_ends = Counter(
            "necrod_lease_expiries", "Leases that ended without a release.", ["pool", "how"], registry=r
        )
        self.cleanup_seconds = Histogram(
            "necrod_cleanup_seconds",
            "Time from the start of a cleanup to the slot being available.",
            ["pool"],
            buckets=_SLOW,
            registry=r,
        )
        self.cleanup_failures = Counter("necrod_cleanup_failures", "Failed cleanups.", ["pool"], registry=r)
        self.salvages = Counter("necrod_salvages", "Salvage refs written.", ["pool"], registry=r)
        self.fetch_seconds = Histogram(
            "necrod_fetch_seconds",
            "Duration of successful mirror fetches.",
            ["pool"],
            buckets=_SLOW,
            registry=r,
        )
        self.fetch_failures = Counter("necrod_fetch_failures", "Failed mirror fetches.", ["pool"], registry=r)
        self.tampers = Counter(
            "necrod_tamper_events",
            "Times the mirror's shared files were found changed.",
            ["pool"],
            registry=r,
        )
        self.anomalies = Counter(
            "necrod_anomalies", "Anomalies found by self-healing.", ["pool", "kind"], registry=r
        )
        self.queue_wait = Histogram(
            "necrod_task_queue_wait_seconds",
            "Time tasks waited in the queue before an attempt started.",
            buckets=_SLOW,
            registry=r,
        )
        self.attempt_seconds = Histogram(
            "necrod_task_attempt_seconds", "Duration of task attempts.", ["runner"], buckets=_SLOW, registry=r
        )
        self.runner_cpu_seconds = Counter(
            "necrod_runner_cpu_seconds", "CPU seconds task attempts used, by runner profile.", ["runner"],
            registry=r,
        )  # fmt: skip
        self.runner_peak_memory = Histogram(
            "necrod_runner_peak_memory_bytes", "Peak memory of task attempts, by runner profile.", ["runner"],
            buckets=_MEMORY, registry=r,
        )  # fmt: skip
        self.tasks_finished = Counter(
            "necrod_task_attempts_finished",
            "Task attempts ended, by outcome (throughput, success rate).",
            ["outcome"],
            registry=r,
        )
        self.reloads = Counter(
            "necrod_config_reloads", "Config reloads by result (applied, rejected).", ["result"], registry=r
        )

    def add_gauges(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self.registry.register(_Gauges(collect))

    def runner_usage(self, runner: str, cpu_s: float | None, peak_memory_bytes: int | None) -> None:
        """Count what one attempt of ``runner`` used (per profile: tasks would be too many series)."""
        if cpu_s is not None:
            self.runner_cpu_seconds.labels(runner).inc(cpu_s)
        if peak_memory_bytes is not None:
            self.runner_peak_memory.labels(runner).observe(peak_memory_bytes)

    def render(self) -> str:
        return generate_latest(self.registry).decode()
