"""Attempts: one attempt of a task, on any launcher, from start to end. It leases a slot (from
the pool engine, or from another host's necrod), builds the runner's environment and launch
spec, launches it, watches its exit, output, time and stop requests, and ends it: the outcome
recorded on the task, the slot released, or kept out of rotation when the runner could not be
confirmed stopped. It owns no state of its own and fills and empties the active-run table it is
given; it may call the allocator (``allocate``, ``release``), the slot table (``pool``), the
lifecycle (``isolate``),
the fleet's links, the launchers, the task book, and two callables of placement's: ``account``
and ``wake``."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from anyio.abc import TaskGroup

from necrod.core.clock import Clock
from necrod.core.config import Config, DispatcherConfig, RunnerProfile
from necrod.core.slots import Lease, Slot
from necrod.core.tasks import FINISHED, Attempt, Task, TaskState, retry_delay
from necrod.core.templates import render
from necrod.daemon.allocator import Allocator
from necrod.daemon.fleet import Fleet, HostDown, HostLink, RemoteRun, launch
from necrod.daemon.lifecycle import Lifecycle
from necrod.daemon.metrics import Metrics
from necrod.daemon.resume import settled_salvage
from necrod.daemon.slottable import SlotTable
from necrod.daemon.tasks.runners import Runners
from necrod.daemon.tasks.runs import SALVAGE_WAIT_S, Active, Spawn
from necrod.daemon.tasks.taskbook import TaskBook
from necrod.io.launchers import Exit, LaunchSpec, Run
from necrod.io.steps import passed_through
from necrod.io.store import Delete, Event, Put
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

#: Launchers whose runners keep going through a daemon restart, found again by ``attempt.session``
#: (a process runner by its pid too).
OUTLIVE_DAEMON = ("process", "tmux", "container", "kubernetes")


def _session(t: Task, n: int) -> str:
    """Attempt ``n``'s runner name: its tmux session, container, Job, or process wrapper."""
    return f"necro-{t.task_id}-{n}"


def runner_uid(profile: RunnerProfile) -> int | None:
    """The uid a contained runner heartbeats as (its ``user``); None for runners started as the
    daemon's own uid, which is an admin anyway."""
    boundary = profile.container or profile.kubernetes
    return int(boundary.user.split(":")[0]) if boundary is not None else None


