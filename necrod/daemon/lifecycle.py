"""The life of a slot, driven by its state, in the background (``drive``), and the operator's
actions on one slot.

=============  ===========================================================================
state          what the driver does
=============  ===========================================================================
creating       ``git worktree add --detach`` at the base commit → available
cleaning       ``cleanup``: stop what still runs in the slot, salvage what the lease left,
               ``checkout --force --detach <base>``, ``clean``, look for processes again
               → available (or removing, when retiring); failing twice, or processes that
               would not stop or came back → error
removing       ``git worktree remove`` → the slot is forgotten
available      behind the base commit → moved there; broken on disk → cleaning
=============  ===========================================================================

Operator actions: ``remove_slot`` (revoking a held lease with ``force``), ``recover`` (rebuild,
salvaging first), ``isolate`` (out of rotation, untouched); ``adopt`` takes in a worktree of
ours the state does not know. It calls the slot table, the background jobs, the git gate, the
pool sizer, the allocator (offer a slot, revoke a lease) and cleanup.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import structlog

from necrod.core.clock import Clock
from necrod.core.names import slot_id
from necrod.core.slots import Slot, SlotState
from necrod.daemon.allocator import Allocator
from necrod.daemon.cleanup import CLEANUP_RETRY_S, Cleanup
from necrod.daemon.gitgate import GitGate
from necrod.daemon.jobs import Jobs
from necrod.daemon.pool import Pool
from necrod.daemon.poolsize import PoolSizer
from necrod.daemon.prepare import Preparer
from necrod.daemon.slottable import SlotTable, slot_event
from necrod.io.gitrun import GitError
from necrod.io.store import Delete, Event, Put
from necrod.proto.errors import FailedPrecondition, Unavailable

log = structlog.get_logger("necrod.engine")

Action = Callable[[Pool, Slot], Awaitable[None]]


class Lifecycle:
    def __init__(
        self, *, table: SlotTable, jobs: Jobs, gate: GitGate, sizer: PoolSizer, allocator: Allocator,
        cleanup: Cleanup, preparer: Preparer, clock: Clock,
    ) -> None:  # fmt: skip
        self.table = table
        self.jobs = jobs
        self.gate = gate
        self.sizer = sizer
        self.allocator = allocator
        self.cleanup = cleanup
        self.preparer = preparer
        self.clock = clock
        #: Set when a slot being removed by an operator is gone.
        self._removed: dict[str, anyio.Event] = {}

    async def drive(self, slot: Slot) -> None:
        """Do what the slot's state calls for, until it calls for nothing (``jobs.kick``)."""
        try:
            while not self.table.stopping:
                if self.table.read_only is not None:
                    # Nothing this slot's git work leads to could be recorded: wait for room
                    # rather than redo it (and its salvage) every few seconds meanwhile.
                    await self.table.wait_writable()
                    continue
                p = self.table.pools.get(slot.pool)
                if p is None or p.slots.get(slot.slot_id) is not slot or p.state != "ready":
                    return
                action = self._next_action(p, slot)
                if action is None:
                    return
                await action(p, slot)
        except Exception:
            log.exception("slot_job_crashed", slot=slot.slot_id)

    def _next_action(self, p: Pool, slot: Slot) -> Action | None:
        match slot.state:
            case SlotState.CREATING:
                return self._build
            case SlotState.CLEANING:
                return self.cleanup.clean
            case SlotState.REMOVING:
                return self._remove
            case SlotState.AVAILABLE if not slot.reserved:
                if p.draining or slot.retire:
                    return self._retire
                if (
                    self.gate.slot_git(p, slot).healthy() is not None
                    or slot.kind != p.config.isolation
                    or slot.rebuild
                ):
                    return self._mark_broken
                if p.base_commit and (slot.commit != p.base_commit or self.preparer.stale(p, slot)):
                    return self._move
        return None

    # --- actions -------------------------------------------------------------------------------------

    async def _build(self, p: Pool, slot: Slot) -> None:
        base = p.base_commit
        assert base is not None
        try:
            async with self.gate.limits(p):
                slot.busy = True
                try:
                    await self.gate.check_mirror(p)
                    slot.kind = p.config.isolation
                    slot.prepared = None
                    slot.layers = await p.kind.add(Path(slot.path), slot.admin, base,
                                                   timeout=p.config.cleanup_timeout_s, sparse=p.config.sparse)  # fmt: skip
                finally:
                    slot.busy = False
            slot.commit = base
            await self.preparer.prepare_slot(p, slot, base)
        except (GitError, OSError) as exc:
            p.create_failures += 1
            delay = min(300.0, 2.0**p.create_failures)
            p.create_not_before = self.clock.monotonic() + delay
            log.error("slot_create_failed", slot=slot.slot_id, error=str(exc), next_try_in_s=delay)
            slot.state = SlotState.REMOVING
            slot.error = f"creating the worktree failed: {exc}"
            await self.table.persist_or_keep(slot, [slot_event(slot, "create_failed", error=slot.error)])
            self._first_slots(p)
            return
        p.create_failures = 0
        snap = slot.snapshot()
        slot.state = SlotState.AVAILABLE
        slot.commit = base
        slot.error = None
        slot.verified_at = self.clock.monotonic()
        if await self.table.commit_or_log(slot, snap, [slot_event(slot, "created")]):
            self.allocator.offer(p, slot)
            self.sizer.maintain(p)
        self._first_slots(p)

    def _first_slots(self, p: Pool) -> None:
        """A pool coming up for the first time: how many of its first slots are made; its
        progress is over once none is being made."""
        if p.progress is None:
            return
        made = sum(s.state is not SlotState.CREATING for s in p.slots.values())
        p.progress.slots(made, len(p.slots))
        if made == len(p.slots):
            p.progress = None

    async def _mark_broken(self, p: Pool, slot: Slot) -> None:
        reason = self.gate.slot_git(p, slot).healthy() or (
            f"it is a {slot.kind} slot in a {p.config.isolation} pool"
            if slot.kind != p.config.isolation
            else "it is to be made again (its pool's lfs: changed)"
        )
        log.warning("slot_broken", slot=slot.slot_id, reason=reason)
        slot.state = SlotState.CLEANING
        await self.table.persist_or_keep(slot, [slot_event(slot, "broken")])

    async def _retire(self, p: Pool, slot: Slot) -> None:
        slot.state = SlotState.REMOVING
        await self.table.persist_or_keep(slot, [slot_event(slot, "retired")])

    async def _move(self, p: Pool, slot: Slot) -> None:
        """Bring an available slot to the pool's new base commit (or, at the base, onto the
        pool's new layers or prepare key), in the background."""
        snap = slot.snapshot()
        async with self.gate.limits(p):
            base = p.base_commit
            if (
                slot.state is not SlotState.AVAILABLE
                or slot.reserved
                or slot.busy
                or base is None
                or (slot.commit == base and not self.preparer.stale(p, slot))
            ):
                return
            slot.busy = True
            try:
                dirty = slot.to_row()
                dirty["state"] = str(SlotState.CLEANING)
                await self.table.write_row(slot, dirty)
                await self.gate.check_mirror(p, slot)
                slot.layers = await self.gate.slot_git(p, slot).move(base)
                slot.commit = base
            except (GitError, OSError, Unavailable) as exc:
                log.warning("slot_move_failed", slot=slot.slot_id, error=str(exc))
                slot.busy = False
                slot.state = SlotState.CLEANING
                await self.table.persist_or_keep(slot, [slot_event(slot, "move_failed")])
                return
            finally:
                slot.busy = False
        slot.busy = True
        try:
            # Outside the git limits: a step may take minutes.
            await self.preparer.prepare_slot(p, slot, base)
        finally:
            slot.busy = False
        if await self.table.commit_or_log(slot, snap, [slot_event(slot, "moved")]):
            self.allocator.offer(p, slot)
            if slot.layers:
                self.jobs.coalesce(f"tidy {p.name}", self.preparer.tidy, p, slot)
        else:
            # The slot moved but the state could not say so: never hand it out as it is.
            slot.state = SlotState.CLEANING

    async def _remove(self, p: Pool, slot: Slot) -> None:
        async with self.gate.limits(p):
            slot.busy = True
            try:
                await p.kind_of(slot).remove(Path(slot.path), slot.admin, timeout=p.config.cleanup_timeout_s)
            except (GitError, OSError) as exc:
                log.error("slot_remove_failed", slot=slot.slot_id, error=str(exc))
            finally:
                slot.busy = False
        removed = Event("slots", "slot.removed", {"slot_id": slot.slot_id, "pool": p.name})
        if not await self.table.persist_quietly([Delete("slot", slot.slot_id), removed]):
            await anyio.sleep(CLEANUP_RETRY_S)
            return
        p.slots.pop(slot.slot_id, None)
        done = self._removed.pop(slot.slot_id, None)
        if done is not None:
            done.set()
        if p.draining:
            await self.sizer.maybe_forget(p)
        else:
            self.sizer.maintain(p)

    async def adopt(self, p: Pool, directory: Path, reason: str) -> Slot:
        """Take a worktree of this mirror that the state does not know into the pool: salvage
        whatever it holds, then clean it like any returned slot."""
        number = int(directory.name)
        now = self.clock.wall()
        slot = Slot(
            slot_id=slot_id(p.name, number), pool=p.name, number=number, path=str(directory), admin=directory.name,
            state=SlotState.CLEANING, created_at=now, salvage_as=f"adopted-{p.name}-{number}-{int(now)}",
            salvage_note=reason,
        )  # fmt: skip
        p.slots[slot.slot_id] = slot
        p.next_number = max(p.next_number, number + 1)
        log.warning("worktree_adopted", pool=p.name, slot=slot.slot_id, reason=reason)
        await self.table.persist_quietly(
            [
                Put("slot", slot.slot_id, slot.to_row()),
                Put("pool", p.name, p.to_row()),
                slot_event(slot, "adopted"),
            ]
        )
        self.jobs.kick(slot)
        return slot

    # --- operator actions ---------------------------------------------------------------------------

    async def remove_slot(self, sid: str, *, force: bool = False, wait_s: float = 300) -> dict[str, Any]:
        slot = self.table.slot(sid)
        p = self.table.pools[slot.pool]
        # A grant not answered yet (its commit, or its checkout, runs) holds the slot with a lease
        # nobody has: revoking it would clean the slot beside that checkout and fail the grant.
        # Its end (granted or abandoned) comes first.
        with anyio.move_on_after(wait_s):
            while sid in self.allocator.granting:
                await anyio.sleep(0.05)
        if sid in self.allocator.granting:
            raise FailedPrecondition(f"slot {sid} is still being granted; try again")
        counted = slot.state not in (SlotState.ERROR, SlotState.REMOVING) and not slot.retire
        if slot.state is SlotState.ALLOCATED:
            if not force:
                assert slot.lease is not None
                raise FailedPrecondition(
                    f"slot {sid} is allocated (lease {slot.lease.lease_id}, holder {slot.lease.holder}); "
                    "pass force to revoke the lease (its work is salvaged)"
                )
            slot.retire = True
            slot.isolate = None
            self.allocator.expire(slot, "revoked")
        elif slot.state is not SlotState.REMOVING:
            slot.retire = True
            if slot.state in (SlotState.AVAILABLE, SlotState.ERROR) and not slot.reserved:
                snap = slot.snapshot()
                slot.state = SlotState.REMOVING
                await self.table.commit([(slot, snap)], [slot_event(slot, "removed_by_operator")])
        if counted:
            p.delta -= 1
            await self.table.persist_quietly([Put("pool", p.name, p.to_row())])
        done = self._removed.setdefault(sid, anyio.Event())
        self.jobs.kick(slot)
        with anyio.move_on_after(wait_s):
            await done.wait()
        view = slot.view()
        view["state"] = "removed" if done.is_set() else str(slot.state)
        return view

    async def recover(self, sid: str, wait_s: float = 300) -> dict[str, Any]:
        """Rebuild a quarantined (or suspect idle) slot, salvaging what it holds first."""
        slot = self.table.slot(sid)
        if slot.state not in (SlotState.ERROR, SlotState.AVAILABLE) or slot.reserved:
            raise FailedPrecondition(
                f"slot {sid} is {slot.state}; only error or available slots are recovered"
            )
        snap = slot.snapshot()
        if slot.state is SlotState.ERROR and slot.salvage_as is None:
            slot.salvage_as = f"recovered-{slot.pool}-{slot.number}-{int(self.clock.wall())}"
            slot.salvage_note = f"recovered from error: {slot.error}"
        slot.state = SlotState.CLEANING
        slot.rebuild = True
        slot.isolate = None
        slot.cleanup_failures = 0
        await self.table.commit([(slot, snap)], [slot_event(slot, "recover")])
        self.jobs.kick(slot)
        with anyio.move_on_after(wait_s):
            while slot.state is SlotState.CLEANING:
                await anyio.sleep(0.05)
        return slot.view()

    async def isolate(self, sid: str, reason: str | None) -> dict[str, Any]:
        """Take a slot out of rotation, untouched, for inspection: at once when it is idle,
        when its lease ends when it is held, before (or, when it has begun, instead of being
        offered after) its cleanup when it is being cleaned."""
        slot = self.table.slot(sid)
        why = reason or "no reason given"
        snap = slot.snapshot()
        slot.isolate = why
        if slot.state is SlotState.AVAILABLE and not slot.reserved and not slot.busy:
            slot.state = SlotState.ERROR
            slot.error = f"isolated: {why}"
        elif slot.state not in (SlotState.ALLOCATED, SlotState.ERROR, SlotState.CLEANING):
            slot.isolate = None
            raise FailedPrecondition(
                f"slot {sid} is {slot.state}; isolate an available, allocated or cleaning slot"
            )
        await self.table.commit([(slot, snap)], [slot_event(slot, "isolated", detail=why)])
        if slot.state is SlotState.ERROR:
            self.sizer.maintain(self.table.pools[slot.pool])
        return slot.view()
