"""The gauges: what the daemon is like right now, read when Prometheus scrapes (``metrics.get``,
``/metrics``). Counters and histograms are ``metrics.Metrics``'; docs/protocol.md lists every
family served.

Owns nothing: it reads the slot table (pools, slots, leases), the git runner, the supervisor's
disk figures, the store, the dispatcher, the RPC server and a few facts of the daemon's own
(``About``), each given to it. Pools with ``metrics: false`` are left out of the per-pool series.
"""

from __future__ import annotations

import platform
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily, Metric

from necrod import __version__
from necrod.core.clock import Clock
from necrod.core.tasks import TaskState
from necrod.daemon.dispatcher import Dispatcher
from necrod.daemon.slottable import SlotTable
from necrod.daemon.supervisor import Supervisor
from necrod.io.gitrun import GitRunner
from necrod.io.server import RpcServer
from necrod.io.store import StateStore

#: Why a queued task waits (``Task.waiting_on``); "dependencies" is every queued task not ready.
WAITING_REASONS = ("dependencies", "backoff", "capacity", "resources", "slot")


@dataclass(frozen=True, slots=True)
class About:
    """What only the daemon itself knows, as the gauges need it."""

    git_version: str
    generation: int
    last_reload_ok: bool
    degraded_reasons: int
    min_free_disk: int


def _family(
    name: str, doc: str, labels: list[str] | None = None, value: float | None = None
) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels, value=value)


class Gauges:
    def __init__(self, *, table: SlotTable, git: GitRunner, supervisor: Supervisor, store: StateStore,
                 dispatcher: Dispatcher, server: RpcServer, about: Callable[[], About],
                 clock: Clock) -> None:  # fmt: skip
        self.table = table
        self.git = git
        self.supervisor = supervisor
        self.store = store
        self.dispatcher = dispatcher
        self.server = server
        self.about = about
        self.clock = clock

    def collect(self) -> Iterable[Metric]:
        about = self.about()
        yield from self._daemon(about)
        yield from self._pools()
        yield from self._disk(about)
        yield from self._tasks()

    def _daemon(self, about: About) -> Iterable[Metric]:
        info = _family("necrod_build_info", "necrod's version, the Python it runs on and the git it runs; always 1.",
                       ["version", "python", "git"])  # fmt: skip
        info.add_metric([__version__, platform.python_version(), about.git_version], 1)
        yield info
        yield _family("necrod_config_generation", "Config generation in use.", value=about.generation)
        yield _family("necrod_config_last_reload_successful",
                      "0 while the last config reload was rejected (the running config is kept).",
                      value=1 if about.last_reload_ok else 0)  # fmt: skip
        yield _family("necrod_degraded", "Reasons the daemon is degraded now (daemon.status); 0 when running well.",
                      value=about.degraded_reasons)  # fmt: skip
        yield _family("necrod_git_processes", "git processes running now.", value=self.git.running)
        yield _family("necrod_connections", "Open client connections.", value=len(self.server.connections))
        yield _family("necrod_leases", "Leases held now.", value=len(self.table.leases))

    def _pools(self) -> Iterable[Metric]:
        slots = _family("necrod_slots", "Slots by pool and state.", ["pool", "state"])
        waiting = _family("necrod_waiting_allocations", "Allocations queued for a slot.", ["pool"])
        ready = _family("necrod_pool_ready", "1 when the pool serves leases.", ["pool"])
        max_slots = _family(
            "necrod_pool_max_slots", "The most slots the pool may have (max_slots).", ["pool"]
        )
        failing = _family("necrod_fetch_failing", "1 while the pool's fetches fail.", ["pool"])
        last_ok = _family("necrod_fetch_last_success_timestamp_seconds",
                          "When the pool's mirror was last fetched (or cloned) successfully, Unix time.",
                          ["pool"])  # fmt: skip
        interval = _family("necrod_fetch_interval_seconds", "The pool's fetch_interval_s (absent when fetching is off).",
                           ["pool"])  # fmt: skip
        oldest = _family("necrod_lease_oldest_age_seconds",
                         "Age of the pool's oldest lease held now (since it was granted).", ["pool"])  # fmt: skip
        now = self.clock.wall()
        granted: dict[str, float] = {}
        for slot in self.table.leases.values():
            if slot.lease is not None:
                granted[slot.pool] = min(granted.get(slot.pool, now), slot.lease.granted_at)
        for name, p in self.table.pools.items():
            if not p.config.metrics:
                continue
            for state, count in p.by_state().items():
                slots.add_metric([name, state], count)
            waiting.add_metric([name], len(p.waiters))
            ready.add_metric([name], 1 if p.state == "ready" and not p.draining else 0)
            max_slots.add_metric([name], p.config.max_slots)
            failing.add_metric([name], 1 if p.fetch.failing_since is not None else 0)
            if p.fetch.last_ok_at is not None:
                last_ok.add_metric([name], p.fetch.last_ok_at)
            if p.config.fetch_interval_s:  # none: fetching is off for the pool (fetch_interval_s: 0)
                interval.add_metric([name], p.config.fetch_interval_s)
            if name in granted:
                oldest.add_metric([name], max(0.0, now - granted[name]))
        yield from (slots, waiting, ready, max_slots, failing, last_ok, interval, oldest)

    def _disk(self, about: About) -> Iterable[Metric]:
        yield _family("necrod_disk_low", "1 while free disk is below min_free_disk.",
                      value=1 if self.table.disk_low else 0)  # fmt: skip
        yield _family("necrod_disk_min_free_bytes", "daemon.min_free_disk.", value=about.min_free_disk)
        free = _family("necrod_disk_free_bytes", "Free bytes on the workspaces file system.")
        if self.supervisor.free_bytes is not None:
            free.add_metric([], self.supervisor.free_bytes)
        yield free
        state_free = _family(
            "necrod_state_disk_free_bytes", "Free bytes on the state directory's file system."
        )
        if self.supervisor.state_free_bytes is not None:
            state_free.add_metric([], self.supervisor.state_free_bytes)
        yield state_free
        yield _family("necrod_state_read_only", "1 while changes cannot be saved (the state disk is full).",
                      value=1 if self.store.read_only is not None else 0)  # fmt: skip

    def _tasks(self) -> Iterable[Metric]:
        tasks = _family("necrod_tasks", "Tasks by state.", ["state"])
        counts = self.dispatcher.counts()
        for state, count in counts.items():
            tasks.add_metric([state], count)
        running = _family("necrod_tasks_running", "Running tasks by runner profile.", ["runner"])
        for name, count in Counter(a.profile.name for a in self.dispatcher.active.values()).items():
            running.add_metric([name], count)
        waiting = _family("necrod_tasks_waiting", "Queued tasks by what they wait on.", ["reason"])
        ready = self.dispatcher.index.ready
        why = Counter(t.waiting_on or "slot" for t in ready.values() if t.state is TaskState.QUEUED)
        why["dependencies"] = max(0, counts.get(TaskState.QUEUED.value, 0) - len(ready))
        for reason in WAITING_REASONS:
            waiting.add_metric([reason], why.get(reason, 0))
        yield from (tasks, running, waiting)
        yield _family("necrod_dispatcher_stalled",
                      "1 while tasks are queued, none runs and none can start (daemon.status says which chain).",
                      value=1 if self.dispatcher.stalled else 0)  # fmt: skip
