"""How many slots each pool has: cutting new ones, retiring idle ones above the baseline, the
operator's ``slots.add``, and forgetting a drained pool once its last slot is gone.

The numbers come from ``core.sizing``; this room turns them into slots: a new slot is recorded
as ``creating`` and kicked (``lifecycle`` builds it), a slot to retire is marked and kicked
(``lifecycle`` removes it). It calls the slot table and the background jobs, nothing else.
"""

from __future__ import annotations

from typing import Any

import anyio
import structlog

from necrod.core.clock import Clock
from necrod.core.names import slot_id
from necrod.core.sizing import idle_to_remove, may_retire_idle, slots_to_create
from necrod.core.slots import Slot, SlotState
from necrod.daemon.jobs import Jobs
from necrod.daemon.pool import Pool
from necrod.daemon.slottable import SlotTable, slot_event
from necrod.io.store import Put
from necrod.proto.errors import ResourceExhausted, Unavailable

log = structlog.get_logger("necrod.engine")


class PoolSizer:
    def __init__(self, table: SlotTable, jobs: Jobs, clock: Clock) -> None:
        self.table = table
        self.jobs = jobs
        self.clock = clock

    def maintain(self, p: Pool) -> None:
        """Create or remove slots so the pool matches its size rules (core.sizing)."""
        if self.table.stopping or p.state != "ready" or not self.jobs.running:
            return
        if p.draining:
            for slot in list(p.slots.values()):
                self.jobs.kick(slot)
            if not p.slots:
                self.jobs.spawn(self.maybe_forget, p)
            return
        counts = p.counts()
        cfg = p.config
        disk_low = self.table.disk_low
        wanted = 0 if disk_low else slots_to_create(
            counts, baseline=p.baseline, min_idle=cfg.min_idle, max_slots=cfg.max_slots, waiting=len(p.waiters)
        )  # fmt: skip
        now = self.clock.monotonic()
        if wanted and now < p.create_not_before:
            if not p.maintain_scheduled:
                p.maintain_scheduled = True
                self.jobs.spawn(self._maintain_later, p, p.create_not_before - now)
        else:
            for _ in range(wanted):
                self.jobs.spawn(self._persist_new, p, self._new_slot(p))
        excess = idle_to_remove(
            counts, baseline=p.baseline, min_idle=cfg.min_idle, max_slots=cfg.max_slots,
            shrinking=p.shrinking or disk_low,
        )  # fmt: skip
        if excess:
            idle = [
                s
                for s in p.slots.values()
                if s.state is SlotState.AVAILABLE and not (s.reserved or s.busy or s.retire)
            ]
            for slot in sorted(idle, key=lambda s: -s.number)[:excess]:
                slot.retire = True
                self.jobs.kick(slot)
        if p.shrinking and p.counts().total <= p.baseline:
            p.shrinking = False

    def maintain_soon(self, p: Pool) -> None:
        """``maintain`` at the next turn of the loop: a burst of allocations granted in one turn
        costs one pass over the pool's slots, not one each (issue 22)."""
        if p.maintain_due or not self.jobs.running:
            return
        p.maintain_due = True
        self.jobs.spawn(self._maintain_next_turn, p)

    async def _maintain_next_turn(self, p: Pool) -> None:
        try:
            await anyio.lowlevel.checkpoint()
        finally:
            p.maintain_due = False
        self.maintain(p)

    async def _maintain_later(self, p: Pool, delay: float) -> None:
        await anyio.sleep(delay)
        p.maintain_scheduled = False
        self.maintain(p)

    def retire_idle(self, p: Pool, idle_for_s: float) -> int:
        """Remove slots above the baseline idle longer than ``idle_for_s`` (the supervisor's call)."""
        now = self.clock.wall()
        removed = 0
        for slot in sorted(p.slots.values(), key=lambda s: -s.number):
            if not may_retire_idle(p.counts(), baseline=p.baseline, min_idle=p.config.min_idle):
                break
            idle_since = slot.last_released_at or slot.created_at
            if (
                slot.state is SlotState.AVAILABLE
                and not (slot.reserved or slot.busy or slot.retire)
                and now - idle_since >= idle_for_s
            ):
                slot.retire = True
                self.jobs.kick(slot)
                removed += 1
        return removed

    def _new_slot(self, p: Pool) -> Slot:
        number = p.next_number
        p.next_number += 1
        slot = Slot(
            slot_id=slot_id(p.name, number), pool=p.name, number=number, path=str(p.slots_dir / str(number)),
            admin=str(number), state=SlotState.CREATING, created_at=self.clock.wall(), kind=p.config.isolation,
        )  # fmt: skip
        p.slots[slot.slot_id] = slot
        return slot

    async def _persist_new(self, p: Pool, slot: Slot) -> None:
        slot.version += 1
        version = slot.version

        def undo() -> None:
            if slot.version == version:
                p.slots.pop(slot.slot_id, None)

        try:
            await self.table.write(
                [Put("slot", slot.slot_id, slot.to_row()), Put("pool", p.name, p.to_row()),
                 slot_event(slot, "creating")], undo,
            )  # fmt: skip
        except Unavailable:
            return
        self.jobs.kick(slot)

    async def maybe_forget(self, p: Pool) -> None:
        if not p.draining or p.slots or self.table.pools.get(p.name) is not p:
            return
        if await self.table.forget_pool(p):
            log.info("pool_removed", pool=p.name, mirror_kept=str(p.mirror.path))

    async def add_slot(self, pool: str, wait_s: float | None = None) -> dict[str, Any]:
        p = self.table.pool(pool)
        if self.table.stopping or p.draining or p.state != "ready":
            raise Unavailable(
                f"pool {p.name} is not ready ({'draining' if p.draining else p.state})", pool=p.name
            )
        if self.table.disk_low:
            raise ResourceExhausted(
                "free disk is below daemon.min_free_disk: no new slots are cut", pool=p.name
            )
        counts = p.counts()
        if counts.total + counts.quarantined >= p.config.max_slots:
            held = f", {counts.quarantined} of them in error" if counts.quarantined else ""
            raise ResourceExhausted(
                f"pool {p.name} is at max_slots ({p.config.max_slots}{held}); raise it in pools.yaml"
                + (", or recover or remove the slots in error" if held else ""),
                pool=p.name,
            )
        p.delta += 1
        slot = self._new_slot(p)
        await self._persist_new(p, slot)
        if slot.slot_id not in p.slots:
            p.delta -= 1
            raise Unavailable("the new slot could not be recorded")
        with anyio.move_on_after(wait_s if wait_s is not None else 300):
            while slot.state is SlotState.CREATING:
                await anyio.sleep(0.05)
        return slot.view()
