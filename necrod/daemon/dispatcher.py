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

import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus

from necrod.core.clock import Clock
from necrod.core.config import Config, DispatcherConfig, RunnerProfile
from necrod.core.scheduler import FairShare
from necrod.core.slots import Lease, Slot
from necrod.core.tasks import (
    FINISHED,
    Attempt,
    Task,
    TaskState,
    retry_delay,
)
from necrod.core.templates import render
from necrod.daemon.engine import PoolEngine
from necrod.daemon.fleet import Fleet, HostDown, HostLink, RemoteRun, launch, origin_id
from necrod.daemon.metrics import Metrics
from necrod.daemon.tasks.placement import Placement
from necrod.daemon.tasks.profiles import DEFAULT_PROFILE, Profiles
from necrod.daemon.tasks.runners import Runners
from necrod.daemon.tasks.runs import Active, Jobs
from necrod.daemon.tasks.taskbook import TaskBook
from necrod.io.cgroups import RunnerCgroup
from necrod.io.launchers import (
    Exit,
    LaunchSpec,
    Run,
    end_cgroup,
    group_alive,
    stop_group,
)
from necrod.io.procs import processes_in
from necrod.io.store import Delete, Event, Put, StateStore
from necrod.proto.errors import (
    AlreadyExists,
    FailedPrecondition,
    NecrodError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

if TYPE_CHECKING:
    from necrod.io.containers import ContainerLaunch
    from necrod.io.kubernetes import KubeLaunch

log = structlog.get_logger("necrod.dispatch")

#: Environment passed from the daemon to runners (nothing else of the daemon's leaks through).
RUNNER_PASSTHROUGH = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "TERM")
#: Launchers whose runners keep going through a daemon restart, found again by ``attempt.session``.
OUTLIVE_DAEMON = ("tmux", "container", "kubernetes")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEY = re.compile(r"[A-Za-z0-9._#-]{1,128}")


