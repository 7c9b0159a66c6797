"""The slot table: every pool, its slots and the live leases, and the one way they change durably.

A change is made in memory first (synchronously, so no other task can see a half-made one),
then written with ``commit``; if the write fails, the change is undone in memory and the
caller gets ``unavailable``. Background moves that are always safe to redo after a restart
(towards cleaning, error or removal) use ``persist_or_keep`` instead: on a store failure the
change stays in memory.

It owns the lookups every part uses (pool, slot, the slot a lease holds), the lease index, the
memory of recently ended leases (to answer "expired" rather than "unknown"), the slot-number
fences of removed pools, and two daemon-wide flags: ``stopping`` and ``disk_low``. It calls
nothing but the state store.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import anyio
import structlog

from necrod.core.clock import Clock
from necrod.core.names import check_lease_id, check_pool_name, parse_slot_id
from necrod.core.slots import Lease, Slot
from necrod.daemon.pool import Pool
from necrod.io.store import Delete, Event, Put, StateStore
from necrod.proto.errors import FailedPrecondition, NotFound, Unavailable

log = structlog.get_logger("necrod.engine")

#: Ended leases remembered, to tell "expired" from "never existed".
ENDED_MEMORY = 10_000


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def slot_event(slot: Slot, reason: str | None = None, **extra: Any) -> Event:
    data: dict[str, Any] = {"slot_id": slot.slot_id, "pool": slot.pool, "state": str(slot.state),
                            "commit": slot.commit}  # fmt: skip
    if reason:
        data["reason"] = reason
    data.update(extra)
    return Event("slots", "slot.state", data)


def lease_event(kind: str, slot: Slot, lease: Lease, **extra: Any) -> Event:
    return Event("leases", f"lease.{kind}", {
        "lease_id": lease.lease_id, "slot_id": slot.slot_id, "pool": slot.pool, "holder": lease.holder,
        "fencing_token": slot.fencing_token, "task_id": lease.task_id, "owner_uid": lease.uid,
        "runner_uid": lease.runner_uid, "granted_at": lease.granted_at, "expires_at": lease.expires_at, **extra,
    })  # fmt: skip


class SlotTable:
    """The pools, slots and leases (read ``pools`` and ``leases`` freely; change them here)."""

    def __init__(self, store: StateStore, clock: Clock) -> None:
        self.store = store
        self.clock = clock
        self.pools: dict[str, Pool] = {}
        #: lease id → the slot it holds.
        self.leases: dict[str, Slot] = {}
        #: The next slot number of each pool removed since the state began (``Pool.next_number``).
        self.fences: dict[str, dict[str, Any]] = {}
        #: Recently ended leases: id → (how, when), to answer "expired" rather than "unknown".
        self._ended: OrderedDict[str, tuple[str, float]] = OrderedDict()
        #: No new leases and no new background work: the daemon is going away.
        self.stopping = False
        #: Free disk is below daemon.min_free_disk: no new slots are cut.
        self.disk_low = False

    # --- lookups --------------------------------------------------------------------------------------

    def pool(self, name: str) -> Pool:
        pool = self.pools.get(name)
        if pool is None:
            check_pool_name(name)  # a pool that exists has a valid name: only a miss says why
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
            ended = self._ended.get(lease_id)
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

    def list_slots(
        self, pool: str | None = None, state: str | None = None, viewer: int | None = None
    ) -> list[dict[str, Any]]:
        """Slot views; ``viewer`` (a non-admin's uid) sees only its own lease ids."""
        pools = [self.pool(pool)] if pool is not None else list(self.pools.values())
        now = self.clock.wall()
        return [
            slot.view(viewer, now)
            for p in pools
            for slot in sorted(p.slots.values(), key=lambda s: s.number)
            if state is None or slot.state == state
        ]

    # --- pools ----------------------------------------------------------------------------------------

    def load_fences(self) -> None:
        """At start, before any pool is added: the fences of the pools removed so far."""
        self.fences = self.store.load("fence")

    def add_pool(self, pool: Pool) -> None:
        fence = self.fences.get(pool.name)
        if fence is not None:  # a pool of this name was here before: go on from its numbers
            pool.next_number = int(fence["next_number"])
        self.pools[pool.name] = pool

    async def forget_pool(self, p: Pool) -> bool:
        """A drained pool goes; its slot numbers stay taken, so a pool of this name added later
        starts after them and no slot id (and no fencing token of one) ever comes back."""
        fence = {"next_number": p.next_number}
        ops: list[Put | Delete | Event] = [
            Delete("pool", p.name),
            Put("fence", p.name, fence),
            Event("pools", "pool.removed", {"pool": p.name}),
        ]
        if not await self.persist_quietly(ops):
            return False
        self.fences[p.name] = fence
        self.pools.pop(p.name, None)
        return True

    # --- the lease index ------------------------------------------------------------------------------

    def hold(self, slot: Slot) -> None:
        """Index the slot's lease."""
        assert slot.lease is not None
        self.leases[slot.lease.lease_id] = slot

    def let_go(self, lease_id: str) -> None:
        self.leases.pop(lease_id, None)

    def ended(self, lease_id: str, how: str) -> None:
        self._ended[lease_id] = (how, self.clock.wall())
        while len(self._ended) > ENDED_MEMORY:
            self._ended.popitem(last=False)

    def forget_ended(self, lease_id: str) -> None:
        self._ended.pop(lease_id, None)

    def _reindex(self, slot: Slot, old_lease_id: str | None) -> None:
        stale = slot.lease is None or slot.lease.lease_id != old_lease_id
        if old_lease_id and stale and self.leases.get(old_lease_id) is slot:
            del self.leases[old_lease_id]
        if slot.lease is not None:
            self.leases[slot.lease.lease_id] = slot

    # --- durable changes ------------------------------------------------------------------------------

    async def commit(
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
                self.undo_slot(slot, snap, version)
            if on_undo is not None:
                on_undo()

        await self.store.write(ops, undo)

    def undo_slot(self, slot: Slot, snap: Slot, version: int) -> None:
        current = slot.lease.lease_id if slot.lease else None
        if slot.restore(snap, version):
            self._reindex(slot, current)

    async def write(self, ops: list[Put | Delete | Event], undo: Callable[[], None] | None = None) -> None:
        """The one durable write under every other: ``undo`` runs if it fails (``unavailable``)."""
        await self.store.write(ops, undo)

    async def write_row(self, slot: Slot, row: dict[str, Any], snap: Slot | None = None) -> None:
        """Persist ``row`` for the slot instead of what it holds in memory (a state on disk that
        a crash must find, such as ``cleaning`` while git works in it); on failure the slot is
        restored from ``snap``, when given."""
        if snap is None:
            await self.store.write([Put("slot", slot.slot_id, row)])
            return
        slot.version += 1
        version = slot.version
        await self.store.write(
            [Put("slot", slot.slot_id, row)], undo=lambda: self.undo_slot(slot, snap, version)
        )

    @property
    def read_only(self) -> str | None:
        """Why the state cannot be written now (a full disk), or None."""
        return self.store.read_only

    async def wait_writable(self) -> None:
        await self.store.wait_writable()

    def load(self, kind: str) -> dict[str, dict[str, Any]]:
        """The rows of one kind, as the state holds them (at start)."""
        return self.store.load(kind)

    async def commit_or_log(self, slot: Slot, snap: Slot, events: list[Event], retry_s: float = 5.0) -> bool:
        """A background change: on a store failure, log, pause, and report it was not made."""
        try:
            await self.commit([(slot, snap)], events)
        except Unavailable as exc:
            log.error("persist_failed", slot=slot.slot_id, error=exc.message)
            await anyio.sleep(retry_s)
            return False
        return True

    async def persist_or_keep(self, slot: Slot, events: list[Event]) -> None:
        """Persist a background move towards cleaning, error or removal; if the store fails the
        change stays in memory (redoing it after a restart is always safe)."""
        slot.version += 1
        if not await self.persist_quietly([Put("slot", slot.slot_id, slot.to_row()), *events]):
            log.warning("state_not_saved", slot=slot.slot_id, state=str(slot.state))

    async def persist_quietly(self, ops: list[Put | Delete | Event]) -> bool:
        try:
            await self.store.write(ops)
        except Unavailable as exc:
            log.error("persist_failed", error=exc.message)
            return False
        return True
