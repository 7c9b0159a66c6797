"""Prometheus metrics: counters and histograms updated as things happen, gauges read at scrape
(``gauges.Gauges``), and the standard process, platform and garbage-collector collectors.

Rendered by ``metrics.get`` (``necroctl metrics``) and, when ``daemon.metrics_listen`` is set,
served over HTTP. docs/protocol.md lists every family. Counters start at zero for every label
they can have (``track``: each pool, each runner profile, every outcome), so ``rate()`` and
``increase()`` see the first event; a pool or profile removed from the config takes its series
with it. Pools with ``metrics: false`` are left out of the per-pool series.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

_FAST = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_MEMORY = tuple(float(m << 20) for m in (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536))
_SLOW = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)

#: The label values the daemon can give, so that each series exists (at zero) before it is used.
#: ``allocator.expire``'s ways a lease ends without a release:
LEASE_ENDS = ("expired", "revoked", "overdue")
#: ``health``'s anomaly kinds (its module docstring has the table):
ANOMALY_KINDS = ("lease_overdue", "slot_missing", "slot_broken", "stale_lock", "status_failed",
                 "dirty_while_idle", "wrong_commit", "quarantined", "unknown_directory",
                 "stale_mirror_lock", "mirror_objects_missing")  # fmt: skip
#: ``core.tasks.Attempt.outcome``:
OUTCOMES = ("succeeded", "failed", "timeout", "stalled", "lease_lost", "cancelled", "interrupted",
            "lost", "start_failed")  # fmt: skip
RELOAD_RESULTS = ("applied", "rejected")


class _Gauges(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


class Metrics:
    def __init__(self) -> None:
        # No ``*_created`` series: they double the output and nothing here reads them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        r = self.registry = CollectorRegistry()
        # process_* (CPU, memory, open files, start time), python_info, python_gc_*.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self._pools: set[str] = set()
        self._runners: set[str] = set()
        #: Each pool's allocation series, kept at hand: ``labels()`` takes a lock and checks its
        #: arguments, twice per allocation otherwise.
        self._granted: dict[str, tuple[Any, Any]] = {}
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

        for outcome in OUTCOMES:
            self.tasks_finished.labels(outcome)
        for result in RELOAD_RESULTS:
            self.reloads.labels(result)

    def _per_pool(self) -> list[Counter | Histogram]:
        return [self.allocations, self.allocation_seconds, self.releases, self.cleanup_seconds,
                self.cleanup_failures, self.salvages, self.fetch_seconds, self.fetch_failures, self.tampers]  # fmt: skip

    def track(self, pools: Iterable[str], runners: Iterable[str]) -> None:
        """Start the series of these pools and runner profiles at zero, and drop those of pools
        and profiles no longer configured (at start and after each applied reload)."""
        pools, runners = set(pools), set(runners)
        for name in pools - self._pools:
            for metric in self._per_pool():
                metric.labels(name)
            for how in LEASE_ENDS:
                self.lease_ends.labels(name, how)
            for kind in ANOMALY_KINDS:
                self.anomalies.labels(name, kind)
        for name in self._pools - pools:
            self._granted.pop(name, None)
            for metric in self._per_pool():
                metric.remove(name)
            for how in LEASE_ENDS:
                self.lease_ends.remove(name, how)
            for kind in ANOMALY_KINDS:
                self.anomalies.remove(name, kind)
        for name in runners - self._runners:
            self.attempt_seconds.labels(name)
        for name in self._runners - runners:
            self.attempt_seconds.remove(name)
        self._pools, self._runners = pools, runners

    def allocated(self, pool: str, seconds: float) -> None:
        """One lease granted in ``pool``, ``seconds`` after it was asked for."""
        series = self._granted.get(pool)
        if series is None:
            series = self._granted[pool] = (
                self.allocations.labels(pool),
                self.allocation_seconds.labels(pool),
            )
        series[0].inc()
        series[1].observe(seconds)

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
