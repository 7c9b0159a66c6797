"""What every part of the pool engine shares: its state, durable changes, background tasks,
and the limits on git.

Durable changes: a change is made in memory first (synchronously, so no other task can see a
half-made one), then written with ``_commit``; if the write fails, the change is undone in
memory and the caller gets ``unavailable``.

Background work: ``_kick(slot)`` starts (at most) one driver task per slot; what it does follows
from the slot's state (``lifecycle``).

git limits: background jobs take the pool's ``CapacityLimiter`` and then the global one, and
count themselves in ``pool.git_active``; maintenance that needs the pool to itself
(``exclusive``) waits until that count is zero and holds new jobs back meanwhile.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import TaskGroup

from necrod.core.clock import Clock
from necrod.core.names import check_lease_id, check_pool_name, parse_slot_id
from necrod.core.slots import Lease, Slot
from necrod.daemon.cleaner import SlotGit
from necrod.daemon.metrics import Metrics
from necrod.daemon.pool import Pool
from necrod.daemon.salvage import Salvager
from necrod.io.gitrun import GitRunner
from necrod.io.store import Delete, Event, Put, StateStore
from necrod.proto.errors import FailedPrecondition, NotFound, Unavailable

log = structlog.get_logger("necrod.engine")

#: Ended leases remembered, to tell "expired" from "never existed".
ENDED_MEMORY = 10_000

LeaseHook = Callable[[Slot, Lease, str], Awaitable[None]]


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class EngineBase:
    def __init__(
        self,
        *,
        store: StateStore,
        git: GitRunner,
        workspaces: Path,
        git_concurrency: int,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.git = git
        self.workspaces = workspaces
        self.clock = clock or Clock()
        self.metrics = metrics or Metrics()
        self.pools: dict[str, Pool] = {}
        #: The next slot number of each pool removed since the state began (``Pool.next_number``).
        self.fences: dict[str, dict[str, Any]] = {}
        #: lease id → the slot it holds.
        self.leases: dict[str, Slot] = {}
        #: Recently ended leases: id → (how, when), to answer "expired" rather than "unknown".
        self.ended: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self.git_limiter = anyio.CapacityLimiter(git_concurrency)
        self.stopping = False
        #: Free disk is below daemon.min_free_disk: no new slots are cut.
        self.disk_low = False
        #: Awaited when a lease ends other than by release (expiry, revocation), before the
        #: slot is salvaged: the dispatcher stops the processes it started there.
        self.lease_hooks: list[LeaseHook] = []
        #: Called with the pool's name after a slot becomes available.
        self.on_slot_available: list[Callable[[str], None]] = []
        self._tg: TaskGroup | None = None
        #: Slots with a driver task running.
        self._active: set[str] = set()
        #: Set when a slot being removed by an operator is gone.
        self._removed: dict[str, anyio.Event] = {}
        self._reap_wake = anyio.Event()

    # --- provided by the other parts ----------------------------------------------------------------

    def _offer(self, p: Pool, slot: Slot) -> None:
        raise NotImplementedError

    def _maintain(self, p: Pool) -> None:
        raise NotImplementedError

    async def _drive(self, slot: Slot) -> None:
        raise NotImplementedError

    # --- lookups --------------------------------------------------------------------------------------

    def pool(self, name: str) -> Pool:
        check_pool_name(name)
        pool = self.pools.get(name)
        if pool is None:
            raise NotFound(f"no pool named {name!r}", pool=name)
        return pool

    def slot(self, sid: str) -> Slot:
        pool_name, _ = parse_slot_id(sid)
        pool = self.pools.get(pool_name)
        slot = pool.slots.get(sid) if pool else None
        if slot is None:
            raise NotFound(f"no slot {sid!r}", slot_id=sid)
        return slot

    def slot_for_lease(self, lease_id: str) -> Slot:
        """The slot a live lease holds; ``not_found`` or ``failed_precondition`` (with why)."""
        check_lease_id(lease_id)
        slot = self.leases.get(lease_id)
        lease = slot.lease if slot is not None else None
        if lease is None or lease.lease_id != lease_id or lease.deadline == float("inf"):
            ended = self.ended.get(lease_id)
            if ended is not None:
                how, at = ended
                if how == "released":
                    raise NotFound(
                        f"lease {lease_id} was released at {iso(at)}", lease_id=lease_id, reason=how
                    )
                raise FailedPrecondition(
                    f"lease {lease_id} {how} at {iso(at)}; its slot was reclaimed",
                    lease_id=lease_id,
                    reason=how,
                )
            raise NotFound(f"no lease {lease_id!r} (it may have ended before a restart)", lease_id=lease_id)
        assert slot is not None
        return slot

    def _ended(self, lease_id: str, how: str) -> None:
        self.ended[lease_id] = (how, self.clock.wall())
        while len(self.ended) > ENDED_MEMORY:
            self.ended.popitem(last=False)

    def _forget_ended(self, lease_id: str) -> None:
        self.ended.pop(lease_id, None)

    def _reindex(self, slot: Slot, old_lease_id: str | None) -> None:
        stale = slot.lease is None or slot.lease.lease_id != old_lease_id
        if old_lease_id and stale and self.leases.get(old_lease_id) is slot:
            del self.leases[old_lease_id]
        if slot.lease is not None:
            self.leases[slot.lease.lease_id] = slot

    # --- durable changes -------------------------------------------------------------------------------

    async def _commit(
        self,
        slots: Iterable[tuple[Slot, Slot]],
        events: Iterable[Event] = (),
        extra: Iterable[Put | Delete] = (),
        on_undo: Callable[[], None] | None = None,
    ) -> None:
        """Persist the slots changed since their snapshots; undo them if the write fails."""
        changed = list(slots)
        versions = []
        ops: list[Put | Delete | Event] = []
        for slot, _ in changed:
            slot.version += 1
            versions.append(slot.version)
            ops.append(Put("slot", slot.slot_id, slot.to_row()))
        ops.extend(extra)
        ops.extend(events)

        def undo() -> None:
            for (slot, snap), version in zip(reversed(changed), reversed(versions), strict=True):
                self._undo_slot(slot, snap, version)
            if on_undo is not None:
                on_undo()

        await self.store.write(ops, undo)

    def _undo_slot(self, slot: Slot, snap: Slot, version: int) -> None:
        current = slot.lease.lease_id if slot.lease else None
        if slot.restore(snap, version):
            self._reindex(slot, current)

    async def _commit_or_log(self, slot: Slot, snap: Slot, events: list[Event], retry_s: float = 5.0) -> bool:
        """A background change: on a store failure, log, pause, and report it was not made."""
        try:
            await self._commit([(slot, snap)], events)
        except Unavailable as exc:
            log.error("persist_failed", slot=slot.slot_id, error=exc.message)
            await anyio.sleep(retry_s)
            return False
        return True

    async def _persist_or_keep(self, slot: Slot, events: list[Event]) -> None:
        """Persist a background move towards cleaning, error or removal; if the store fails the
        change stays in memory (redoing it after a restart is always safe)."""
        slot.version += 1
        if not await self._persist_quietly([Put("slot", slot.slot_id, slot.to_row()), *events]):
            log.warning("state_not_saved", slot=slot.slot_id, state=str(slot.state))

    async def _persist_quietly(self, ops: list[Put | Delete | Event]) -> bool:
        try:
            await self.store.write(ops)
        except Unavailable as exc:
            log.error("persist_failed", error=exc.message)
            return False
        return True

    def _slot_event(self, slot: Slot, reason: str | None = None, **extra: Any) -> Event:
        data: dict[str, Any] = {
            "slot_id": slot.slot_id,
            "pool": slot.pool,
            "state": str(slot.state),
            "commit": slot.commit,
        }
        if reason:
            data["reason"] = reason
        data.update(extra)
        return Event("slots", "slot.state", data)

    def _lease_event(self, kind: str, slot: Slot, lease: Lease, **extra: Any) -> Event:
        return Event("leases", f"lease.{kind}", {
            "lease_id": lease.lease_id, "slot_id": slot.slot_id, "pool": slot.pool, "holder": lease.holder,
            "fencing_token": slot.fencing_token, "task_id": lease.task_id, "owner_uid": lease.uid,
            "runner_uid": lease.runner_uid, **extra,
        })  # fmt: skip

    # --- background tasks -------------------------------------------------------------------------------

    def _spawn(self, func: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start background work, free of the request context it may be started from."""
        assert self._tg is not None

        async def run() -> None:
            structlog.contextvars.clear_contextvars()
            await func(*args)

        self._tg.start_soon(run)

    def _kick(self, slot: Slot) -> None:
        if self._tg is None or self.stopping or slot.slot_id in self._active:
            return
        self._active.add(slot.slot_id)
        self._spawn(self._drive, slot)

    # --- git limits ------------------------------------------------------------------------------------

    async def _wait_maintenance(self, p: Pool) -> None:
        while p.maintenance is not None:
            await p.maintenance.wait()

    @asynccontextmanager
    async def _limits(self, p: Pool) -> AsyncIterator[None]:
        """A background git job for pool ``p``: pool token first, so a task never holds a global
        token while it queues for its pool's."""
        await self._wait_maintenance(p)
        async with p.limiter, self.git_limiter:
            await self._wait_maintenance(p)
            p.git_active += 1
            try:
                yield
            finally:
                p.git_active -= 1

    @asynccontextmanager
    async def _pool_git(self, p: Pool) -> AsyncIterator[None]:
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

    def _slot_git(self, p: Pool, slot: Slot) -> SlotGit:
        return SlotGit(self.git, p.kind_of(slot), slot.admin, slot.path, p.config.cleanup_timeout_s)

    def _salvager(self, p: Pool, slot: Slot) -> Salvager:
        return Salvager(self.git, p.kind_of(slot), slot.admin, slot.path, timeout=p.config.cleanup_timeout_s,
                        limits=p.config.salvage_limits, scratch_root=p.root / "salvage-tmp")  # fmt: skip

    async def _check_mirror(self, p: Pool, slot: Slot | None = None) -> None:
        """Restore the mirror's shared files (and the slot's admin files) before git runs; in a
        worker thread, since an agent decides how much there is to look at and remove."""

        def restore() -> list[str]:
            changed = p.mirror.restore_canonical()
            if slot is not None:
                changed += p.kind_of(slot).restore(slot.admin, slot.path)
            return changed

        changed = await anyio.to_thread.run_sync(restore)
        if changed:
            self._report_tamper(p, changed)

    def _report_tamper(self, p: Pool, changed: list[str]) -> None:
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
        if self._tg is not None:
            self._spawn(self._persist_quietly, [event])
