"""The gate every git of the pool engine goes through: how many run at once, and what is made
safe before one runs.

Limits: background jobs take the pool's ``CapacityLimiter`` and then the global one, and count
themselves in ``pool.git_active``; maintenance that needs the pool to itself (``exclusive``)
waits until that count is zero and holds new jobs back meanwhile.

Before git runs for a pool, the mirror's shared files (and the slot's git admin files) are made
canonical again (``check_mirror``): what an agent planted there is removed, in a worker thread,
and reported as a ``tamper`` event naming the leases held at the time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import structlog

from necrod.core.slots import Slot
from necrod.daemon.cleaner import SlotGit
from necrod.daemon.jobs import Jobs
from necrod.daemon.metrics import Metrics
from necrod.daemon.pool import Pool
from necrod.daemon.salvage import Salvager
from necrod.daemon.slottable import SlotTable
from necrod.io.gitrun import GitRunner
from necrod.io.store import Event

log = structlog.get_logger("necrod.engine")


class GitGate:
    def __init__(
        self, git: GitRunner, git_concurrency: int, table: SlotTable, jobs: Jobs, metrics: Metrics
    ) -> None:
        self.git = git
        self.limiter = anyio.CapacityLimiter(git_concurrency)
        self.table = table
        self.jobs = jobs
        self.metrics = metrics

    # --- limits ---------------------------------------------------------------------------------------

    async def _wait_maintenance(self, p: Pool) -> None:
        while p.maintenance is not None:
            await p.maintenance.wait()

    @asynccontextmanager
    async def limits(self, p: Pool) -> AsyncIterator[None]:
        """A background git job for pool ``p``: pool token first, so a task never holds a global
        token while it queues for its pool's."""
        await self._wait_maintenance(p)
        async with p.limiter, self.limiter:
            await self._wait_maintenance(p)
            p.git_active += 1
            try:
                yield
            finally:
                p.git_active -= 1

    @asynccontextmanager
    async def pool_git(self, p: Pool) -> AsyncIterator[None]:
        """git outside the limiters (an allocation's checkout), still counted for maintenance."""
        await self._wait_maintenance(p)
        p.git_active += 1
        try:
            yield
        finally:
            p.git_active -= 1

    @asynccontextmanager
    async def exclusive(self, p: Pool, timeout: float = 60.0) -> AsyncIterator[bool]:
        """The pool to ourselves: no git of ours runs for it inside. Yields False when that could
        not be had within ``timeout`` (or another maintenance is running)."""
        if p.maintenance is not None:
            yield False
            return
        p.maintenance = anyio.Event()
        try:
            with anyio.move_on_after(timeout):
                while p.git_active:
                    await anyio.sleep(0.02)
            yield p.git_active == 0
        finally:
            done, p.maintenance = p.maintenance, None
            done.set()

    # --- git in one slot --------------------------------------------------------------------------------

    def slot_git(self, p: Pool, slot: Slot) -> SlotGit:
        return SlotGit(
            self.git, p.kind_of(slot), slot.admin, slot.path, p.config.cleanup_timeout_s, p.config.sparse
        )

    def salvager(self, p: Pool, slot: Slot) -> Salvager:
        return Salvager(self.git, p.kind_of(slot), slot.admin, slot.path, timeout=p.config.cleanup_timeout_s,
                        limits=p.config.salvage_limits, scratch_root=p.root / "salvage-tmp")  # fmt: skip

    # --- before git runs --------------------------------------------------------------------------------

    async def check_mirror(
        self, p: Pool, slot: Slot | None = None, also: Callable[[], object] | None = None
    ) -> None:
        """Restore the mirror's shared files (and the slot's admin files) before git runs; in a
        worker thread, since an agent decides how much there is to look at and remove. ``also``
        runs next in the same thread (a cleanup's own preparation of the slot)."""

        def restore() -> list[str]:
            changed = p.mirror.restore_canonical()
            if slot is not None:
                changed += p.kind_of(slot).restore(slot.admin, slot.path)
            if also is not None:
                also()
            return changed

        changed = await anyio.to_thread.run_sync(restore)
        if changed:
            self.report_tamper(p, changed)

    def report_tamper(self, p: Pool, changed: list[str]) -> None:
        holders = [
            {
                "lease_id": s.lease.lease_id,
                "slot_id": s.slot_id,
                "holder": s.lease.holder,
                "owner_uid": s.lease.uid,
                "runner_uid": s.lease.runner_uid,
            }
            for s in p.slots.values()
            if s.lease is not None
        ]
        if p.config.metrics:
            self.metrics.tampers.labels(p.name).inc()
        log.warning("tamper", pool=p.name, changed=changed, leases=holders)
        event = Event("pools", "tamper", {"pool": p.name, "changed": changed, "leases": holders})
        if self.jobs.running:
            self.jobs.spawn(self.table.persist_quietly, [event])
