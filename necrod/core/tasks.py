"""Tasks and their attempts: records, states, dependencies, retries. Pure: no I/O.

States::

    queued ──► running ──► succeeded
      ▲  │        │
      │  │        ├──► queued (retry after backoff)      failed ──► (retry) queued
      │  │        └──► failed / cancelled
      │  └──► blocked (a dependency failed or was cancelled) ──► queued (it was retried)
      └── cancelled, failed: ``tasks.retry`` puts them back

A queued task says why it waits (``waiting_on``): dependencies, backoff, capacity, resources,
slot. Dependencies must succeed before a task runs.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

from necrod.proto.jsonrpc import dump_json


class TaskState(StrEnum):
    QUEUED = "queued"
    BLOCKED = "blocked"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: Assignment without ``Task.__setattr__``'s hook (bound once: it runs at every assignment).
_assign = object.__setattr__

FINISHED = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED})
FAILURE_STRATEGIES = ("continue", "stop-all", "retry")
#: Retries a task gets under failure_strategy "retry" when it did not ask for a number.
STRATEGY_RETRY_DEFAULT = 3


@dataclass(slots=True)
class Attempt:
    number: int
    started_at: float
    runner: str
    launcher: str
    slot_id: str | None = None
    lease_id: str | None = None
    path: str | None = None
    log: str | None = None
    pid: int | None = None
    session: str | None = None
    ended_at: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    #: succeeded, failed, timeout, stalled, lease_lost, cancelled, interrupted, lost, start_failed
    outcome: str | None = None
    detail: str | None = None
    #: False when the attempt ended for a reason that is not the task's fault (a daemon restart).
    counts: bool = True
    #: What the runner used: CPU seconds and the most memory it held at once (bytes), from its
    #: cgroup, else from the kernel's count for its process (None where neither is known).
    cpu_s: float | None = None
    peak_memory_bytes: int | None = None
    #: The host it ran on (None: this one), the runner's directory there, and whether a runner
    #: written off while its host was unreachable still has to be stopped when the host returns.
    host: str | None = None
    remote_dir: str | None = None
    cleanup_pending: bool = False
    #: The earlier attempt's lease whose salvage this one started from (``resume: salvage``).
    resumed_from: str | None = None

    def to_row(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Attempt:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in known})

    @property
    def duration_s(self) -> float | None:
        return None if self.ended_at is None else self.ended_at - self.started_at


@dataclass(slots=True)
class Task:
    task_id: str
    seq: int
    pool: str
    submitted_at: float
    runner: str | None = None
    command: list[str] | str | None = None
    payload: Any = None
    priority: int = 0
    labels: list[str] = field(default_factory=list)
    skills: list[str] = field(default_factory=list)
    depends_on: list[str] = field(default_factory=list)
    max_retries: int = 0
    timeout_s: float | None = None
    env: dict[str, str] = field(default_factory=dict)
    ref: str | None = None
    branch: str | None = None
    #: The directories its slot holds for the attempt (``sparse``); None: the profile's, else the pool's.
    sparse: list[str] | None = None
    project: str | None = None
    batch: str | None = None
    key: str | None = None
    failure_strategy: str = "continue"
    state: TaskState = TaskState.QUEUED
    waiting_on: str | None = None
    reason: str | None = None
    retries_used: int = 0
    next_attempt_at: float = 0.0
    finished_at: float | None = None
    attempts: list[Attempt] = field(default_factory=list)
    #: The uid that submitted the task: its leases are that uid's, and only it (or an admin)
    #: may cancel or retry it. None on tasks recorded before owners were: admins only.
    uid: int | None = None
    #: Its submitter was not an admin: it runs only on a profile open to anyone, on this host
    #: (a runner as the daemon's uid would give the submitter the daemon's rights).
    non_admin: bool = False
    #: Who cancelled it (``uid``, ``pid``, ``client``: the name it gave in ``hello``) and why.
    cancelled_by: dict[str, Any] | None = None
    cancel_reason: str | None = None
    #: ``salvage``: a retry starts from the previous attempt's salvage; ``base``; None: the
    #: runner profile's ``resume``.
    resume: str | None = None
    #: The brief view encoded, and the number of attempts it counted (``brief_json``): not
    #: part of the task, dropped by ``__setattr__`` whenever anything of the task is assigned.
    _brief: tuple[bytes, int] | None = field(default=None, init=False, repr=False, compare=False)

    def __setattr__(self, name: str, value: Any) -> None:
        # Tasks are changed from every room of the dispatcher; dropping the cached brief view
        # here, rather than at each change, is what makes a stale ``tasks.list`` impossible to
        # forget (lists and dicts of a task are replaced, never changed in place: see brief_json).
        _assign(self, name, value)
        if name != "_brief":
            _assign(self, "_brief", None)

    def to_row(self) -> dict[str, Any]:
        row = {name: getattr(self, name) for name in _ROW_FIELDS}
        row["state"] = str(self.state)
        row["attempts"] = [a.to_row() for a in self.attempts]
        return row

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Task:
        values = {k: v for k, v in row.items() if k in _ROW_KNOWN}
        values["state"] = TaskState(row["state"])
        task = cls(**values)
        task.attempts = [Attempt.from_row(a) for a in row.get("attempts", [])]
        return task

    @property
    def current(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts and self.attempts[-1].ended_at is None else None

    @property
    def fair_key(self) -> str:
        return self.project or self.pool

    def view(self, *, brief: bool = False, owner: bool = True) -> dict[str, Any]:
        """What clients see; to a peer that does not own the task (``owner`` False) its env,
        payload and attempts' lease ids are left out: they may hold its secrets."""
        out: dict[str, Any] = {
            "task_id": self.task_id, "state": str(self.state), "pool": self.pool, "runner": self.runner,
            "priority": self.priority, "labels": self.labels, "depends_on": self.depends_on, "batch": self.batch,
            "key": self.key, "waiting_on": self.waiting_on if self.state is TaskState.QUEUED else None,
            "reason": self.reason, "submitted_at": self.submitted_at, "finished_at": self.finished_at,
            "retries_used": self.retries_used, "max_retries": self.max_retries, "attempts": len(self.attempts),
            "started_at": self.attempts[-1].started_at if self.attempts else None, "owner_uid": self.uid,
        }  # fmt: skip
        if self.cancelled_by is not None:
            out["cancelled_by"], out["cancel_reason"] = self.cancelled_by, self.cancel_reason
        if self.next_attempt_at and self.state is TaskState.QUEUED:
            out["next_attempt_at"] = self.next_attempt_at
        if not brief:
            out.update({
                "command": self.command, "payload": self.payload if owner else None, "skills": self.skills,
                "project": self.project, "timeout_s": self.timeout_s, "env": self.env if owner else None,
                "ref": self.ref, "branch": self.branch, "sparse": self.sparse, "failure_strategy": self.failure_strategy,
                "attempts": [{**a.to_row(), "duration_s": a.duration_s, **({} if owner else {"lease_id": None})}
                             for a in self.attempts],
            })  # fmt: skip
        return out

    def brief_json(self) -> bytes:
        """``view(brief=True)`` as JSON, encoded once per change of the task (``tasks.list`` of
        10,000 tasks re-encoded them all at every call: issue 22). Valid until an attribute of
        the task is assigned (``__setattr__`` drops it) or an attempt is appended, the one
        change made in place; a brief view is the same for every peer."""
        cached = self._brief
        if cached is not None and cached[1] == len(self.attempts):
            return cached[0]
        # Copied into a bytes object of its own size: orjson shrinks each result from a larger
        # buffer, and 10,000 of those kept grew the heap at ~5 µs each (measured: 95 ms for a
        # cold listing, 24 ms with the copy of ~300 bytes).
        encoded = bytes(memoryview(dump_json(self.view(brief=True))))
        _assign(self, "_brief", (encoded, len(self.attempts)))
        return encoded


