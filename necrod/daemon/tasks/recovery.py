"""Recovery: after a restart, the attempts the last daemon left running. tmux runners are found
again by session name, process runners by pid (or their exit record), containers and
Kubernetes Jobs adopted, remote runs watched again, and an attempt that cannot be is ended
(lost or interrupted); what is left of a process runner that cannot be found again is
stopped, containers and Jobs no attempt claims are swept, and task leases no running attempt
holds are released. It owns no state: it fills the active-run table it is given, reads the
tasks, profiles, the fleet's links and the engine's leases, uses the launchers, and calls the
attempts room's ``watch``, ``finish`` and ``release``, which it is given."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import structlog

from necrod.core.clock import Clock
from necrod.core.config import Config, DispatcherConfig, RunnerProfile
from necrod.core.slots import Slot
from necrod.core.tasks import Attempt, Task, TaskState
from necrod.daemon.fleet import Fleet, RemoteRun
from necrod.daemon.tasks.profiles import DEFAULT_PROFILE, Profiles
from necrod.daemon.tasks.runners import Runners
from necrod.daemon.tasks.runs import Active, Release, Spawn
from necrod.io.cgroups import RunnerCgroup
from necrod.io.launchers import Exit, Run, end_cgroup, group_alive, stop_group
from necrod.io.procs import processes_in

log = structlog.get_logger("necrod.dispatch")


class Recovery:
    def __init__(self, *, tasks: Mapping[str, Task], active: dict[str, Active], profiles: Profiles,
                 runners: Runners, fleet: Fleet, leases: Callable[[], Mapping[str, Slot]],
                 config: Callable[[], Config], clock: Clock, spawn: Spawn, watch: Callable[[Active], Awaitable[None]],
                 finish: Callable[[Active, Exit | None, str | None, str | None], Awaitable[None]],
                 release: Release) -> None:  # fmt: skip
        self.tasks = tasks
        #: The active-run table (task id → Active): every running task is entered here again.
        self.active = active
        self.profiles = profiles
        self.runners = runners
        self.fleet = fleet
        #: The engine's leases, by lease id.
        self._leases = leases
        self._config = config
        self.clock = clock
        self._spawn = spawn
        self._watch = watch
        self._finish = finish
        self._release = release

    @property
    def cfg(self) -> DispatcherConfig:
        return self._config().dispatcher

    async def reconcile(self) -> None:
        """After a restart: find runners again, stop what is left of those that cannot be,
        release leases held for tasks that no longer run."""
        sessions = await self.runners.tmux.sessions()
        live_leases = set()
        for task in [t for t in self.tasks.values() if t.state is TaskState.RUNNING]:
            attempt = task.current
            if attempt is not None:
                profile = self.profiles.ran_on(attempt)
            else:
                profile = self.profiles.profile(task.runner) if task.runner else DEFAULT_PROFILE
            if attempt is not None and attempt.lease_id:
                live_leases.add(attempt.lease_id)
            a = Active(task, profile, attempt, accounted_at=self.clock.monotonic())
            self.active[task.task_id] = a
            if attempt is None:
                self._spawn(
                    self._finish,
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
                self._spawn(self._watch, a)
            elif attempt.launcher == "tmux":
                run = await self.runners.tmux.adopt(
                    attempt.session or "", Path(attempt.log or ""), None, None
                )
                exit_ = run.read_exit() or Exit(code=None, lost=True)
                self._spawn(self._finish, a, exit_, None, "the tmux session ended while the daemon was down")
            elif attempt.launcher in ("container", "kubernetes"):
                await self._adopt_contained(a, attempt, profile)
            elif attempt.host is not None:
                a.host = attempt.host
                link = self.fleet.links.get(attempt.host)
                if link is None:
                    self._spawn(
                        self._finish,
                        a,
                        None,
                        "lost",
                        f"host {attempt.host} is no longer in the config",
                    )
                else:
                    a.run = RemoteRun(link, attempt.remote_dir or "", attempt.number, attempt.pid,
                                      Path(attempt.log or ""), lambda: self.cfg.host_grace_s)  # fmt: skip
                    self._spawn(self._watch, a)
            elif (adopted := await self.runners.process.adopt(
                    attempt.session or f"necro-{task.task_id}-{attempt.number}", Path(attempt.log or ""),
                    attempt.pid or await self.runners.process.locate(Path(attempt.log or "")))) is not None:  # fmt: skip
                a.run = adopted
                attempt.pid = adopted.pid or None  # found by its exit record's path if it was not saved
                log.info("runner_adopted", task=task.task_id, pid=attempt.pid)
                self._spawn(self._watch, a)
            else:
                await self._stop_orphans(attempt, profile, f"necro-{task.task_id}-{attempt.number}")
                self._spawn(
                    self._finish,
                    a,
                    None,
                    "interrupted",
                    "the runner did not survive a daemon restart",
                )
        await self._sweep_contained()
        for slot in list(self._leases().values()):
            lease = slot.lease
            if lease is not None and lease.task_id and lease.lease_id not in live_leases:
                log.warning("orphan_task_lease_released", lease_id=lease.lease_id, task=lease.task_id)
                await self._release(lease.lease_id, salvage=True)

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
            self._spawn(self._finish, a, None, "lost", why)
            return
        a.run = run
        log.info("runner_adopted", task=a.task.task_id, launcher=attempt.launcher, session=attempt.session)
        self._spawn(self._watch, a)

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
            log.warning("orphan_runner_stopped", runner=name, profile=attempt.runner, pgid=pgid)
            await stop_group(pgid, profile.grace_s)
        cgroup = RunnerCgroup.find(self.runners.cgroup_parents, name)
        if cgroup is not None and not await end_cgroup(cgroup):
            log.error(
                "orphan_runner_not_stopped", runner=name, profile=attempt.runner, cgroup=str(cgroup.unified)
            )
