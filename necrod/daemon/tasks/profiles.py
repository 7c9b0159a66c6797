"""Which runner profiles, and which places (this host, other hosts), could run a task, by the
config of the moment: the submit-time check and the candidates a scheduling pass chooses
among. Owns ``DEFAULT_PROFILE`` and which profiles an operator paused (saved in the state
store, kept across restarts); reads the config and the names of this host's pools, asks
``refuse`` (``Runners.refusal``) which profiles this host cannot start (a limit it cannot
enforce), and calls ``wake`` when a pause ends."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from necrod.core.clock import Clock
from necrod.core.config import Config, DispatcherConfig, RunnerProfile
from necrod.core.config.model import LAUNCHERS
from necrod.core.scheduler import ProfileView, eligible
from necrod.core.tasks import Attempt, Task
from necrod.io.store import Delete, Event, Put, StateStore
from necrod.proto.errors import NotFound

if TYPE_CHECKING:
    from necrod.daemon.pool import Pool

#: The profile that runs a task which brings its own command and names no profile.
DEFAULT_PROFILE = RunnerProfile(name="default", launcher="process", max_concurrency=1_000_000)


class Profiles:
    def __init__(self, *, config: Callable[[], Config], pools: Callable[[], Mapping[str, Pool]],
                 store: StateStore, clock: Clock, wake: Callable[[], None],
                 refuse: Callable[[RunnerProfile], str | None] = lambda profile: None) -> None:  # fmt: skip
        self._config = config
        #: This host's pools (the engine's), by name.
        self._pools = pools
        #: Why this host cannot start a profile's runners (``Runners.refusal``), or None.
        self._refuse = refuse
        self.store = store
        self.clock = clock
        self._wake = wake
        #: Paused profiles (``runners.pause``): name → {"reason", "by", "at"}. A paused profile
        #: starts nothing; its running tasks go on.
        self.paused: dict[str, dict[str, Any]] = {}

    async def pause(self, name: str, *, paused: bool, reason: str | None = None,
                    by: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
        """Pause (or resume) runner profile ``name``: paused, it starts nothing, and its running
        tasks go on. Kept across restarts."""
        self.profile(name)
        was = self.paused.get(name)
        if paused:
            record = {"reason": reason, "by": by, "at": self.clock.wall()}
            await self.store.write([Put("runner_pause", name, record),
                                    Event("tasks", "runner.paused", {"runner": name, "reason": reason, "by": by})])  # fmt: skip
            self.paused[name] = record
        elif was is not None:
            await self.store.write([Delete("runner_pause", name),
                                    Event("tasks", "runner.resumed", {"runner": name, "by": by})])  # fmt: skip
            self.paused.pop(name, None)
        self._wake()
        return {"runner": name, "paused": name in self.paused, "reason": reason if paused else None}

    def load(self) -> None:
        self.paused = self.store.load("runner_pause")

    def paused_reason(self, name: str) -> str | None:
        """Why profile ``name`` starts nothing now, as a waiting task shows it; None if it may."""
        pause = self.paused.get(name)
        if pause is None:
            return None
        return f"profile {name} is paused" + (f": {pause['reason']}" if pause.get("reason") else "")

    @property
    def cfg(self) -> DispatcherConfig:
        return self._config().dispatcher

    def profile(self, name: str) -> RunnerProfile:
        profile = self._config().runners.get(name)
        if profile is None:
            raise NotFound(f"no runner profile {name!r}", runner=name)
        return profile

    def ran_on(self, attempt: Attempt) -> RunnerProfile:
        """The profile an attempt ran on. One removed from the config since (while the daemon
        was down, or by a reload) is stood in for by the defaults under its name, with the
        launcher the attempt used, so that its runner is still found again or stopped."""
        found = self._config().runners.get(attempt.runner)
        if found is not None:
            return found
        if attempt.runner == DEFAULT_PROFILE.name:
            return DEFAULT_PROFILE
        launcher = attempt.launcher if attempt.launcher in LAUNCHERS else DEFAULT_PROFILE.launcher
        return replace(DEFAULT_PROFILE, name=attempt.runner, launcher=launcher)

    def views(self) -> list[ProfileView]:
        uid = os.geteuid()
        return [ProfileView(p.name, frozenset(p.skills), p.max_concurrency,
                            frozenset(p.pools) if p.pools is not None else None, self.paused_reason(p.name),
                            p.open_to_anyone(uid))
                for p in self._config().runners.values()]  # fmt: skip

    def places(self, task: Task) -> list[tuple[str | None, frozenset[str]]]:
        """Where ``task`` could run, ignoring load: this host (None) and the hosts serving its pool,
        each with the skills it adds. A task of a peer that is not an admin runs on this host
        only: another host runs it as the user necrod reaches it as."""
        places: list[tuple[str | None, frozenset[str]]] = []
        if self.cfg.run_locally and task.pool in self._pools():
            places.append((None, frozenset()))
        if task.non_admin:
            return places
        places += [
            (name, frozenset(h.skills)) for name, h in self._config().hosts.items() if task.pool in h.pools
        ]
        return places

    def profiles_for(self, task: Task) -> list[RunnerProfile]:
        """Profiles that could run ``task`` somewhere (the submit-time check)."""
        runners = self._config().runners
        found: dict[str, RunnerProfile] = {}
        refused = False
        for host, skills in self.places(task):
            for v in eligible(task, self.views(), skills):
                if host is None and self._refuse(runners[v.name]) is not None:
                    refused = True  # the scheduler would still pick it: no stand-in
                else:
                    found[v.name] = runners[v.name]
        if (
            not found
            and not refused
            and not task.non_admin  # the stand-in runs as the daemon's uid
            and task.runner is None
            and not task.skills
            and task.command is not None
            and self.places(task)
        ):
            return [DEFAULT_PROFILE]
        return list(found.values())

    def refusals(self, task: Task) -> list[str]:
        """Why the profiles that could run ``task`` on this host cannot start here."""
        runners = self._config().runners
        if not any(host is None for host, _ in self.places(task)):
            return []
        reasons = (self._refuse(runners[v.name]) for v in eligible(task, self.views(), frozenset()))
        return [why for why in reasons if why is not None]
