"""The dispatcher: tasks queued, scheduled, run in slots, watched, retried.

A task names a pool and what to run. When its dependencies have succeeded, capacity allows and
the machine is not overloaded, the scheduler (``core.scheduler``) picks it and a runner profile;
the dispatcher leases a slot (the task is the holder), starts the runner in the slot and
watches it: its exit, its output (a runner silent for ``output_timeout_s`` is stopped), its time
(``timeout_s``) and its lease (a runner that stops heartbeating loses its lease and is stopped
before the slot is salvaged). Success releases the slot; anything else salvages it first. A
failure is retried with exponential backoff up to ``max_retries``; a task that finally fails
or is cancelled blocks the tasks that depend on it.

Restarts: tasks and attempts are in the state database. tmux runners keep running across a
daemon restart and are found again by session name; a process runner does not survive its
daemon, and an orphan left by a crash is stopped. Either way an attempt cut short by the daemon
is recorded as ``interrupted`` and does not use up a retry.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus

from necrod.core.clock import Clock
from necrod.core.config import Config, DispatcherConfig, RunnerProfile
from necrod.core.scheduler import FairShare
from necrod.core.tasks import (
    Attempt,
    Task,
    TaskState,
)
from necrod.daemon.engine import PoolEngine
from necrod.daemon.fleet import Fleet, HostDown, HostLink, RemoteRun, origin_id
from necrod.daemon.metrics import Metrics
from necrod.daemon.tasks.attempts import Attempts
from necrod.daemon.tasks.placement import Placement
from necrod.daemon.tasks.profiles import DEFAULT_PROFILE, Profiles
from necrod.daemon.tasks.runners import Runners
from necrod.daemon.tasks.runs import Active, Jobs
from necrod.daemon.tasks.taskbook import TaskBook
from necrod.io.cgroups import RunnerCgroup
from necrod.io.launchers import (
    Exit,
    Run,
    end_cgroup,
    group_alive,
    stop_group,
)
from necrod.io.procs import processes_in
from necrod.io.store import StateStore
from necrod.proto.errors import (
    NecrodError,
)

log = structlog.get_logger("necrod.dispatch")

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEY = re.compile(r"[A-Za-z0-9._#-]{1,128}")


class Dispatcher:
    def __init__(self, *, engine: PoolEngine, store: StateStore, config: Callable[[], Config], socket: Path,
                 state_dir: Path, metrics: Metrics, clock: Clock | None = None) -> None:  # fmt: skip
        self.engine = engine
        self.store = store
        self._config = config
        self.socket = socket
        self.state_dir = state_dir
        self.metrics = metrics
        self.clock = clock or Clock()
        self.active: dict[str, Active] = {}
        self.stopping = False
        cfg = config().dispatcher
        self.fair = FairShare(cfg.fair_share_half_life_s, dict(cfg.fair_share_weights))
        self.jobs = Jobs()
        origin = origin_id(state_dir)
        self.runners = Runners(origin, state_dir, self.jobs.spawn)
        self.profiles = Profiles(config=config, pools=lambda: engine.pools)
        self.book = TaskBook(store=store, config=config, pools=lambda: engine.pools, profiles=self.profiles,
                             active=self.active, fair=self.fair, clock=self.clock, wake=self.wake,
                             stopping=lambda: self.stopping)  # fmt: skip
        self.index = self.book.index
        self.tasks = self.book.tasks
        self.dependents = self.book.dependents
        self.fleet = Fleet(origin)
        self.fleet.on_up.append(self._host_returned)
        #: (host, pool) → monotonic time until which that host had no free slot in that pool.
        self._no_remote_slot: dict[tuple[str, str], float] = {}
        self.attempts = Attempts(engine=engine, book=self.book, active=self.active, runners=self.runners,
                                 fleet=self.fleet, no_remote_slot=self._no_remote_slot, config=config, socket=socket,
                                 state_dir=state_dir, metrics=metrics, clock=self.clock, spawn=self.jobs.spawn,
                                 account=lambda: self.placement.account(), wake=self.wake)  # fmt: skip
        self.placement = Placement(config=config, index=self.index, active=self.active, profiles=self.profiles,
                                   pools=lambda: engine.pools, fleet=self.fleet, no_remote_slot=self._no_remote_slot,
                                   fair=self.fair, clock=self.clock, jobs=self.jobs, to=self.book.to,
                                   start=self.attempts.start, stopping=lambda: self.stopping)  # fmt: skip
        engine.lease_hooks.append(self.attempts.lease_ended)
        engine.on_slot_available.append(lambda pool: self.wake())

    @property
    def cfg(self) -> DispatcherConfig:
        return self._config().dispatcher

    def wake(self) -> None:
        self.placement.wake()

    def schedule(self) -> int:
        return self.placement.schedule()

    @property
    def stalled(self) -> list[str]:
        return self.placement.stalled

    @property
    def scheduled(self) -> int:
        return self.placement.scheduled

    # --- startup --------------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self.book.load()
        try:
            async with anyio.create_task_group() as tg:
                self.jobs.tg = tg
                await tg.start(self.fleet.run, self._config().hosts)
                await self._reconcile()
                task_status.started()
                tg.start_soon(self._watch_remote_leases)
                await self.placement.loop()
        finally:
            with anyio.CancelScope(shield=True):
                await self.runners.aclose()

    def apply_config(self, config: Config) -> list[str]:
        """What a reload changes here: the hosts (links are opened, restarted or closed)."""
        return self.fleet.apply(config.hosts)

    async def _reconcile(self) -> None:
        """After a restart: find tmux runners again, stop orphaned process runners, release
        leases held for tasks that no longer run."""
        sessions = await self.runners.tmux.sessions()
        live_leases = set()
        for task in [t for t in self.tasks.values() if t.state is TaskState.RUNNING]:
            attempt = task.current
            profile = self.profiles.profile(task.runner) if task.runner else DEFAULT_PROFILE
            if attempt is not None and attempt.lease_id:
                live_leases.add(attempt.lease_id)
            a = Active(task, profile, attempt, accounted_at=self.clock.monotonic())
            self.active[task.task_id] = a
            if attempt is None:
                self.jobs.spawn(
                    self.attempts.finish,
                    a,
                    None,
                    "interrupted",
                    "the daemon stopped before the runner started",
                )
            elif attempt.launcher == "tmux" and attempt.session in sessions:
                cgroup = RunnerCgroup.find(self.runners.cgroup_parents, attempt.session or "")
                a.run = await self.runners.tmux.adopt(
                    attempt.session or "", Path(attempt.log or ""), attempt.pid, cgroup
                )
                log.info("runner_adopted", task=task.task_id, session=attempt.session)
                self.jobs.spawn(self.attempts.watch, a)
            elif attempt.launcher == "tmux":
                run = await self.runners.tmux.adopt(
                    attempt.session or "", Path(attempt.log or ""), None, None
                )
                exit_ = run.read_exit() or Exit(code=None, lost=True)
                self.jobs.spawn(
                    self.attempts.finish, a, exit_, None, "the tmux session ended while the daemon was down"
                )
            elif attempt.launcher in ("container", "kubernetes"):
                await self._adopt_contained(a, attempt, profile)
            elif attempt.host is not None:
                a.host = attempt.host
                link = self.fleet.links.get(attempt.host)
                if link is None:
                    self.jobs.spawn(
                        self.attempts.finish,
                        a,
                        None,
                        "lost",
                        f"host {attempt.host} is no longer in the config",
                    )
                else:
                    a.run = RemoteRun(link, attempt.remote_dir or "", attempt.number, attempt.pid,
                                      Path(attempt.log or ""), lambda: self.cfg.host_grace_s)  # fmt: skip
                    self.jobs.spawn(self.attempts.watch, a)
            else:
                await self._stop_orphans(attempt, profile, f"necro-{task.task_id}-{attempt.number}")
                self.jobs.spawn(
                    self.attempts.finish,
                    a,
                    None,
                    "interrupted",
                    "the runner did not survive a daemon restart",
                )
        await self._sweep_contained()
        for slot in list(self.engine.leases.values()):
            lease = slot.lease
            if lease is not None and lease.task_id and lease.lease_id not in live_leases:
                log.warning("orphan_task_lease_released", lease_id=lease.lease_id, task=lease.task_id)
                await self.attempts.release(lease.lease_id, salvage=True)

    async def _adopt_contained(self, a: Active, attempt: Attempt, profile: RunnerProfile) -> None:
        """The container or Job of an attempt that ran on while the daemon was down: watched
        again, or the attempt ends as lost."""
        run: Run | None = None
        why = f"its profile no longer names a {attempt.launcher}: section"
        try:
            if attempt.launcher == "container" and profile.container is not None and attempt.session:
                why = "its container is gone"
                run = await self.runners.containers.adopt(attempt.session, profile.container, attempt.path or "",
                                                  Path(attempt.log or ""))  # fmt: skip
            elif attempt.launcher == "kubernetes" and profile.kubernetes is not None and attempt.session:
                run = await self.runners.kube.adopt(attempt.session, profile.kubernetes, attempt.path or "",
                                            Path(attempt.log or ""))  # fmt: skip
        except OSError as exc:
            log.error("runner_adopt_failed", task=a.task.task_id, launcher=attempt.launcher, error=str(exc))
            why = f"its {attempt.launcher} runner cannot be watched: {exc}"
        if run is None:
            self.jobs.spawn(self.attempts.finish, a, None, "lost", why)
            return
        a.run = run
        log.info("runner_adopted", task=a.task.task_id, launcher=attempt.launcher, session=attempt.session)
        self.jobs.spawn(self.attempts.watch, a)

    async def _sweep_contained(self) -> None:
        """Remove containers, and delete unfinished Jobs, of ours that no running attempt claims
        (left by a crash)."""
        runners = self._config().runners.values()
        keep = {a.attempt.session for a in self.active.values() if a.attempt and a.attempt.session}
        hosts = {p.container.docker_host for p in runners if p.container is not None}
        if hosts:
            await self.runners.containers.sweep(hosts, keep)
        specs = [p.kubernetes for p in runners if p.kubernetes is not None]
        if specs:
            await self.runners.kube.sweep(specs, keep)

    async def _stop_orphans(self, attempt: Attempt, profile: RunnerProfile, name: str) -> None:
        """Stop what is left of a process runner after a crash: its process group if we recorded
        it, and every process working inside its slot (the daemon may have died before it could
        record the pid), then whatever is left in its cgroup."""
        groups = set()
        if attempt.pid and group_alive(attempt.pid):
            groups.add(attempt.pid)
        for pid in processes_in(attempt.path) if attempt.path else []:
            try:
                groups.add(os.getpgid(pid))
            except ProcessLookupError:
                continue
        groups.discard(os.getpgid(0))
        for pgid in groups:
            log.warning("orphan_runner_stopped", task=attempt.runner, pgid=pgid)
            await stop_group(pgid, profile.grace_s)
        cgroup = RunnerCgroup.find(self.runners.cgroup_parents, name)
        if cgroup is not None and not await end_cgroup(cgroup):
            log.error("orphan_runner_not_stopped", task=attempt.runner, cgroup=str(cgroup.unified))

    # --- the task book ----------------------------------------------------------------------------

    async def submit(self, params: dict[str, Any], uid: int | None = None) -> dict[str, Any]:
        return await self.book.submit(params, uid)

    def task(self, task_id: str) -> Task:
        return self.book.task(task_id)

    def matching(self, *, state: str | None = None, pool: str | None = None, label: str | None = None,
                 batch: str | None = None) -> list[Task]:  # fmt: skip
        return self.book.matching(state=state, pool=pool, label=label, batch=batch)

    def graph(self, tasks: Iterable[Task]) -> list[list[str]]:
        return self.book.graph(tasks)

    def logs(self, task_id: str, attempt: int | None, offset: int, limit: int) -> dict[str, Any]:
        return self.book.logs(task_id, attempt, offset, limit)

    def counts(self) -> dict[str, int]:
        return self.book.counts()

    async def cancel(self, task_id: str | None, batch: str | None) -> dict[str, Any]:
        return await self.book.cancel(task_id, batch)

    async def retry(self, task_id: str | None, batch: str | None) -> dict[str, Any]:
        return await self.book.retry(task_id, batch)

    # --- stopping ---------------------------------------------------------------------------------

    async def stop(self) -> None:
        """No new task starts; process runners are stopped (their tasks re-queued, no retry used);
        tmux and remote runners keep running for the next daemon."""
        self.stopping = True
        waits = []
        for a in list(self.active.values()):
            if a.profile.launcher == "process" and a.host is None:
                a.request_stop("shutdown")
                waits.append(a)
        for a in waits:
            with anyio.move_on_after(a.profile.grace_s + 15):
                await a.stopped.wait()
        self.runners.cgroup_parents.tidy()

    # --- hosts -----------------------------------------------------------------------------------

    async def _watch_remote_leases(self) -> None:
        """A remote runner's lease can end on its host (no heartbeat): that host's necrod did not
        start the runner and cannot stop it, so we look, and stop it ourselves."""
        while True:
            await anyio.sleep(2.0)
            by_host: dict[str, list[Active]] = {}
            for a in list(self.active.values()):
                if a.host and a.attempt and a.attempt.lease_id and a.run is not None:
                    by_host.setdefault(a.host, []).append(a)
            for host, runs in by_host.items():
                link = self.fleet.links.get(host)
                if link is None or not link.up:
                    continue
                try:
                    held = {s["lease_id"] for s in (await link.call("slots.list"))["slots"] if s["lease_id"]}
                except (HostDown, NecrodError):
                    continue
                for a in runs:
                    if a.attempt is not None and a.attempt.lease_id not in held and a.stop_reason is None:
                        log.warning("remote_lease_lost", task=a.task.task_id, host=host)
                        a.request_stop("lease_lost")

    async def _host_returned(self, link: HostLink) -> None:
        """Stop runners written off while their host was out of reach: their tasks may already
        run elsewhere, and a task must not keep two runners."""
        for t in self.tasks.values():
            for attempt in t.attempts:
                if attempt.host != link.name or not attempt.cleanup_pending:
                    continue
                run = RemoteRun(link, attempt.remote_dir or "", attempt.number, attempt.pid,
                                Path(attempt.log or ""), lambda: self.cfg.host_grace_s)  # fmt: skip
                profile = self._config().runners.get(attempt.runner, DEFAULT_PROFILE)
                await run.stop(profile.grace_s)
                if attempt.lease_id:
                    await self.attempts.release(attempt.lease_id, salvage=True, host=link.name)
                attempt.cleanup_pending = False
                log.warning(
                    "written_off_runner_stopped", task=t.task_id, attempt=attempt.number, host=link.name
                )
                await self.book.save(t)
        self.wake()

    def hosts(self) -> list[dict[str, Any]]:
        running: dict[str | None, list[str]] = {}
        for a in self.active.values():
            running.setdefault(a.host, []).append(a.task.task_id)
        local = {"name": "local", "address": str(self.socket), "state": "up" if not self.stopping else "stopping",
                 "pools": sorted(self.engine.pools), "max_concurrency": self.cfg.max_running,
                 "runs_tasks": self.cfg.run_locally, "last_contact": self.clock.wall()}  # fmt: skip
        out = [{**local, "running": sorted(running.get(None, []))}]
        for name, link in self.fleet.links.items():
            out.append({**link.view(), "running": sorted(running.get(name, []))})
        return out

    def status(self) -> dict[str, Any]:
        running = Counter(a.profile.name for a in self.active.values())
        return {"tasks": self.counts(), "running_by_profile": dict(running), "stalled": self.stalled,
                "policy": self.cfg.policy, "memory_cgroups": self.runners.cgroups,
                "runner_cgroups": self.runners.cgroup_parents.unified is not None,
                "fair_share_usage": self.fair.snapshot(self.clock.monotonic())}  # fmt: skip
