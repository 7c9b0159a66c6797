"""Placement: the scheduling pass, the daemon side of ``core.scheduler``. It picks the ready tasks
that can start now and, for each, a place (this host or another) and a runner profile; it
notes why the others wait and which chain holds a stalled queue, samples memory and load, and
charges running tasks' runner-seconds to their fair-share key. It owns the wake-up event, the
stall report, the count of tasks placed and the resource sample. It may change a task's state
(through the task book's ``to``), enter a placed task in the active-run table and spawn
``start`` for it, and update the fair-share usage; it reads the task index, profiles, this
host's pools, the fleet's links and when remote pools were last full."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

import anyio

from necrod.core.clock import Clock
from necrod.core.config import Config, DispatcherConfig, RunnerProfile
from necrod.core.scheduler import FairShare, ProfileView, choose_profile, eligible, fair_key, order
from necrod.core.taskindex import TaskIndex
from necrod.core.tasks import Task, TaskState
from necrod.daemon.fleet import Fleet
from necrod.daemon.tasks.profiles import DEFAULT_PROFILE, Profiles
from necrod.daemon.tasks.runs import Active, Jobs
from necrod.io import sysload

if TYPE_CHECKING:
    from necrod.daemon.pool import Pool

#: The scheduler runs at least this often (backoffs ending, resources freeing).
TICK_S = 1.0
#: Stalled chains named in the status.
STALLED_SHOWN = 20


class Placement:
    def __init__(self, *, config: Callable[[], Config], index: TaskIndex, active: dict[str, Active],
                 profiles: Profiles, pools: Callable[[], Mapping[str, Pool]], fleet: Fleet,
                 no_remote_slot: dict[tuple[str, str], float], fair: FairShare, clock: Clock, jobs: Jobs,
                 to: Callable[[Task, TaskState], None], start: Callable[[Active], Awaitable[None]],
                 stopping: Callable[[], bool]) -> None:  # fmt: skip
        self._config = config
        self.index = index
        self.tasks = index.tasks
        #: The active-run table (task id → Active): a task placed is entered here.
        self.active = active
        self.profiles = profiles
        #: This host's pools (the engine's), by name.
        self._pools = pools
        self.fleet = fleet
        #: (host, pool) → monotonic time until which that host had no free slot in that pool.
        self._no_remote_slot = no_remote_slot
        self.fair = fair
        self.clock = clock
        #: Where ``start`` is spawned; before the dispatcher runs, nothing is placed.
        self.jobs = jobs
        #: Every change of a task's state goes through the task book.
        self._to = to
        #: Starts an attempt of a placed task (run as a background job).
        self._start = start
        self._stopping = stopping
        #: What ``stalled`` says; None: to be found when asked.
        self._stalled: list[str] | None = []
        self.scheduled = 0
        self._wake = anyio.Event()
        self._resources: tuple[float, bool, str | None] = (0.0, True, None)

    @property
    def cfg(self) -> DispatcherConfig:
        return self._config().dispatcher

    def wake(self) -> None:
        self._wake.set()

    async def loop(self) -> None:
        while True:
            self.account()
            self.schedule()
            with anyio.move_on_after(TICK_S):
                await self._wake.wait()
            self._wake = anyio.Event()

    def _resources_ok(self) -> tuple[bool, str | None]:
        """Memory and load against the thresholds, sampled at most once a second."""
        now = self.clock.monotonic()
        at, ok, why = self._resources
        if now - at < 1.0:
            return ok, why
        cfg, ok, why = self.cfg, True, None
        memory = sysload.memory_used_percent()
        if memory is not None and memory > cfg.max_memory_percent:
            ok, why = (
                False,
                f"memory {memory:.0f}% in use, above max_memory_percent {cfg.max_memory_percent:g}",
            )
        load = sysload.load_per_cpu()
        if ok and cfg.max_load_per_cpu is not None and load is not None and load > cfg.max_load_per_cpu:
            ok, why = False, f"load {load:.2f} per CPU, above max_load_per_cpu {cfg.max_load_per_cpu:g}"
        self._resources = (now, ok, why)
        return ok, why

    def schedule(self) -> int:
        """Start every task that can start now; returns how many started."""
        if self._stopping() or self.jobs.tg is None:
            return 0
        cfg = self.cfg
        now = self.clock.wall()
        candidates = []
        for t in self.index.ready.values():
            if t.next_attempt_at > now:
                t.waiting_on = "backoff"
            else:
                candidates.append(t)
        if not candidates:
            self._stalled = None
            return 0
        runners = self._config().runners
        views = self.profiles.views()
        running = Counter(a.profile.name for a in self.active.values())
        total = len(self.active)
        ok, why = self._resources_ok()
        if total >= cfg.max_running or not ok:
            ordered = candidates  # none starts: the order does not matter, only the reason each shows
        else:
            ordered = order(candidates, cfg.policy, label_priority=dict(cfg.label_priority), fair=self.fair,
                            fair_key_by=cfg.fair_share_key, now=self.clock.monotonic())  # fmt: skip
        # Idle slots by pool, less those that attempts started and not yet leased will take:
        # a pass starts no more tasks on a pool than it has slots for (each one more would fail
        # its allocation and go back to the queue).
        free: dict[str, int] = {}
        leasing = Counter(a.task.pool for a in self.active.values() if a.host is None and a.attempt is None)
        on_host = Counter(a.host for a in self.active.values())
        started = 0
        for t in ordered:
            if total >= cfg.max_running:
                t.waiting_on, t.reason = "capacity", f"{total} tasks running (dispatcher.max_running)"
                continue
            if not ok:
                t.waiting_on, t.reason = "resources", why
                continue
            placed = self._place(t, views, runners, running, on_host, free, leasing)
            if isinstance(placed, str):
                t.waiting_on, t.reason = placed.split(":", 1)[0], placed.split(": ", 1)[-1]
                continue
            host, profile = placed
            # Taken: from here the task is ours to start.
            self._to(t, TaskState.RUNNING)
            t.waiting_on = t.reason = None
            a = Active(t, profile, host=host, accounted_at=self.clock.monotonic())
            self.active[t.task_id] = a
            running[profile.name] += 1
            on_host[host] += 1
            if host is None:
                free[t.pool] -= 1
            total += 1
            started += 1
            self.scheduled += 1
            self.jobs.spawn(self._start, a)
        # A stall is found when asked (status, health, metrics), not at every pass: a pass costs
        # what the ready set costs, and finding a stall walks the whole queue.
        self._stalled = [] if started else None
        return started

    def _place(self, t: Task, views: list[ProfileView], runners: dict[str, RunnerProfile], running: Counter[str],
               on_host: Counter[str | None], free: dict[str, int], leasing: Counter[str],
               ) -> tuple[str | None, RunnerProfile] | str:  # fmt: skip
        """Where ``t`` runs now and on which profile: the least loaded place that serves its pool,
        has room and (with its profile) its skills; this host first among equals. Otherwise why
        not, as ``"capacity: ..."`` or ``"slot: ..."``."""
        best: tuple[float, int, str | None, RunnerProfile] | None = None
        slot_why = capacity_why = paused_why = None
        now = self.clock.monotonic()
        for index, (host, skills) in enumerate(self.profiles.places(t)):
            candidates = eligible(t, views, skills)
            if candidates and all(v.paused for v in candidates):
                # Said first: a free slot would not start it, and a busy pool is not why it waits.
                paused_why = "; ".join(v.paused or "" for v in candidates)
                continue
            if host is None:
                pool = self._pools().get(t.pool)
                if pool is None or pool.state != "ready":
                    slot_why = f"pool {t.pool} is {pool.state if pool else 'missing'}"
                    continue
                if t.pool not in free:
                    free[t.pool] = pool.counts().idle - leasing[t.pool]
                if free[t.pool] <= 0:
                    slot_why = f"no free slot in pool {t.pool}"
                    continue
                load = on_host[None] / max(1, self.cfg.max_running)
            else:
                link = self.fleet.links.get(host)
                if link is None or not link.up:
                    slot_why = f"host {host} is {link.state if link else 'not connected'}"
                    continue
                capacity = link.config.max_concurrency
                if on_host[host] >= capacity:
                    capacity_why = f"host {host} runs {capacity} task(s), its max_concurrency"
                    continue
                if self._no_remote_slot.get((host, t.pool), 0.0) > now:
                    slot_why = f"no free slot in pool {t.pool} on host {host}"
                    continue
                load = on_host[host] / capacity
            view = choose_profile(t, views, running, self.cfg.policy, skills)
            profile = runners.get(view.name) if view else None
            if (
                profile is None
                and t.runner is None
                and t.command is not None
                and not candidates
                and not t.skills
            ):
                profile = DEFAULT_PROFILE
            if profile is None:
                names = ", ".join(v.name for v in candidates if v.paused is None) or "none"
                capacity_why = f"eligible runner profiles are busy ({names})"
                continue
            if best is None or (load, index) < best[:2]:
                best = (load, index, host, profile)
        if best is not None:
            return best[2], best[3]
        if paused_why and not capacity_why and not slot_why:
            return f"paused: {paused_why}"
        if capacity_why:
            return f"capacity: {capacity_why}"
        return f"slot: {slot_why or f'no place serves pool {t.pool}'}"

    @property
    def stalled(self) -> list[str]:
        """When tasks are queued, none runs and none could start at the last pass: which chains
        hold them (empty when nothing is stuck)."""
        if self._stalled is None:
            self._stalled = self._find_stall()
        return self._stalled

    def _find_stall(self) -> list[str]:
        if self.active:
            return []
        # A task held by a paused profile waits because an operator said so: no stall.
        queued = [t for t in self.tasks.values() if t.state is TaskState.QUEUED and t.waiting_on != "paused"]
        if not queued or any(t.waiting_on == "backoff" for t in queued):
            return []
        chains: list[str] = []
        for t in queued:
            if t.waiting_on != "dependencies":
                continue
            if len(chains) == STALLED_SHOWN:
                break
            chain, seen, cur = [t.task_id], {t.task_id}, t
            while cur.waiting_on == "dependencies":
                nxt = next((self.tasks[d] for d in cur.depends_on
                            if d in self.tasks and self.tasks[d].state is not TaskState.SUCCEEDED), None)  # fmt: skip
                if nxt is None or nxt.task_id in seen:
                    break
                chain.append(nxt.task_id)
                seen.add(nxt.task_id)
                cur = nxt
            chains.append(
                " <- ".join(chain) + f": {cur.task_id} waits on {cur.waiting_on} ({cur.reason or cur.state})"
            )
        roots = [
            f"{t.task_id} waits on {t.waiting_on} ({t.reason})"
            for t in queued
            if t.waiting_on != "dependencies"
        ]
        return (chains + roots)[:STALLED_SHOWN]

    def account(self) -> None:
        """Charge running tasks' runner-seconds to their fair-share key."""
        now = self.clock.monotonic()
        key = self.cfg.fair_share_key
        for a in self.active.values():
            self.fair.add(fair_key(a.task, key), max(0.0, now - a.accounted_at), now)
            a.accounted_at = now
        cfg = self.cfg
        self.fair.half_life_s = cfg.fair_share_half_life_s
        self.fair.weights = dict(cfg.fair_share_weights)
