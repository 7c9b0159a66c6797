"""The other hosts, as they concern running tasks: a remote runner whose lease ended on its host
is stopped here (that host's necrod did not start it and cannot), runners written off while
their host was out of reach are stopped when it comes back, and ``hosts`` lists this host and
the others with what runs on each. It owns no state; it reads the tasks, the active-run table,
the fleet's links, this host's pools and the config, asks a run to stop, and calls the
``release``, ``save`` and ``wake`` it is given."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from necrod.core.clock import Clock
from necrod.core.config import Config, DispatcherConfig
from necrod.core.tasks import Task
from necrod.daemon.fleet import Fleet, HostDown, HostLink, RemoteRun
from necrod.daemon.tasks.profiles import DEFAULT_PROFILE
from necrod.daemon.tasks.runs import Active, Release
from necrod.proto.errors import NecrodError

if TYPE_CHECKING:
    from necrod.daemon.pool import Pool

log = structlog.get_logger("necrod.dispatch")


class HostWatch:
    def __init__(self, *, tasks: Mapping[str, Task], active: dict[str, Active], fleet: Fleet,
                 pools: Callable[[], Mapping[str, Pool]], config: Callable[[], Config], socket: Path, clock: Clock,
                 release: Release, save: Callable[[Task], Awaitable[None]],
                 wake: Callable[[], None], stopping: Callable[[], bool]) -> None:  # fmt: skip
        self.tasks = tasks
        #: The active-run table (task id → Active): read, and a run asked to stop.
        self.active = active
        self.fleet = fleet
        #: This host's pools (the engine's), by name.
        self._pools = pools
        self._config = config
        self.socket = socket
        self.clock = clock
        self._release = release
        self._save = save
        self._wake = wake
        self._stopping = stopping

    @property
    def cfg(self) -> DispatcherConfig:
        return self._config().dispatcher

    async def watch_remote_leases(self) -> None:
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

    async def host_returned(self, link: HostLink) -> None:
        """Stop runners written off while their host was out of reach: their tasks may already
        run elsewhere, and a task must not keep two runners."""
        # A copy: the awaits below let submits and prunes change the tasks meanwhile.
        for t in list(self.tasks.values()):
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
                await self._save(t)
        self._wake()

    def hosts(self) -> list[dict[str, Any]]:
        running: dict[str | None, list[str]] = {}
        for a in self.active.values():
            running.setdefault(a.host, []).append(a.task.task_id)
        local = {"name": "local", "address": str(self.socket), "state": "up" if not self._stopping() else "stopping",
                 "pools": sorted(self._pools()), "max_concurrency": self.cfg.max_running,
                 "runs_tasks": self.cfg.run_locally, "last_contact": self.clock.wall()}  # fmt: skip
        out = [{**local, "running": sorted(running.get(None, []))}]
        for name, link in self.fleet.links.items():
            out.append({**link.view(), "running": sorted(running.get(name, []))})
        return out
