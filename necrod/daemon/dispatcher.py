"""The dispatcher: tasks queued, scheduled, run in slots, watched, retried.

A task names a pool and what to run. When its dependencies have succeeded, capacity allows and
the machine is not overloaded, the scheduler (``core.scheduler``) picks it and a runner profile;
the dispatcher leases a slot (the task is the holder), starts the runner in the slot and
watches it: its exit, its output (a runner silent for ``output_timeout_s`` is stopped), its time
(``timeout_s``) and its lease (a runner that stops heartbeating loses its lease and is stopped
before the slot is salvaged). Success releases the slot; anything else salvages it first. A
failure is retried with exponential backoff up to ``max_retries``; a task that finally fails
or is cancelled blocks the tasks that depend on it.

Restarts: tasks and attempts are in the state database. Local runners keep running across a
daemon stop, restart or crash: tmux sessions are found again by name, process runners by their
pid (checked against their command line), and a runner that ended meanwhile is known by the
exit record its wrapper left. An attempt the daemon could not find again (a reboot) is recorded
as ``interrupted`` and does not use up a retry.

This module is the front door: ``Dispatcher`` builds the rooms of ``necrod.daemon.tasks`` (the
task book, placement, attempts, recovery, the host watch, and what they share), hands each what
it uses, and forwards the daemon's and the API's calls to them. It owns only whether the
dispatcher is stopping. Of the pool engine it is given the slot table (``pool``, ``pools``,
``leases``), the allocator (``allocate``, ``release``, ``lease_hooks``, ``on_slot_available``)
and the lifecycle (``isolate``), nothing else.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskStatus

from necrod.core.clock import Clock
from necrod.core.config import Config, DispatcherConfig
from necrod.core.config.runners import dispatch_changes
from necrod.core.scheduler import FairShare
from necrod.core.tasks import Task
from necrod.daemon.allocator import Allocator
from necrod.daemon.fleet import Fleet, origin_id
from necrod.daemon.lifecycle import Lifecycle
from necrod.daemon.metrics import Metrics
from necrod.daemon.slottable import SlotTable
from necrod.daemon.tasks.attempts import Attempts
from necrod.daemon.tasks.hostwatch import HostWatch
from necrod.daemon.tasks.placement import Placement
from necrod.daemon.tasks.profiles import Profiles
from necrod.daemon.tasks.recovery import Recovery
from necrod.daemon.tasks.runners import Runners
from necrod.daemon.tasks.runs import Active, Jobs
from necrod.daemon.tasks.taskbook import TaskBook
from necrod.io.store import StateStore


class Dispatcher:
    def __init__(self, *, table: SlotTable, allocator: Allocator, lifecycle: Lifecycle, store: StateStore, config: Callable[[], Config], socket: Path,
                 state_dir: Path, metrics: Metrics, clock: Clock | None = None) -> None:  # fmt: skip
        self._config = config
        self.clock = clock or Clock()
        #: The active-run table: task id → the attempt being started or running.
        self.active: dict[str, Active] = {}
        self.stopping = False
        cfg = config().dispatcher
        self.fair = FairShare(cfg.fair_share_half_life_s, dict(cfg.fair_share_weights))
        self.jobs = Jobs()
        #: Set once the book is loaded and the runners of the daemon before are found again: the
        #: socket is served before that, and a task call meanwhile would see neither.
        self.recovered = anyio.Event()
        origin = origin_id(state_dir)
        self.runners = Runners(origin, state_dir, self.jobs.spawn)
        self.profiles = Profiles(config=config, pools=lambda: table.pools, store=store, clock=self.clock,
                                 wake=self.wake, refuse=self.runners.refusal)  # fmt: skip
        self.book = TaskBook(store=store, config=config, pools=lambda: table.pools, profiles=self.profiles,
                             active=self.active, fair=self.fair, clock=self.clock, wake=self.wake,
                             stopping=lambda: self.stopping)  # fmt: skip
        self.index = self.book.index
        self.tasks = self.book.tasks
        self.dependents = self.book.dependents
        self.fleet = Fleet(origin)
        #: (host, pool) → monotonic time until which that host had no free slot in that pool.
        no_remote_slot: dict[tuple[str, str], float] = {}
        # Built before placement, which is given its start; it is given placement's accounting
        # and the wake-up as callables.
        self.attempts = Attempts(table=table, allocator=allocator, lifecycle=lifecycle, book=self.book, active=self.active, runners=self.runners,
                                 fleet=self.fleet, no_remote_slot=no_remote_slot, config=config, socket=socket,
                                 state_dir=state_dir, metrics=metrics, clock=self.clock, spawn=self.jobs.spawn,
                                 account=lambda: self.placement.account(), wake=self.wake)  # fmt: skip
        self.placement = Placement(config=config, index=self.index, active=self.active, profiles=self.profiles,
                                   pools=lambda: table.pools, fleet=self.fleet, no_remote_slot=no_remote_slot,
                                   fair=self.fair, clock=self.clock, jobs=self.jobs, to=self.book.to,
                                   start=self.attempts.start, stopping=lambda: self.stopping)  # fmt: skip
        self.recovery = Recovery(tasks=self.tasks, active=self.active, profiles=self.profiles, runners=self.runners,
                                 fleet=self.fleet, leases=lambda: table.leases, config=config, clock=self.clock,
                                 spawn=self.jobs.spawn, watch=self.attempts.watch, finish=self.attempts.finish,
                                 release=self.attempts.release)  # fmt: skip
        self.hostwatch = HostWatch(tasks=self.tasks, active=self.active, fleet=self.fleet, pools=lambda: table.pools,
                                   config=config, socket=socket, clock=self.clock, release=self.attempts.release,
                                   save=self.book.save, wake=self.wake, stopping=lambda: self.stopping)  # fmt: skip
        self.fleet.on_up.append(self.hostwatch.host_returned)
        allocator.lease_hooks.append(self.attempts.lease_ended)
        allocator.on_slot_available.append(lambda pool: self.wake())

    @property
    def cfg(self) -> DispatcherConfig:
        return self._config().dispatcher

    def wake(self) -> None:
        self.placement.wake()

    def schedule(self) -> int:
        """Start every task that can start now; returns how many started."""
        return self.placement.schedule()

    @property
    def stalled(self) -> list[str]:
        """The chains that hold a stuck queue (empty when nothing is stuck)."""
        return self.placement.stalled

    @property
    def scheduled(self) -> int:
        return self.placement.scheduled

    # --- startup --------------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self.book.load()
        self.profiles.load()
        try:
            async with anyio.create_task_group() as tg:
                self.jobs.tg = tg
                await tg.start(self.fleet.run, self._config().hosts)
                await self.recovery.reconcile()
                self.recovered.set()
                task_status.started()
                tg.start_soon(self.hostwatch.watch_remote_leases)
                await self.placement.loop()
        finally:
            with anyio.CancelScope(shield=True):
                await self.runners.aclose()

    def apply_config(self, config: Config) -> list[str]:
        """What a reload changes here: runner profiles and dispatcher settings (read from the
        config at each use: only said), and the hosts (links opened, restarted or closed)."""
        return dispatch_changes(self._config(), config) + self.fleet.apply(config.hosts)

    # --- the task book ----------------------------------------------------------------------------

    async def submit(
        self, params: dict[str, Any], uid: int | None = None, *, admin: bool = True
    ) -> dict[str, Any]:
        """One task, or a batch (``tasks: [...]``) with dependencies between its members, owned
        by ``uid`` (an admin, or not: see ``Task.non_admin``)."""
        return await self.book.submit(params, uid, admin=admin)

    def task(self, task_id: str) -> Task:
        return self.book.task(task_id)

    def matching(self, *, state: str | None = None, pool: str | None = None, label: str | None = None,
                 batch: str | None = None) -> list[Task]:  # fmt: skip
        return self.book.matching(state=state, pool=pool, label=label, batch=batch)

    def graph(self, tasks: Iterable[Task]) -> list[list[str]]:
        return self.book.graph(tasks)

    async def logs(self, task_id: str, attempt: int | None, offset: int, limit: int) -> dict[str, Any]:
        return await self.book.logs(task_id, attempt, offset, limit)

    def counts(self) -> dict[str, int]:
        return self.book.counts()

    async def cancel(self, task_id: str | None, batch: str | None, *, reason: str | None = None,
                     force: bool = False, by: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
        return await self.book.cancel(task_id, batch, reason=reason, force=force, by=by)

    async def retry(self, task_id: str | None, batch: str | None) -> dict[str, Any]:
        return await self.book.retry(task_id, batch)

    # --- stopping ---------------------------------------------------------------------------------

    async def stop(self) -> None:
        """No new task starts; every runner keeps running for the next daemon, which finds it
        again (``Recovery``)."""
        self.stopping = True
        self.runners.cgroup_parents.tidy()

    # --- hosts and status -------------------------------------------------------------------------

    def runner_views(self) -> list[dict[str, Any]]:
        """The runner profiles: launcher, limits, pools, running tasks, and whether paused."""
        running = Counter(a.profile.name for a in self.active.values())
        return [{"name": p.name, "launcher": p.launcher, "max_concurrency": p.max_concurrency,
                 "running": running.get(p.name, 0), "skills": list(p.skills),
                 "pools": list(p.pools) if p.pools is not None else None, "memory_limit": p.memory_limit,
                 "cpu_limit": p.cpu_limit, "paused": name in self.profiles.paused,
                 "pause": self.profiles.paused.get(name)}
                for name, p in self._config().runners.items()]  # fmt: skip

    def hosts(self) -> list[dict[str, Any]]:
        return self.hostwatch.hosts()

    def refused(self) -> list[str]:
        """The configured runner profiles this host cannot start, each with why."""
        return [why for p in self._config().runners.values() if (why := self.runners.refusal(p)) is not None]

    def status(self) -> dict[str, Any]:
        running = Counter(a.profile.name for a in self.active.values())
        return {"tasks": self.counts(), "running_by_profile": dict(running), "stalled": self.stalled,
                "policy": self.cfg.policy, "memory_cgroups": self.runners.cgroups,
                "memory_cgroups_problem": self.runners.cgroup_parents.memory_problem,
                "cpu_cgroups": self.runners.cgroup_parents.cpu[1] if self.runners.cgroup_parents.cpu else None,
                "cpu_cgroups_problem": self.runners.cgroup_parents.cpu_problem,
                "refused_profiles": self.refused(),
                "runner_cgroups": self.runners.cgroup_parents.unified is not None,
                "paused": sorted(self.profiles.paused),
                "placements": {"made": self.placement.scheduled, "found_no_slot": self.attempts.found_no_slot},
                "fair_share_usage": self.fair.snapshot(self.clock.monotonic())}  # fmt: skip