#: What a task's row in the state store holds: its fields but the cache, and the attempts apart.
_ROW_FIELDS = tuple(f.name for f in fields(Task) if f.name not in ("attempts", "_brief"))
_ROW_KNOWN = frozenset(_ROW_FIELDS)


_DEPENDENCY = re.compile(
    r"\b(depends\s+on|blocked\s+by)\s*:?\s*((?:#\d+(?:\s*(?:,|and|&)?\s*)?)+)", re.IGNORECASE
)


def body_dependencies(body: str) -> list[int]:
    """Issue numbers named by "Depends on #N" / "Blocked by #N" (also "Depends on #1, #2")."""
    found: list[int] = []
    for match in _DEPENDENCY.finditer(body):
        for number in re.findall(r"#(\d+)", match.group(2)):
            if int(number) not in found:
                found.append(int(number))
    return found


def find_cycle(edges: Mapping[str, Iterable[str]]) -> list[str] | None:
    """A dependency cycle in ``edges`` (task → what it depends on), as a path that starts and
    ends on the same task, or None."""
    color: dict[str, int] = {}
    for start in edges:
        if color.get(start):
            continue
        stack: list[tuple[str, list[str]]] = [(start, list(edges.get(start, ())))]
        path = [start]
        color[start] = 1
        while stack:
            node, todo = stack[-1]
            if not todo:
                stack.pop()
                path.pop()
                color[node] = 2
                continue
            nxt = todo.pop()
            state = color.get(nxt, 0)
            if state == 1:
                return [*path[path.index(nxt) :], nxt]
            if state == 0:
                color[nxt] = 1
                path.append(nxt)
                stack.append((nxt, list(edges.get(nxt, ()))))
    return None


def levels(edges: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Tasks grouped by how deep their dependencies go: each level can run in parallel once
    the levels before it are done. Dependencies outside ``edges`` count as done."""
    depth: dict[str, int] = {}

    def level(node: str) -> int:
        stack = [node]
        while stack:
            current = stack[-1]
            if current in depth:
                stack.pop()
                continue
            deps = [d for d in edges.get(current, ()) if d in edges]
            missing = [d for d in deps if d not in depth]
            if missing:
                stack.extend(missing)
                continue
            depth[current] = 1 + max((depth[d] for d in deps), default=-1)
            stack.pop()
        return depth[node]

    out: list[list[str]] = []
    for node in edges:
        n = level(node)
        while len(out) <= n:
            out.append([])
    for node in edges:
        out[depth[node]].append(node)
    return out


def retry_delay(failures: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter: between half and all of min(cap, base·2^(n-1))."""
    ceiling = min(cap, base * 2 ** max(0, failures - 1))
    jitter: float = (rng or random).random()
    return float(ceiling * (0.5 + 0.5 * jitter))