def runner_uid(profile: RunnerProfile) -> int | None:
    """The uid a contained runner heartbeats as (its ``user``); None for runners started as the
    daemon's own uid, which is an admin anyway."""
    boundary = profile.container or profile.kubernetes
    return int(boundary.user.split(":")[0]) if boundary is not None else None


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
        self.placement = Placement(config=config, index=self.index, active=self.active, profiles=self.profiles,
                                   pools=lambda: engine.pools, fleet=self.fleet, no_remote_slot=self._no_remote_slot,
                                   fair=self.fair, clock=self.clock, jobs=self.jobs, to=self.book.to,
                                   start=self._start, stopping=lambda: self.stopping)  # fmt: skip
        engine.lease_hooks.append(self._lease_ended)
        engine.on_slot_available.append(lambda pool: self.wake())

    @property
    def cfg(self) -> DispatcherConfig:
        return self._config().dispatcher

    @property
    def logs_dir(self) -> Path:
        return Path(self.cfg.logs or self.state_dir / "logs")

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
                    self._finish, a, None, "interrupted", "the daemon stopped before the runner started"
                )
            elif attempt.launcher == "tmux" and attempt.session in sessions:
                cgroup = RunnerCgroup.find(self.runners.cgroup_parents, attempt.session or "")
                a.run = await self.runners.tmux.adopt(
                    attempt.session or "", Path(attempt.log or ""), attempt.pid, cgroup
                )
                log.info("runner_adopted", task=task.task_id, session=attempt.session)
                self.jobs.spawn(self._watch, a)
            elif attempt.launcher == "tmux":
                run = await self.runners.tmux.adopt(
                    attempt.session or "", Path(attempt.log or ""), None, None
                )
                exit_ = run.read_exit() or Exit(code=None, lost=True)
                self.jobs.spawn(
                    self._finish, a, exit_, None, "the tmux session ended while the daemon was down"
                )
            elif attempt.launcher in ("container", "kubernetes"):
                await self._adopt_contained(a, attempt, profile)
            elif attempt.host is not None:
                a.host = attempt.host
                link = self.fleet.links.get(attempt.host)
                if link is None:
                    self.jobs.spawn(
                        self._finish, a, None, "lost", f"host {attempt.host} is no longer in the config"
                    )
                else:
                    a.run = RemoteRun(link, attempt.remote_dir or "", attempt.number, attempt.pid,
                                      Path(attempt.log or ""), lambda: self.cfg.host_grace_s)  # fmt: skip
                    self.jobs.spawn(self._watch, a)
            else:
                await self._stop_orphans(attempt, profile, f"necro-{task.task_id}-{attempt.number}")
                self.jobs.spawn(
                    self._finish, a, None, "interrupted", "the runner did not survive a daemon restart"
                )
        await self._sweep_contained()
        for slot in list(self.engine.leases.values()):
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
            self.jobs.spawn(self._finish, a, None, "lost", why)
            return
        a.run = run
        log.info("runner_adopted", task=a.task.task_id, launcher=attempt.launcher, session=attempt.session)
        self.jobs.spawn(self._watch, a)

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

    # --- running ----------------------------------------------------------------------------------

    def _context(self, t: Task, n: int, lease: dict[str, Any]) -> dict[str, Any]:
        return {"task_id": t.task_id, "attempt": str(n), "pool": t.pool, "slot_id": lease["slot_id"],
                "slot_path": lease["path"], "lease_id": lease["lease_id"], "commit": lease["commit"],
                "ref": t.ref, "branch": lease["branch"], "payload": t.payload}  # fmt: skip

    def _environment(self, t: Task, profile: RunnerProfile, n: int, lease: dict[str, Any],
                     link: HostLink | None) -> dict[str, str]:  # fmt: skip
        # On another host, PATH, HOME and the like come from that host's login (the runner
        # script passes them); here, from the daemon's own environment.
        env = {} if link else {k: os.environ[k] for k in RUNNER_PASSTHROUGH if k in os.environ}
        env.update(dict(profile.env))
        env.update(t.env)
        env.update({
            "NECROD_SOCKET": link.target.socket if link else str(self.socket), "NECROD_LEASE_ID": lease["lease_id"], "NECROD_TASK_ID": t.task_id,
            "NECROD_ATTEMPT": str(n), "NECROD_SLOT_PATH": lease["path"], "NECROD_SLOT_ID": lease["slot_id"],
            "NECROD_POOL": t.pool, "NECROD_COMMIT": lease["commit"] or "",
            "NECROD_FENCING_TOKEN": str(lease["fencing_token"]), "NECROD_LEASE_TTL_S": f"{lease['ttl_s']:g}",
            "NECROD_PAYLOAD": json.dumps(t.payload),
        })  # fmt: skip
        if lease.get("branch"):
            env["NECROD_BRANCH"] = lease["branch"]
        return env

    async def _allocate(self, a: Active, n: int) -> dict[str, Any]:
        t, profile = a.task, a.profile
        request: dict[str, Any] = {"pool": t.pool, "ttl_s": profile.lease_ttl_s, "ref": t.ref, "branch": t.branch,
                                   "metadata": {"task_id": t.task_id, "attempt": n}}  # fmt: skip
        if a.host is None:
            return await self.engine.allocate(holder=f"task {t.task_id}", task_id=t.task_id, uid=t.uid,
                                              runner_uid=runner_uid(profile), **request)  # fmt: skip
        link = self.fleet.link(a.host)
        request["holder"] = f"task {t.task_id} of {self.fleet.origin}"
        try:
            lease: dict[str, Any] = await link.call(
                "slots.allocate", {k: v for k, v in request.items() if v is not None}
            )
        except HostDown as exc:
            raise Unavailable(str(exc)) from None
        except ResourceExhausted:
            self._no_remote_slot[(a.host, t.pool)] = self.clock.monotonic() + 2.0
            raise
        return lease

    async def _start(self, a: Active) -> None:
        t, profile = a.task, a.profile
        n = len(t.attempts) + 1
        try:
            lease = await self._allocate(a, n)
        except (ResourceExhausted, Unavailable, AlreadyExists) as exc:
            # Not the task's fault: back to the queue, to try again when things change.
            self.active.pop(t.task_id, None)
            self.book.to(t, TaskState.QUEUED)
            t.waiting_on, t.reason = "slot", exc.message
            a.stopped.set()
            if a.stop_reason == "cancelled":
                await self.cancel(t.task_id, None)
            return
        except NecrodError as exc:
            attempt = Attempt(n, self.clock.wall(), profile.name, profile.launcher)
            t.attempts.append(attempt)
            a.attempt = attempt
            await self._finish(a, None, "start_failed", f"could not lease a slot: {exc.message}")
            return
        log_path = self.logs_dir / t.task_id / f"{n}.log"
        link = self.fleet.link(a.host) if a.host else None
        attempt = Attempt(n, self.clock.wall(), profile.name, "remote" if link else profile.launcher,
                          slot_id=lease["slot_id"], lease_id=lease["lease_id"], path=lease["path"], log=str(log_path),
                          host=a.host, remote_dir=self.fleet.directory(link, t.task_id) if link else None)  # fmt: skip
        t.attempts.append(attempt)
        a.attempt = attempt
        wait_s = attempt.started_at - (t.next_attempt_at or t.submitted_at)
        self.metrics.queue_wait.observe(max(0.0, wait_s))
        template = t.command if t.command is not None else profile.command
        assert template is not None
        boundary = profile.container or profile.kubernetes
        seen = lease if boundary is None or link else {**lease, "path": boundary.workdir}
        spec = LaunchSpec(
            name=f"necro-{t.task_id}-{n}", argv=render(template, self._context(t, n, seen)), cwd=lease["path"],
            env=self._environment(t, profile, n, lease, link), log=log_path, memory_limit=profile.memory_limit,
        )  # fmt: skip
        if profile.launcher in OUTLIVE_DAEMON:
            attempt.session = spec.name
        await self.book.save(
            t, self.book.event(t, "started", attempt=n, slot_id=lease["slot_id"], runner=profile.name)
        )
        try:
            if link is not None:
                log_path.parent.mkdir(parents=True, exist_ok=True)
                a.run = await launch(link, directory=attempt.remote_dir or "", number=n, slot_path=lease["path"],
                                     argv=spec.argv, env=spec.env, log_path=log_path,
                                     grace=lambda: self.cfg.host_grace_s)  # fmt: skip
            elif profile.launcher == "container":
                a.run = await self.runners.containers.start(
                    spec, self._container_launch(t, n, profile, lease)
                )
            elif profile.launcher == "kubernetes":
                a.run = await self.runners.kube.start(spec, self._kube_launch(t, n, profile, lease))
            else:
                a.run = await self.runners.launchers[profile.launcher].start(spec)
        except (OSError, HostDown) as exc:
            await self._finish(a, None, "start_failed", f"could not start the runner: {exc}")
            return
        attempt.pid = a.run.pid
        if isinstance(a.run, RemoteRun):
            attempt.remote_dir = a.run.dir
        await self.book.save(t)
        log.info("task_started", task=t.task_id, attempt=n, slot=lease["slot_id"], runner=profile.name,
                 launcher=attempt.launcher, host=a.host, pid=a.run.pid)  # fmt: skip
        self.jobs.spawn(self._watch, a)

    def _isolated_mirror(self, t: Task, profile: RunnerProfile) -> str:
        """The mirror a contained runner may read: only a shared-clone pool's."""
        pool = self.engine.pool(t.pool)
        if pool.config.isolation != "shared-clone":
            # A worktree's git metadata lives in the mirror, which the runner must not write.
            raise OSError(f"{profile.launcher} runners need a pool with isolation: shared-clone ({t.pool} is "
                          f"{pool.config.isolation})")  # fmt: skip
        return str(pool.mirror.path)

    def _container_launch(
        self, t: Task, n: int, profile: RunnerProfile, lease: dict[str, Any]
    ) -> ContainerLaunch:
        from necrod.io.containers import ContainerLaunch

        assert profile.container is not None
        return ContainerLaunch(spec=profile.container, slot=lease["path"], mirror=self._isolated_mirror(t, profile),
                               socket=str(self.socket), labels={"necrod.task": t.task_id, "necrod.attempt": str(n)})  # fmt: skip

    def _kube_launch(self, t: Task, n: int, profile: RunnerProfile, lease: dict[str, Any]) -> KubeLaunch:
        from necrod.io.kubernetes import KubeLaunch

        assert profile.kubernetes is not None
        timeout = t.timeout_s or profile.timeout_s
        # The Job's own deadline is a backstop for a daemon that is not there to stop it.
        deadline = timeout + profile.grace_s + 60 if timeout else None
        return KubeLaunch(spec=profile.kubernetes, slot=lease["path"], mirror=self._isolated_mirror(t, profile),
                          socket=str(self.socket), labels={"necrod.task": t.task_id, "necrod.attempt": str(n)},
                          grace_s=profile.grace_s, deadline_s=deadline)  # fmt: skip

    async def _watch(self, a: Active) -> None:
        try:
            await self._watch_run(a)
        except Exception as exc:
            # Never leave an attempt without an end: a bug here must not wedge the task.
            log.exception("watch_failed", task=a.task.task_id)
            if not a.stopped.is_set():
                await self._finish(a, None, "lost", f"necrod lost track of the runner: {exc}")

    async def _watch_run(self, a: Active) -> None:
        t, profile = a.task, a.profile
        assert a.run is not None
        run = a.run
        timeout = t.timeout_s or profile.timeout_s
        result: Exit | None = None
        with anyio.move_on_after(timeout if timeout else math.inf) as clock:
            async with anyio.create_task_group() as tg:

                async def wait_exit() -> None:
                    nonlocal result
                    result = await run.wait()
                    tg.cancel_scope.cancel()

                async def wait_stop() -> None:
                    await a.stop.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(wait_exit)
                tg.start_soon(wait_stop)
                if profile.output_timeout_s:
                    tg.start_soon(self._watch_output, a, profile.output_timeout_s, tg)
                if a.stop_reason is not None:
                    tg.cancel_scope.cancel()
        if clock.cancelled_caught:
            a.request_stop("timeout")
        if result is None:
            if a.stop_reason == "shutdown" and profile.launcher in OUTLIVE_DAEMON and a.host is None:
                return  # it keeps running; the next daemon finds it again
            await run.stop(profile.grace_s)
            with anyio.move_on_after(10):
                result = await run.wait()
            if result is None:
                await self._quarantine(a, run)
        await self._finish(a, result, None, None)

    async def _quarantine(self, a: Active, run: Run) -> None:
        """A runner that could not be confirmed stopped may still write in its slot: the slot is
        kept out of rotation, untouched, rather than cleaned and handed to someone else."""
        await self._keep_slot_out(a, f"its runner ({run.session or run.pid}) could not be confirmed stopped")
        self.jobs.spawn(self._stop_eventually, run, a.profile.grace_s)

    async def _keep_slot_out(self, a: Active, what: str) -> None:
        attempt = a.attempt
        if attempt is None or not attempt.slot_id or a.host is not None:
            return
        why = (f"task {a.task.task_id} attempt {attempt.number}: {what}; check it is gone, "
               "then necroctl recover it")  # fmt: skip
        try:
            await self.engine.isolate(attempt.slot_id, why)
            log.error("runner_not_stopped_slot_isolated", task=a.task.task_id, slot=attempt.slot_id)
        except NecrodError as exc:
            log.error("runner_not_stopped", task=a.task.task_id, slot=attempt.slot_id, error=exc.message)

    async def _stop_eventually(self, run: Run, grace: float) -> None:
        """Keep stopping a runner whose end was not seen, until it is seen: its launcher then
        removes what is left and hands the slot's files back (for ``necroctl recover``)."""
        while True:
            await run.stop(grace)
            with anyio.move_on_after(30):
                await run.wait()
                log.info("runner_stopped_at_last", session=run.session, pid=run.pid)
                return

    async def _watch_output(self, a: Active, limit: float, tg: TaskGroup) -> None:
        path = Path(a.attempt.log or "") if a.attempt else None
        size, since = -1, self.clock.monotonic()
        while path is not None:
            await anyio.sleep(min(1.0, limit / 4))
            try:
                now_size = path.stat().st_size
            except OSError:
                now_size = 0
            now = self.clock.monotonic()
            if now_size != size:
                size, since = now_size, now
            elif now - since >= limit:
                a.request_stop("stalled")
                tg.cancel_scope.cancel()
                return

    async def _lease_ended(self, slot: Slot, lease: Lease, how: str) -> None:
        """The engine ended a task's lease (no heartbeat, or revoked): stop the runner before
        the slot is salvaged."""
        a = self.active.get(lease.task_id or "")
        if a is None or a.attempt is None or a.attempt.lease_id != lease.lease_id:
            return
        a.request_stop("lease_lost")
        with anyio.move_on_after(a.profile.grace_s + 15):
            await a.stopped.wait()

    async def _release(self, lease_id: str, *, salvage: bool, host: str | None = None) -> None:
        try:
            if host is None:
                await self.engine.release(lease_id, salvage=salvage)
            else:
                await self.fleet.link(host).call("slots.release", {"lease_id": lease_id, "salvage": salvage})
        except (NotFound, FailedPrecondition):
            pass  # already reclaimed (expired, revoked)
        except (Unavailable, HostDown) as exc:
            # A host out of reach: the lease expires there and the slot is salvaged all the same.
            log.error("release_failed", lease_id=lease_id, host=host, error=str(exc))

    def _outcome(self, a: Active, result: Exit | None) -> tuple[str, str | None]:
        reason = a.stop_reason
        if reason == "cancelled":
            return "cancelled", "cancelled"
        if reason == "timeout":
            return "timeout", f"ran longer than timeout_s ({a.task.timeout_s or a.profile.timeout_s}s)"
        if reason == "stalled":
            return "stalled", f"wrote no output for {a.profile.output_timeout_s}s"
        if reason == "lease_lost":
            return "lease_lost", "its lease ended (no heartbeat within the lease TTL, or revoked)"
        if reason == "shutdown":
            return "interrupted", "the daemon stopped"
        if result is None:
            return "lost", "the runner's end was not seen"
        if result.lost:
            return "lost", result.detail or "the tmux session went away without an exit status"
        if result.code == 0:
            return "succeeded", None
        if result.oom:
            return "failed", f"killed for exceeding its memory limit ({a.profile.memory_limit} bytes)"
        if result.signal is not None:
            return "failed", f"killed by signal {result.signal}"
        return "failed", f"exited with {result.code}"

    async def _finish(self, a: Active, result: Exit | None, outcome: str | None, detail: str | None) -> None:
        try:
            await self._record_end(a, result, outcome, detail)
        finally:
            # Whatever happened above, the attempt is over: never leave it dangling.
            if a.task.state is TaskState.RUNNING:
                self.book.to(a.task, TaskState.QUEUED)
                a.task.reason = "its last attempt could not be recorded"
            self.active.pop(a.task.task_id, None)
            a.stopped.set()
            self.wake()

    async def _record_end(
        self, a: Active, result: Exit | None, outcome: str | None, detail: str | None
    ) -> None:
        t = a.task
        attempt = a.attempt
        if outcome is None:
            outcome, detail = self._outcome(a, result)
        now = self.clock.wall()
        if attempt is not None:
            attempt.ended_at = now
            attempt.outcome = outcome
            attempt.detail = detail
            attempt.counts = outcome not in ("interrupted", "cancelled")
            if result is not None:
                attempt.exit_code, attempt.signal = result.code, result.signal
            if attempt.duration_s is not None:
                self.metrics.attempt_seconds.labels(a.profile.name).observe(attempt.duration_s)
        if a.run is not None and not await a.run.close():
            cgroup = a.run.cgroup.unified if a.run.cgroup else None
            await self._keep_slot_out(a, f"processes left in its cgroup ({cgroup}) would not die")
        if isinstance(a.run, RemoteRun) and a.run.written_off and attempt is not None:
            attempt.cleanup_pending = True
            detail = f"host {a.host} was unreachable for {self.cfg.host_grace_s:g}s (dispatcher.host_grace_s)"
            attempt.detail = detail
        elif attempt is not None and attempt.lease_id:
            await self._release(attempt.lease_id, salvage=outcome != "succeeded", host=attempt.host)
        self.placement.account()
        ops: list[Put | Delete | Event] = []
        if outcome == "succeeded":
            self.book.to(t, TaskState.SUCCEEDED)
            t.reason, t.finished_at = None, now
        elif outcome == "cancelled":
            self.book.to(t, TaskState.CANCELLED)
            t.reason, t.finished_at = "cancelled", now
            ops += self.book.block_dependents(t)
        elif outcome == "interrupted":
            t.reason, t.next_attempt_at = detail, 0.0
            self.book.to(t, TaskState.QUEUED)
        else:
            limit = t.max_retries
            if t.retries_used < limit:
                t.retries_used += 1
                delay = retry_delay(t.retries_used, self.cfg.retry_backoff_s, self.cfg.retry_backoff_max_s)
                self.book.to(t, TaskState.QUEUED)
                t.reason = f"attempt {len(t.attempts)} {outcome}: {detail}"
                t.next_attempt_at, t.waiting_on = now + delay, "backoff"
            else:
                self.book.to(t, TaskState.FAILED)
                t.reason, t.finished_at = f"{outcome}: {detail}", now
                ops += self.book.block_dependents(t)
                if t.failure_strategy == "stop-all" and t.batch:
                    self.jobs.spawn(self._stop_batch, t)
        self.metrics.tasks_finished.labels(outcome).inc()
        log.info("task_attempt_ended", task=t.task_id, attempt=attempt.number if attempt else None, outcome=outcome,
                 detail=detail, state=str(t.state))  # fmt: skip
        ops += self.book.prune()
        await self.book.save(t, self.book.event(t, outcome if t.state in FINISHED else "attempt_ended", outcome=outcome,
                                        detail=detail, attempt=attempt.number if attempt else None), *ops)  # fmt: skip

    async def _stop_batch(self, failed: Task) -> None:
        log.warning("batch_stopped", batch=failed.batch, failed=failed.task_id)
        await self.cancel(None, failed.batch)

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
                    await self._release(attempt.lease_id, salvage=True, host=link.name)
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