class Attempts:
    def __init__(self, *, table: SlotTable, allocator: Allocator, lifecycle: Lifecycle, book: TaskBook, active: dict[str, Active], runners: Runners,
                 fleet: Fleet, no_remote_slot: dict[tuple[str, str], float], config: Callable[[], Config],
                 socket: Path, state_dir: Path, metrics: Metrics, clock: Clock, spawn: Spawn,
                 account: Callable[[], None], wake: Callable[[], None]) -> None:  # fmt: skip
        self.table = table
        self.allocator = allocator
        self.lifecycle = lifecycle
        self.book = book
        #: The active-run table (task id → Active): an attempt that ends leaves it.
        self.active = active
        self.runners = runners
        self.fleet = fleet
        #: (host, pool) → monotonic time until which that host had no free slot in that pool.
        self._no_remote_slot = no_remote_slot
        self._config = config
        self.socket = socket
        self.state_dir = state_dir
        self.metrics = metrics
        self.clock = clock
        self._spawn = spawn
        #: Charge running tasks' runner-seconds to their fair-share key (placement's accounting).
        self._account = account
        #: Wake the scheduling pass.
        self._wake = wake
        #: Attempts that found no slot (or no ports) to lease and went back to the queue.
        self.found_no_slot = 0

    @property
    def cfg(self) -> DispatcherConfig:
        return self._config().dispatcher

    # --- starting ---------------------------------------------------------------------------------

    @property
    def logs_dir(self) -> Path:
        return Path(self.cfg.logs or self.state_dir / "logs")

    def _context(self, t: Task, n: int, lease: dict[str, Any]) -> dict[str, Any]:
        return {"task_id": t.task_id, "attempt": str(n), "pool": t.pool, "slot_id": lease["slot_id"],
                "slot_path": lease["path"], "lease_id": lease["lease_id"], "commit": lease["commit"],
                "ref": t.ref, "branch": lease["branch"], "payload": t.payload}  # fmt: skip

    def _environment(self, t: Task, profile: RunnerProfile, n: int, lease: dict[str, Any],
                     link: HostLink | None) -> dict[str, str]:  # fmt: skip
        # On another host, PATH, HOME and the like come from that host's login (the runner
        # script passes them); here, from the daemon's own environment.
        env = {} if link else passed_through()
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
        if lease.get("resumed_from"):
            env["NECROD_RESUMED_FROM"] = lease["resumed_from"]
        if lease.get("ports"):
            ports = [str(port) for port in lease["ports"]]
            env.update({"NECROD_PORT": ports[0], "NECROD_PORTS": ",".join(ports), "PORT": ports[0]})
        return env

    async def _allocate(self, a: Active, n: int) -> dict[str, Any]:
        t, profile = a.task, a.profile
        request: dict[str, Any] = {"pool": t.pool, "ttl_s": profile.lease_ttl_s, "ref": t.ref, "branch": t.branch,
                                   "metadata": {"task_id": t.task_id, "attempt": n}, "ports": profile.ports,
                                   "sparse": t.sparse if t.sparse is not None or profile.sparse is None else list(profile.sparse)}  # fmt: skip
        lost = self._resume_from(t, profile, a.host)
        if a.host is None:
            point = await settled_salvage(self.table.pool(t.pool), lost) if lost else None
            if point is not None:
                request["ref"] = None
            # The attempt is recorded in the grant's own commit: one transaction, not two.
            return await self.allocator.allocate(holder=f"task {t.task_id}", task_id=t.task_id, uid=t.uid,
                                                 runner_uid=runner_uid(profile), resume=point,
                                                 with_grant=partial(self._begin, a, n), **request)  # fmt: skip
        link = self.fleet.link(a.host)
        request["holder"] = f"task {t.task_id} of {self.fleet.origin}"
        if lost:
            request.update(from_salvage=lost, ref=None)
        try:
            try:
                lease: dict[str, Any] = await link.call(
                    "slots.allocate", {k: v for k, v in request.items() if v is not None}
                )
            except NotFound:
                if not lost:
                    raise
                # The lost attempt left nothing to keep there: start from the base.
                request.update(from_salvage=None, ref=t.ref)
                lease = await link.call("slots.allocate", {k: v for k, v in request.items() if v is not None})
        except HostDown as exc:
            raise Unavailable(str(exc)) from None
        except ResourceExhausted:
            self._no_remote_slot[(a.host, t.pool)] = self.clock.monotonic() + 2.0
            raise
        return lease

    @staticmethod
    def _resume_from(t: Task, profile: RunnerProfile, host: str | None) -> str | None:
        """The lease of the attempt a retry resumes from (``resume: salvage``): the last one
        that held a slot on the same host, if the task asks for it."""
        if (t.resume or profile.resume) != "salvage":
            return None
        last = next((a for a in reversed(t.attempts) if a.lease_id), None)
        return last.lease_id if last is not None and last.host == host else None

    async def start(self, a: Active) -> None:
        t, profile = a.task, a.profile
        n = len(t.attempts) + 1
        try:
            lease = await self._allocate(a, n)
        except (ResourceExhausted, Unavailable, AlreadyExists) as exc:
            # Not the task's fault: back to the queue, to try again when things change.
            self._unbegin(a, n)
            self.found_no_slot += isinstance(exc, ResourceExhausted)
            self.active.pop(t.task_id, None)
            self.book.to(t, TaskState.QUEUED)
            t.waiting_on, t.reason = "slot", exc.message
            a.stopped.set()
            if a.stop_reason == "cancelled":
                await self.book.cancel(t.task_id, None)
            return
        except NecrodError as exc:
            self._unbegin(a, n)
            failed = Attempt(n, self.clock.wall(), profile.name, profile.launcher)
            t.attempts.append(failed)
            a.attempt = failed
            await self.finish(a, None, "start_failed", f"could not lease a slot: {exc.message}")
            return
        if a.attempt is None:  # leased on another host: recorded here, in a commit of its own
            await self.book.write(t, self._begin(a, n, lease))
        attempt = a.attempt
        assert attempt is not None
        link = self.fleet.link(a.host) if a.host else None
        log_path = Path(attempt.log or "")
        template = t.command if t.command is not None else profile.command
        assert template is not None
        boundary = profile.container or profile.kubernetes
        seen = lease if boundary is None or link else {**lease, "path": boundary.workdir}
        spec = LaunchSpec(
            name=_session(t, n), argv=render(template, self._context(t, n, seen)), cwd=lease["path"],
            env=self._environment(t, profile, n, lease, link), log=log_path, memory_limit=profile.memory_limit,
            cpu_limit=profile.cpu_limit,
        )  # fmt: skip
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
            await self.finish(a, None, "start_failed", f"could not start the runner: {exc}")
            return
        attempt.pid = a.run.pid
        if isinstance(a.run, RemoteRun):
            attempt.remote_dir = a.run.dir
        if link is not None or profile.launcher != "process":
            await self.book.save(t)
        # A process runner's pid is saved with its end, not in a commit of its own: a daemon
        # restarted before that finds the runner by its exit record's path (``adopt``).
        log.info("task_started", task=t.task_id, attempt=n, slot=lease["slot_id"], runner=profile.name,
                 launcher=attempt.launcher, host=a.host, pid=a.run.pid)  # fmt: skip
        self._spawn(self.watch, a)

    def _begin(self, a: Active, n: int, lease: dict[str, Any]) -> list[Put | Delete | Event]:
        """Attempt ``n`` on ``lease``, on the task, and what records it (the task's row, its
        ``started`` event): committed with the grant, or on its own for another host's lease."""
        t, profile = a.task, a.profile
        link = self.fleet.link(a.host) if a.host else None
        attempt = Attempt(n, self.clock.wall(), profile.name, "remote" if link else profile.launcher,
                          slot_id=lease["slot_id"], lease_id=lease["lease_id"], path=lease["path"],
                          log=str(self.logs_dir / t.task_id / f"{n}.log"), host=a.host,
                          remote_dir=self.fleet.directory(link, t.task_id) if link else None,
                          resumed_from=lease.get("resumed_from"))  # fmt: skip
        if profile.launcher in OUTLIVE_DAEMON:
            attempt.session = _session(t, n)
        t.attempts.append(attempt)
        a.attempt = attempt
        self.metrics.queue_wait.observe(max(0.0, attempt.started_at - (t.next_attempt_at or t.submitted_at)))
        return self.book.ops(
            t, self.book.event(t, "started", attempt=n, slot_id=lease["slot_id"], runner=profile.name)
        )

    def _unbegin(self, a: Active, n: int) -> None:
        """The grant that attempt ``n`` was begun with was not committed: it never was."""
        if a.attempt is not None and a.attempt.number == n:
            a.task.attempts = [x for x in a.task.attempts if x is not a.attempt]
            a.attempt = None

    def _isolated_mirror(self, t: Task, profile: RunnerProfile) -> str:
        """The mirror a contained runner may read: a shared-clone or overlay pool's (their slots
        are repositories of their own that borrow its objects)."""
        pool = self.table.pool(t.pool)
        if pool.config.isolation not in ("shared-clone", "overlay"):
            # A worktree's git metadata lives in the mirror, which the runner must not write.
            raise OSError(f"{profile.launcher} runners need a pool with isolation: shared-clone or overlay "
                          f"({t.pool} is {pool.config.isolation})")  # fmt: skip
        return str(pool.mirror.path)

    def _container_launch(
        self, t: Task, n: int, profile: RunnerProfile, lease: dict[str, Any]
    ) -> ContainerLaunch:
        from necrod.io.containers import ContainerLaunch

        assert profile.container is not None
        return ContainerLaunch(spec=profile.container, slot=lease["path"], mirror=self._isolated_mirror(t, profile),
                               socket=str(self.socket), labels={"necrod.task": t.task_id, "necrod.attempt": str(n)},
                               submodule_mirrors=self.table.pool(t.pool).submodule_mirrors_dir)  # fmt: skip

    def _kube_launch(self, t: Task, n: int, profile: RunnerProfile, lease: dict[str, Any]) -> KubeLaunch:
        from necrod.io.kubernetes import KubeLaunch

        assert profile.kubernetes is not None
        timeout = t.timeout_s or profile.timeout_s
        # The Job's own deadline is a backstop for a daemon that is not there to stop it.
        deadline = timeout + profile.grace_s + 60 if timeout else None
        return KubeLaunch(spec=profile.kubernetes, slot=lease["path"], mirror=self._isolated_mirror(t, profile),
                          socket=str(self.socket), labels={"necrod.task": t.task_id, "necrod.attempt": str(n)},
                          grace_s=profile.grace_s, deadline_s=deadline,
                          submodule_mirrors=self.table.pool(t.pool).submodule_mirrors_dir)  # fmt: skip

    # --- watching ---------------------------------------------------------------------------------

    async def watch(self, a: Active) -> None:
        try:
            await self._watch_run(a)
        except Exception as exc:
            # Never leave an attempt without an end: a bug here must not wedge the task.
            log.exception("watch_failed", task=a.task.task_id)
            if not a.stopped.is_set():
                await self.finish(a, None, "lost", f"necrod lost track of the runner: {exc}")

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
            await run.stop(0 if a.force else profile.grace_s)
            with anyio.move_on_after(10):
                result = await run.wait()
            if result is None:
                await self._quarantine(a, run)
        await self.finish(a, result, None, None)

    async def _quarantine(self, a: Active, run: Run) -> None:
        """A runner that could not be confirmed stopped may still write in its slot: the slot is
        kept out of rotation, untouched, rather than cleaned and handed to someone else."""
        await self._keep_slot_out(a, f"its runner ({run.session or run.pid}) could not be confirmed stopped")
        self._spawn(self._stop_eventually, run, a.profile.grace_s)

    async def _keep_slot_out(self, a: Active, what: str) -> None:
        attempt = a.attempt
        if attempt is None or not attempt.slot_id or a.host is not None:
            return
        why = (f"task {a.task.task_id} attempt {attempt.number}: {what}; check it is gone, "
               "then necroctl recover it")  # fmt: skip
        try:
            await self.lifecycle.isolate(attempt.slot_id, why)
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

    async def lease_ended(self, slot: Slot, lease: Lease, how: str) -> None:
        """The allocator ended a task's lease (no heartbeat, or revoked): stop the runner before
        the slot is salvaged."""
        a = self.active.get(lease.task_id or "")
        if a is None or a.attempt is None or a.attempt.lease_id != lease.lease_id:
            return
        a.request_stop("lease_lost")
        with anyio.move_on_after(a.profile.grace_s + 15):
            await a.stopped.wait()

    # --- ending -----------------------------------------------------------------------------------

    async def release(self, lease_id: str, *, salvage: bool, host: str | None = None) -> None:
        try:
            if host is None:
                await self.allocator.release(lease_id, salvage=salvage)
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
            why = a.task.cancel_reason
            return "cancelled", ("cancelled, forced" if a.force else "cancelled") + (
                f": {why}" if why else ""
            )
        if reason == "timeout":
            return "timeout", f"ran longer than timeout_s ({a.task.timeout_s or a.profile.timeout_s}s)"
        if reason == "stalled":
            return "stalled", f"wrote no output for {a.profile.output_timeout_s}s"
        if reason == "lease_lost":
            return "lease_lost", "its lease ended (no heartbeat within the lease TTL, or revoked)"
        if result is None:
            return "lost", "the runner's end was not seen"
        if result.start_failed:
            return "start_failed", result.start_failed
        if result.lost:
            return "lost", result.detail or "the tmux session went away without an exit status"
        if result.code == 0:
            return "succeeded", None
        if result.oom:
            return "failed", f"killed for exceeding its memory limit ({a.profile.memory_limit} bytes)"
        if result.signal is not None:
            return "failed", f"killed by signal {result.signal}"
        return "failed", f"exited with {result.code}"

    async def finish(self, a: Active, result: Exit | None, outcome: str | None, detail: str | None) -> None:
        try:
            await self._record_end(a, result, outcome, detail)
        finally:
            # Whatever happened above, the attempt is over: never leave it dangling.
            if a.task.state is TaskState.RUNNING:
                self.book.to(a.task, TaskState.QUEUED)
                a.task.reason = "its last attempt could not be recorded"
            self.active.pop(a.task.task_id, None)
            a.stopped.set()
            self._wake()

    async def _record_end(
        self, a: Active, result: Exit | None, outcome: str | None, detail: str | None
    ) -> None:
        t = a.task
        attempt = a.attempt
        releasing: Callable[[], Coroutine[Any, Any, None]] | None = None
        if outcome is None or a.stop_reason == "cancelled":
            # Cancelled while it was starting, and its lease or launch failed meanwhile: it ends
            # cancelled, as the cancel answers, not start_failed (which would be retried).
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
            if a.run is not None:  # read before close: that removes the runner's cgroup
                attempt.cpu_s, attempt.peak_memory_bytes = a.run.usage(result)
                self.metrics.runner_usage(a.profile.name, attempt.cpu_s, attempt.peak_memory_bytes)
        if a.run is not None and not await a.run.close():
            cgroup = a.run.cgroup.unified if a.run.cgroup else None
            await self._keep_slot_out(a, f"processes left in its cgroup ({cgroup}) would not die")
        if isinstance(a.run, RemoteRun) and a.run.written_off and attempt is not None:
            attempt.cleanup_pending = True
            detail = f"host {a.host} was unreachable for {self.cfg.host_grace_s:g}s (dispatcher.host_grace_s)"
            attempt.detail = detail
        elif attempt is not None and attempt.lease_id:
            salvage = self._salvages(a, outcome)
            if outcome == "cancelled" and attempt.host is None and attempt.slot_id:
                # The cancel answers with the salvage ref: the salvage is made before the end is.
                await self.release(attempt.lease_id, salvage=salvage, host=attempt.host)
                await self._salvaged(attempt.slot_id, attempt.lease_id)
            else:
                releasing = partial(self.release, attempt.lease_id, salvage=salvage, host=attempt.host)
        self._account()
        ops: list[Put | Delete | Event] = []
        if outcome == "succeeded":
            self.book.to(t, TaskState.SUCCEEDED)
            t.reason, t.finished_at = None, now
        elif outcome == "cancelled":
            self.book.to(t, TaskState.CANCELLED)
            t.reason, t.finished_at = detail, now
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
                    self._spawn(self._stop_batch, t)
        self.metrics.tasks_finished.labels(outcome).inc()
        log.info("task_attempt_ended", task=t.task_id, attempt=attempt.number if attempt else None, outcome=outcome,
                 detail=detail, state=str(t.state))  # fmt: skip
        ops += self.book.prune()
        usage = {} if attempt is None else {
            "duration_s": attempt.duration_s, "cpu_s": attempt.cpu_s, "peak_memory_bytes": attempt.peak_memory_bytes,
        }  # fmt: skip
        if outcome == "cancelled":
            usage.update(self.book.cancel_note(t, attempt))
        save = partial(self.book.save, t, self.book.event(t, outcome if t.state in FINISHED else "attempt_ended",
                       outcome=outcome, detail=detail, attempt=attempt.number if attempt else None, **usage), *ops)  # fmt: skip
        if releasing is None:
            await save()
            return
        # The release and the end are queued in the same loop turn: one commit for both.
        async with anyio.create_task_group() as tg:
            tg.start_soon(releasing)
            tg.start_soon(save)

    def _salvages(self, a: Active, outcome: str) -> bool:
        """Whether an attempt's slot is salvaged when it ends: unless it succeeded, or always
        where the profile or the pool says ``salvage: always``."""
        if outcome != "succeeded" or a.profile.salvage == "always":
            return True
        pool = self.table.pools.get(a.task.pool)
        return a.host is None and pool is not None and pool.config.salvage_succeeded

    async def _salvaged(self, slot_id: str, lease_id: str) -> None:
        """Wait (a bounded time) for the slot's cleanup to have salvaged ``lease_id``'s work, so
        that whoever cancelled the task finds the salvage ref when the cancel answers."""
        with anyio.move_on_after(SALVAGE_WAIT_S):
            while True:
                try:
                    slot = self.table.slot(slot_id)
                except NotFound:
                    return
                if slot.salvage_as != lease_id:
                    return
                await anyio.sleep(0.05)

    async def _stop_batch(self, failed: Task) -> None:
        log.warning("batch_stopped", batch=failed.batch, failed=failed.task_id)
        await self.book.cancel(None, failed.batch)
