"""The task book: every task the dispatcher knows. It builds and checks tasks from a submitted
spec, keeps the dependency graph (blocking and unblocking dependents, transitively), cancels
and retries, answers queries (a task, tasks matching, the graph, logs, counts), prunes finished
tasks and saves. It owns the task index and the task and batch counters, and every change of a
task's state goes through its ``to``. It may write the state store, ask ``Profiles``, ask the
runs in the active-run table to stop (cancel), restore and save the fair-share usage it is
given, and call ``wake``."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import orjson
import structlog

from necrod.core.clock import Clock
from necrod.core.config import Config, DispatcherConfig
from necrod.core.names import check_branch, check_pool_name, check_ref
from necrod.core.scheduler import FairShare
from necrod.core.sparse import check_sparse
from necrod.core.taskindex import TaskIndex
from necrod.core.tasks import (
    FINISHED,
    STRATEGY_RETRY_DEFAULT,
    Attempt,
    Task,
    TaskState,
    body_dependencies,
    find_cycle,
    levels,
)
from necrod.core.templates import TemplateError, check
from necrod.daemon.mirror import REF_PREFIX as SALVAGE_PREFIX
from necrod.daemon.tasks.inflight import InFlight
from necrod.daemon.tasks.profiles import Profiles
from necrod.daemon.tasks.runs import Active
from necrod.io.launchers import read_log
from necrod.io.store import Delete, Event, Put, StateStore
from necrod.proto.errors import (
    FailedPrecondition,
    InvalidParams,
    NecrodError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from necrod.proto.methods import TASK_KEYS, did_you_mean

if TYPE_CHECKING:
    from necrod.daemon.pool import Pool

log = structlog.get_logger("necrod.dispatch")

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEY = re.compile(r"[A-Za-z0-9._#-]{1,128}")


class TaskBook:
    def __init__(self, *, store: StateStore, config: Callable[[], Config], pools: Callable[[], Mapping[str, Pool]],
                 profiles: Profiles, active: dict[str, Active], fair: FairShare, clock: Clock,
                 wake: Callable[[], None], stopping: Callable[[], bool]) -> None:  # fmt: skip
        self.store = store
        self._config = config
        #: This host's pools (the engine's), by name.
        self._pools = pools
        self.profiles = profiles
        #: The active-run table (task id → Active), shared with the rooms that start and end runs.
        self.active = active
        #: The fair-share usage, saved with the book and restored by ``load``.
        self.fair = fair
        self.clock = clock
        self._wake = wake
        #: Whether the dispatcher is shutting down (then nothing is submitted).
        self._stopping = stopping
        self.index = TaskIndex()
        self.tasks = self.index.tasks
        self.dependents = self.index.dependents
        self.next_seq = 1
        self.next_batch = 1
        self.in_flight = InFlight()

    @property
    def cfg(self) -> DispatcherConfig:
        return self._config().dispatcher

    def load(self) -> None:
        self.index.add(Task.from_row(row) for row in self.store.load("task").values())
        self.next_seq = max((t.seq + 1 for t in self.tasks.values()), default=1)
        meta = self.store.load("dispatcher").get("state", {})
        self.next_batch = int(meta.get("next_batch", 1))
        now = self.clock.monotonic()
        self.fair.usage = {k: (float(v), now) for k, v in meta.get("fair_usage", {}).items()}

    # --- submitting -------------------------------------------------------------------------------

    def _build(self, spec: dict[str, Any], defaults: dict[str, Any], seq: int, batch: str | None, *,
               non_admin: bool = False, uid: int | None = None) -> Task:  # fmt: skip
        def get(name: str, fallback: Any = None) -> Any:
            value = spec.get(name)
            return value if value is not None else defaults.get(name, fallback)

        pool = get("pool")
        if not isinstance(pool, str):
            raise InvalidParams("a task needs a pool", param="pool")
        check_pool_name(pool)
        if pool not in self._pools() and not any(pool in h.pools for h in self._config().hosts.values()):
            raise NotFound(f"no pool named {pool!r} here or on any host", pool=pool)
        runner = get("runner")
        if runner is None and not get("skills") and self.cfg.default_runner is not None:
            runner = self.cfg.default_runner
        command = get("command")
        if command is not None and not (
            (isinstance(command, str) and command.strip())
            or (isinstance(command, list) and command and all(isinstance(a, str) for a in command))
        ):
            raise InvalidParams(
                "command must be a non-empty list of strings or a shell command", param="command"
            )
        env = get("env", {}) or {}
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            raise InvalidParams("env must be an object of strings", param="env")
        for name in env:
            if not _ENV_NAME.fullmatch(name) or name.startswith("NECROD_"):
                raise InvalidParams(f"env: {name!r} is not a variable a task may set", param="env")
        for name in ("labels", "skills"):
            value = get(name, [])
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise InvalidParams(f"{name} must be a list of strings", param=name)
        ref, branch, sparse = get("ref"), get("branch"), get("sparse")
        if sparse is not None:
            sparse = list(check_sparse(sparse))
        if ref is not None:
            check_ref(ref)
        if branch is not None:
            check_branch(branch)
        strategy = get("failure_strategy", self.cfg.failure_strategy)
        if strategy not in ("continue", "stop-all", "retry"):
            raise InvalidParams(
                "failure_strategy must be continue, stop-all or retry", param="failure_strategy"
            )
        resume = get("resume")
        if resume not in (None, "base", "salvage"):
            raise InvalidParams("resume must be base or salvage", param="resume")
        retries = get("max_retries", self.cfg.max_retries)
        if strategy == "retry" and spec.get("max_retries") is None and defaults.get("max_retries") is None:
            retries = max(retries, STRATEGY_RETRY_DEFAULT)
        task = Task(
            task_id=f"t-{seq}", seq=seq, pool=pool, submitted_at=self.clock.wall(), runner=runner, command=command,
            payload=get("payload"), priority=int(get("priority", 0)), labels=list(get("labels", [])),
            skills=list(get("skills", [])), max_retries=int(retries), timeout_s=get("timeout_s"), env=dict(env),
            ref=ref, branch=branch, sparse=sparse, project=get("project"), batch=batch, key=spec.get("key"),
            failure_strategy=strategy, resume=resume, non_admin=non_admin,
        )  # fmt: skip
        if runner is not None:
            self.profiles.profile(runner)
        profiles = self.profiles.profiles_for(task)
        if (
            not profiles
            and non_admin
            and (admins_only := self.profiles.profiles_for(replace(task, non_admin=False)))
        ):
            names = ", ".join(sorted(p.name for p in admins_only))
            raise PermissionDenied(
                f"uid {uid} is not an admin: its tasks run only on a runner profile open to anyone "
                f"(submitters: anyone, or a container or pod user of its own), here; {names} would run "
                "it as the daemon's uid (docs/operations.md, Peers)", runner=runner,
            )  # fmt: skip
        if not profiles:
            wanted = f"skills {', '.join(task.skills)}" if task.skills else "a command"
            refused = self.profiles.refusals(task)
            raise FailedPrecondition(
                f"no runner profile can run this task (it needs {wanted}"
                + (f" and profile {runner!r}" if runner else "") + f" in pool {pool})"
                + "".join(f"; {why}" for why in refused), runner=runner,
            )  # fmt: skip
        for profile in profiles:
            template = command if command is not None else profile.command
            if template is None:
                raise InvalidParams(f"no command: the task gives none and profile {profile.name!r} has none",
                                    param="command")  # fmt: skip
            try:
                check(template, task.payload)
            except TemplateError as exc:
                raise InvalidParams(f"command template: {exc}", param="command") from None
        return task

    def _check_quota(self, uid: int, adding: int) -> None:
        """A uid that is not an admin has ``daemon.max_tasks_per_uid`` unfinished tasks at most:
        finished ones are pruned, queued ones are not, and each is memory and a row."""
        limit = self._config().daemon.max_tasks_per_uid
        unfinished = sum(1 for t in self.tasks.values() if t.uid == uid and t.state not in FINISHED)
        unfinished += self.in_flight.tasks_of(uid)
        if unfinished + adding > limit:
            raise ResourceExhausted(
                f"uid {uid} has {unfinished} unfinished tasks; {adding} more would pass its most "
                f"(daemon.max_tasks_per_uid: {limit})"
            )

    async def submit(
        self, params: dict[str, Any], uid: int | None = None, *, admin: bool = True
    ) -> dict[str, Any]:
        """One task, or a batch (``tasks: [...]``) with dependencies between its members, owned
        by ``uid`` (an admin, or not: see ``Task.non_admin``)."""
        if self._stopping():
            raise Unavailable("the daemon is shutting down")
        specs = params.get("tasks")
        single = specs is None
        defaults = {k: v for k, v in params.items() if k != "tasks" and v is not None}
        if single:
            specs = [{}]
        if not isinstance(specs, list) or not specs or not all(isinstance(s, dict) for s in specs):
            raise InvalidParams("tasks must be a non-empty list of task objects", param="tasks")
        if not admin and uid is not None:
            self._check_quota(uid, len(specs))
        batch = None if single else f"b-{self.next_batch}"
        seq = self.next_seq
        built: list[Task] = []
        keys: dict[str, str] = {}
        for i, spec in enumerate(specs):
            where = f"tasks[{i}]"
            # A misspelt key dropped silently would drop what it meant: a dependency, a limit.
            unknown = sorted(set(spec) - TASK_KEYS)
            if unknown:
                name = unknown[0]
                raise InvalidParams(
                    f"{where}: unknown key {name!r}{did_you_mean(name, TASK_KEYS)}", param=name
                )
            try:
                task = self._build(spec, defaults, seq + i, batch, non_admin=not admin, uid=uid)
            except NecrodError as exc:
                if single:
                    raise
                raise type(exc)(f"{where}: {exc.message}", **exc.data) from None
            task.uid = uid
            for key in filter(None, (spec.get("key"), f"#{spec['issue']}" if "issue" in spec else None)):
                key = str(key)
                if not _KEY.fullmatch(key) or key in keys:
                    raise InvalidParams(f"{where}: key {key!r} is invalid or used twice", param="key")
                keys[key] = task.task_id
            built.append(task)
        by_id = {t.task_id: t for t in built}
        for spec, task in zip(specs, built, strict=True):
            named = list(spec.get("depends_on") or defaults.get("depends_on") or [])
            if not all(isinstance(d, str | int) for d in named):
                raise InvalidParams("depends_on must list task ids or batch keys", param="depends_on")
            named += [f"#{n}" for n in body_dependencies(str(spec.get("body") or ""))]
            deps: list[str] = []
            for ref in map(str, named):
                target = keys.get(ref) or (ref if ref in self.tasks or ref in by_id else None)
                if target is None:
                    raise NotFound(f"{task.task_id}: depends on {ref!r}, which is neither a task nor a key of this "
                                   "batch", depends_on=ref)  # fmt: skip
                if target == task.task_id:
                    raise InvalidParams(f"{task.task_id} depends on itself", param="depends_on")
                if target not in deps:
                    deps.append(target)
            task.depends_on = deps
        cycle = find_cycle({t.task_id: t.depends_on for t in built})
        if cycle:
            names = [by_id[c].key or c for c in cycle]
            raise InvalidParams(f"dependency cycle: {' -> '.join(names)}", param="depends_on", cycle=cycle)
        ops: list[Put | Delete | Event] = []
        for task in built:
            broken = self._broken_dependency(task, by_id)
            if broken:
                task.state = TaskState.BLOCKED
                task.reason = broken
            ops += [Put("task", task.task_id, task.to_row()), self.event(task, "submitted")]
        self.next_seq = seq + len(built)
        if batch is not None:
            self.next_batch += 1
        ops.append(self._meta_op())
        with self.in_flight.submitting(uid, built):
            await self.store.write(ops)
        self.index.add(built)
        late = self._settle_submitted(built)
        if late:
            await self.store.write(late)
        self._wake()
        if single:
            return {"task_id": built[0].task_id, "state": str(built[0].state)}
        return {
            "batch": batch,
            "tasks": [{"key": t.key, "task_id": t.task_id, "state": str(t.state)} for t in built],
        }

    def _meta_op(self) -> Put:
        now = self.clock.monotonic()
        return Put(
            "dispatcher", "state", {"next_batch": self.next_batch, "fair_usage": self.fair.snapshot(now)}
        )

    def event(self, task: Task, kind: str, **extra: Any) -> Event:
        return Event("tasks", f"task.{kind}", {"task_id": task.task_id, "state": str(task.state), "pool": task.pool,
                                               "batch": task.batch, **extra})  # fmt: skip

    def _dependency(self, task_id: str, pending: dict[str, Task] | None = None) -> Task | None:
        return self.tasks.get(task_id) or (pending or {}).get(task_id)

    def _settle_submitted(self, built: list[Task]) -> list[Put | Delete | Event]:
        """Block (or unblock) what was just submitted by what happened to its dependencies while
        it was being committed: a dependency that failed, was cancelled or retried meanwhile
        changed its dependents' states without these, which were not in the index yet (they
        would have waited for ever, or stayed blocked behind a dependency queued again)."""
        ops: list[Put | Delete | Event] = []
        for task in built:
            broken = self._broken_dependency(task)
            if task.state is TaskState.QUEUED and broken:
                self.to(task, TaskState.BLOCKED)
                task.reason = broken
                ops += [Put("task", task.task_id, task.to_row()), self.event(task, "blocked", reason=broken)]
                ops += self.block_dependents(task)
            elif task.state is TaskState.BLOCKED and not broken:
                task.reason = None
                self.to(task, TaskState.QUEUED)
                ops += [Put("task", task.task_id, task.to_row()), self.event(task, "queued")]
                ops += self._unblock_dependents(task)
        return ops

    def _broken_dependency(self, task: Task, pending: dict[str, Task] | None = None) -> str | None:
        for dep_id in task.depends_on:
            dep = self._dependency(dep_id, pending)
            if dep is not None and dep.state in (TaskState.FAILED, TaskState.CANCELLED, TaskState.BLOCKED):
                return f"dependency {dep_id} is {dep.state}"
        return None

    def to(self, task: Task, state: TaskState) -> None:
        """Every change of a task's state goes here, to keep the index of ready tasks right."""
        self.index.set_state(task, state)

    # --- queries ----------------------------------------------------------------------------------

    def task(self, task_id: str) -> Task:
        task = self.tasks.get(task_id)
        if task is None:
            raise NotFound(f"no task {task_id!r}", task_id=task_id)
        return task

    def matching(self, *, state: str | None = None, pool: str | None = None, label: str | None = None,
             batch: str | None = None) -> list[Task]:  # fmt: skip
        """Tasks in submission order (the index keeps them so: no sort per call)."""
        among = self.tasks if batch is None else self.index.batches.get(batch, {})
        if state is None and pool is None and label is None:
            return list(among.values())
        return [t for t in among.values()
                if (state is None or t.state == state) and (pool is None or t.pool == pool)
                and (label is None or label in t.labels)]  # fmt: skip

    @staticmethod
    def briefs(tasks: Iterable[Task]) -> orjson.Fragment:
        """The brief views of ``tasks`` as one JSON array, already encoded: each task's own
        encoding is kept until the task changes (``Task.brief_json``), so ``tasks.list`` of
        10,000 tasks joins bytes instead of building and encoding 10,000 views (issue 22)."""
        parts = [t.brief_json() for t in tasks]
        if not parts:
            return orjson.Fragment(b"[]")
        # The brackets go on the first and last views, not around the joined megabytes: each
        # copy of those is a fresh allocation the kernel faults in (~2 ms apiece here).
        parts[0] = b"[" + parts[0]
        parts[-1] += b"]"
        return orjson.Fragment(b",".join(parts))

    def graph(self, tasks: Iterable[Task]) -> list[list[str]]:
        pending = {t.task_id: t.depends_on for t in tasks if t.state not in FINISHED}
        return levels(pending)

    async def logs(self, task_id: str, attempt: int | None, offset: int, limit: int) -> dict[str, Any]:
        task = self.task(task_id)
        if not task.attempts:
            return {
                "task_id": task_id,
                "attempt": None,
                "offset": 0,
                "data": "",
                "eof": task.state in FINISHED,
            }
        n = attempt or len(task.attempts)
        if not 1 <= n <= len(task.attempts):
            raise NotFound(f"task {task_id} has no attempt {n}", task_id=task_id)
        a = task.attempts[n - 1]
        try:
            data = await read_log(Path(a.log), offset, limit) if a.log else b""
        except OSError as exc:
            raise FailedPrecondition(f"cannot read the log of attempt {n}: {exc}", task_id=task_id) from None
        finished = a.ended_at is not None
        try:
            size = os.stat(a.log).st_size if a.log else 0
        except OSError:
            size = offset + len(data)
        return {"task_id": task_id, "attempt": n, "offset": offset + len(data), "data": data.decode("utf-8", "replace"),
                "eof": finished and len(data) < limit, "path": a.log, "size": size}  # fmt: skip

    def counts(self) -> dict[str, int]:
        return {s.value: self.index.counts[s] for s in TaskState}

    # --- cancel and retry -------------------------------------------------------------------------

    def _targets(self, task_id: str | None, batch: str | None) -> list[Task]:
        """The one task, or the batch's tasks, a cancel or retry acts on."""
        if (task_id is None) == (batch is None):
            raise InvalidParams("give task_id or batch")
        targets = [self.task(task_id)] if task_id else self.matching(batch=batch)
        if batch and not targets:
            raise NotFound(f"no batch {batch!r}", batch=batch)
        return targets

    def cancel_note(self, task: Task, attempt: Attempt | None = None) -> dict[str, Any]:
        """What a ``task.cancelled`` event says of who cancelled and why, and where the work of
        its running attempt was salvaged."""
        note: dict[str, Any] = {"reason": task.cancel_reason, "by": task.cancelled_by}
        if attempt is not None and attempt.lease_id:
            note["salvage_ref"] = f"{SALVAGE_PREFIX}{attempt.lease_id}"
        return note

    async def cancel(self, task_id: str | None, batch: str | None, *, reason: str | None = None,
                     force: bool = False, by: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
        """Cancel a task, or a batch's unfinished tasks. A running one is stopped (``force``:
        SIGKILL at once, no grace), its work salvaged before the answer; ``by`` (the caller's
        uid, pid and client name) and ``reason`` are kept on the task and its event. A finished
        task named alone is ``failed_precondition``, and nothing changes."""
        targets = self._targets(task_id, batch)
        if task_id and targets[0].state in FINISHED:
            raise FailedPrecondition(f"{task_id} is {targets[0].state} already; nothing to cancel",
                                     task_id=task_id, state=str(targets[0].state))  # fmt: skip
        waits = []
        ops: list[Put | Delete | Event] = []
        live = [t for t in targets if t.state not in FINISHED]
        for t in live:
            t.cancel_reason, t.cancelled_by = reason, by
            if t.state is TaskState.RUNNING:
                a = self.active[t.task_id]
                a.force = a.force or force
                a.request_stop("cancelled")
                waits.append(a)
            else:
                self.to(t, TaskState.CANCELLED)
                t.finished_at = self.clock.wall()
                t.reason = "cancelled" + (f": {reason}" if reason else "")
                ops += [Put("task", t.task_id, t.to_row()), self.event(t, "cancelled", **self.cancel_note(t))]
                ops += self.block_dependents(t)
        if ops:
            await self.store.write(ops)
        for a in waits:
            if force:
                a.kill_now()
            # Its grace, 10 s to see it end, and a little for the salvage the answer names
            # (Attempts waits up to SALVAGE_WAIT_S for it before the attempt is over).
            with anyio.move_on_after((0 if force else a.profile.grace_s) + 15):
                await a.stopped.wait()
        self._wake()
        out = [self._cancelled(t) for t in targets]
        return out[0] if task_id else {"batch": batch, "tasks": out}

    def _cancelled(self, t: Task) -> dict[str, Any]:
        out: dict[str, Any] = {"task_id": t.task_id, "state": str(t.state)}
        attempt = t.attempts[-1] if t.attempts else None
        if t.state is TaskState.CANCELLED and attempt is not None and attempt.outcome == "cancelled" \
                and attempt.lease_id and attempt.host is None:  # fmt: skip
            out["salvage_ref"] = f"{SALVAGE_PREFIX}{attempt.lease_id}"
        if t.cancel_reason is not None:
            out["reason"] = t.cancel_reason
        return out

    async def update(self, task_id: str, *, priority: int | None = None, labels: list[str] | None = None,
                     by: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
        """Change a waiting task's priority or labels; the queue's order follows at once."""
        t = self.task(task_id)
        if t.state not in (TaskState.QUEUED, TaskState.BLOCKED):
            raise FailedPrecondition(f"{task_id} is {t.state}; only a queued or blocked task is updated",
                                     task_id=task_id, state=str(t.state))  # fmt: skip
        if labels is not None and not all(labels):
            raise InvalidParams("labels must be non-empty strings", param="labels")
        changed: dict[str, Any] = {}
        if priority is not None and priority != t.priority:
            changed["priority"] = [t.priority, priority]
        if labels is not None and labels != t.labels:
            changed["labels"] = [t.labels, labels]
        if changed:
            before = (t.priority, t.labels)
            t.priority = priority if priority is not None else t.priority
            t.labels = list(labels) if labels is not None else t.labels
            try:
                await self.store.write([Put("task", t.task_id, t.to_row()),
                                        self.event(t, "updated", changes=changed, by=by)])  # fmt: skip
            except Unavailable:
                t.priority, t.labels = before
                raise
            self._wake()
        return {"task_id": t.task_id, "state": str(t.state), "priority": t.priority, "labels": t.labels,
                "changed": sorted(changed)}  # fmt: skip

    async def retry(self, task_id: str | None, batch: str | None) -> dict[str, Any]:
        targets = self._targets(task_id, batch)
        ops: list[Put | Delete | Event] = []
        for t in targets:
            if t.state is TaskState.BLOCKED and task_id:
                raise FailedPrecondition(
                    f"{t.task_id} is blocked ({t.reason}); retry the failed task instead"
                )
            if t.state not in (TaskState.FAILED, TaskState.CANCELLED):
                if task_id:
                    raise FailedPrecondition(
                        f"{t.task_id} is {t.state}; only failed or cancelled tasks are retried"
                    )
                continue
            t.retries_used = 0
            t.next_attempt_at = 0.0
            t.finished_at = None
            t.reason = self._broken_dependency(t)
            self.to(t, TaskState.BLOCKED if t.reason else TaskState.QUEUED)
            ops += [Put("task", t.task_id, t.to_row()), self.event(t, "retried")]
            ops += self._unblock_dependents(t)
        if ops:
            await self.store.write(ops)
        self._wake()
        out = [{"task_id": t.task_id, "state": str(t.state)} for t in targets]
        return out[0] if task_id else {"batch": batch, "tasks": out}

    def _transitive(self, task: Task) -> list[Task]:
        seen: set[str] = set()
        stack = [task.task_id]
        out = []
        while stack:
            for dep_id in self.dependents.get(stack.pop(), ()):
                if dep_id not in seen and (dep := self.tasks.get(dep_id)) is not None:
                    seen.add(dep_id)
                    out.append(dep)
                    stack.append(dep_id)
        return out

    def block_dependents(self, task: Task) -> list[Put | Delete | Event]:
        ops: list[Put | Delete | Event] = []
        for dep in self._transitive(task):
            if dep.state is TaskState.QUEUED:
                self.to(dep, TaskState.BLOCKED)
                dep.reason = f"dependency {task.task_id} {task.state}"
                ops += [
                    Put("task", dep.task_id, dep.to_row()),
                    self.event(dep, "blocked", reason=dep.reason),
                ]
        return ops

    def _unblock_dependents(self, task: Task) -> list[Put | Delete | Event]:
        ops: list[Put | Delete | Event] = []
        for dep in self._transitive(task):
            if dep.state is TaskState.BLOCKED and self._broken_dependency(dep) is None:
                dep.reason = None
                self.to(dep, TaskState.QUEUED)
                ops += [Put("task", dep.task_id, dep.to_row()), self.event(dep, "queued")]
        return ops

    # --- pruning and saving -----------------------------------------------------------------------

    def prune(self) -> list[Put | Delete | Event]:
        """Forget the oldest finished tasks beyond ``keep_finished`` (not one a task still
        waiting depends on). Run at every task's end: it costs the excess, not the book."""
        excess = len(self.index.finished) - self.cfg.keep_finished
        if len(self.tasks) <= self.cfg.keep_finished or excess <= 0:
            return []
        ops: list[Put | Delete | Event] = []
        for t in list(itertools.islice(self.index.finished.values(), excess)):
            if self.in_flight.depended_on(t.task_id) or any(
                self.tasks[d].state not in FINISHED
                for d in self.dependents.get(t.task_id, ())
                if d in self.tasks
            ):
                continue
            self.index.remove(t.task_id)
            ops.append(Delete("task", t.task_id))
        return ops

    def ops(self, task: Task, *extra: Put | Delete | Event) -> list[Put | Delete | Event]:
        """What ``save`` writes, for a caller that commits it with something of its own."""
        return [Put("task", task.task_id, task.to_row()), *extra, self._meta_op()]

    async def save(self, task: Task, *extra: Put | Delete | Event) -> None:
        await self.write(task, self.ops(task, *extra))

    async def write(self, task: Task, ops: list[Put | Delete | Event]) -> None:
        """``ops`` (made by ``ops``) committed; a failure is logged, the task kept as it is."""
        try:
            await self.store.write(ops)
        except Unavailable as exc:
            log.error("task_not_saved", task=task.task_id, error=exc.message)
