"""Which queued task runs next, and on which runner profile. Pure: no I/O.

Policies (``dispatcher.policy``, changeable by reload):

- ``fifo``: in submission order.
- ``priority``: highest effective priority first — the task's ``priority`` plus the
  ``label_priority`` rules of its labels (``urgent: 100``, ``bug: 50``) — ties in submission order.
- ``skill``: in submission order, each task on the profile that offers its skills with the
  fewest skills to spare, so specialised runners stay free for the work only they can do.
- ``fair-share``: as Slurm's classic fair-share. Each project (``fair_share.key``: the task's
  ``project``, else its pool; or its first label) has a share, its weight over the sum of
  weights. Usage is runner-seconds, decayed with a half-life. A project's factor is
  ``2^(-usage/share)`` with usage and share normalized over the projects present; the task
  of the project with the highest factor runs first, ties in submission order.

Every policy skips tasks whose eligible profiles are all busy, so one saturated profile never
holds back work another could run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from necrod.core.tasks import Task

POLICIES = ("fifo", "priority", "skill", "fair-share")


@dataclass(frozen=True, slots=True)
class ProfileView:
    """What the scheduler needs of a runner profile."""

    name: str
    skills: frozenset[str]
    max_concurrency: int
    #: The pools it serves (None: all).
    pools: frozenset[str] | None = None
    #: Why it starts nothing now (an operator paused it), or None.
    paused: str | None = None
    #: Whether it runs tasks of peers that are not admins (``RunnerProfile.open_to_anyone``).
    open_to_anyone: bool = True


def eligible(task: Task, profiles: Iterable[ProfileView], host_skills: frozenset[str] = frozenset()
             ) -> list[ProfileView]:  # fmt: skip
    """Profiles that can run ``task``: the one it names, else every profile with its skills —
    counting the skills of the host it would run on — and serving its pool, when the profile
    lists pools."""
    out = []
    for p in profiles:
        if task.runner is not None and p.name != task.runner:
            continue
        if not set(task.skills) <= p.skills | host_skills:
            continue
        if p.pools is not None and task.pool not in p.pools:
            continue
        if task.non_admin and not p.open_to_anyone:
            continue
        out.append(p)
    return out


def effective_priority(task: Task, label_priority: Mapping[str, int]) -> int:
    return task.priority + sum(label_priority.get(label, 0) for label in task.labels)


@dataclass(slots=True)
class FairShare:
    """Decayed usage per project, in runner-seconds."""

    half_life_s: float = 3600.0
    weights: Mapping[str, float] = field(default_factory=dict)
    #: project → (usage, monotonic time it was measured at)
    usage: dict[str, tuple[float, float]] = field(default_factory=dict)

    def decayed(self, key: str, now: float) -> float:
        value, at = self.usage.get(key, (0.0, now))
        return value * 2 ** (-(now - at) / self.half_life_s) if self.half_life_s > 0 else value

    def add(self, key: str, seconds: float, now: float) -> None:
        self.usage[key] = (self.decayed(key, now) + seconds, now)

    def factors(self, keys: Iterable[str], now: float) -> dict[str, float]:
        """The fair-share factor of each key, normalized over ``keys``."""
        keys = list(dict.fromkeys(keys))
        usage = {k: self.decayed(k, now) for k in keys}
        total_usage = sum(usage.values())
        total_weight = sum(self.weights.get(k, 1.0) for k in keys) or 1.0
        out = {}
        for k in keys:
            share = self.weights.get(k, 1.0) / total_weight
            used = usage[k] / total_usage if total_usage > 0 else 0.0
            out[k] = math.pow(2.0, -used / share) if share > 0 else 0.0
        return out

    def snapshot(self, now: float) -> dict[str, float]:
        return {k: round(self.decayed(k, now), 3) for k in self.usage}


def fair_key(task: Task, key: str) -> str:
    if key == "label":
        return task.labels[0] if task.labels else task.pool
    return task.fair_key


def order(tasks: Sequence[Task], policy: str, *, label_priority: Mapping[str, int], fair: FairShare,
          fair_key_by: str, now: float) -> list[Task]:  # fmt: skip
    """Candidates in the order the policy would start them."""
    if policy == "priority":
        return sorted(tasks, key=lambda t: (-effective_priority(t, label_priority), t.seq))
    if policy == "fair-share":
        factors = fair.factors((fair_key(t, fair_key_by) for t in tasks), now)
        return sorted(tasks, key=lambda t: (-factors[fair_key(t, fair_key_by)], t.seq))
    return sorted(tasks, key=lambda t: t.seq)


def choose_profile(task: Task, profiles: Sequence[ProfileView], running: Mapping[str, int],
                   policy: str, host_skills: frozenset[str] = frozenset()) -> ProfileView | None:  # fmt: skip
    """The profile to run ``task`` on now, or None when every eligible one is full."""
    free = [p for p in eligible(task, profiles, host_skills)
            if p.paused is None and running.get(p.name, 0) < p.max_concurrency]  # fmt: skip
    if not free:
        return None
    if policy == "skill":
        return min(
            free, key=lambda p: (len((p.skills | host_skills) - set(task.skills)), running.get(p.name, 0))
        )
    return min(free, key=lambda p: running.get(p.name, 0) / max(1, p.max_concurrency))
