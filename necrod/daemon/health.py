"""Self-healing: finding what went wrong with a pool on disk, and mending it.

A scan of one pool looks for:

=========================  =====================================================================
kind                       healed by
=========================  =====================================================================
lease_overdue              releasing it (``daemon.release_overdue_leases``), else only reported
slot_missing               (held slot whose directory is gone) rebuilt when its lease ends
slot_broken                directory, ``.git`` file or admin directory gone: rebuilt; a ``.git``
                           file pointing elsewhere: repaired (as ``git worktree repair``)
stale_lock                 ``index.lock`` in an idle slot with no process there: removed
status_failed              ``git status`` fails in an idle slot: rebuilt
dirty_while_idle           an idle slot was written to: salvaged (``stray-*``) and cleaned
wrong_commit               an idle slot is not at its recorded commit: cleaned
quarantined                a slot in ``error``: reported (``necroctl recover`` rebuilds it)
unknown_directory          a directory in ``slots/`` no slot owns: a worktree of ours is adopted,
                           anything else is moved to ``<pool>/orphans/``
stale_mirror_lock          a ``*.lock`` in the mirror while no git of ours runs there: removed
mirror_objects_missing     ``git fsck --connectivity-only`` fails: ``git fetch --refetch``
=========================  =====================================================================

Repairs of the mirror itself (locks, ``git worktree prune``) run only while no git of ours works
on that pool (``gitgate.exclusive``). Idle slots are checked with ``git status`` at most once an
hour each, so a large idle daemon stays idle.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import structlog

from necrod.core.clock import Clock
from necrod.core.slots import Slot, SlotState
from necrod.daemon.allocator import Allocator
from necrod.daemon.gitgate import GitGate
from necrod.daemon.jobs import Jobs
from necrod.daemon.lifecycle import Lifecycle
from necrod.daemon.metrics import Metrics
from necrod.daemon.mirrorkeeper import MirrorKeeper
from necrod.daemon.pool import Pool
from necrod.daemon.slottable import SlotTable, slot_event
from necrod.io.gitrun import GitError

log = structlog.get_logger("necrod.engine")

#: An idle slot is verified with git status at most this often.
VERIFY_IDLE_EVERY_S = 3600.0
#: How long maintenance waits to have a pool to itself before giving up for this round.
EXCLUSIVE_WAIT_S = 30.0


@dataclass(slots=True)
class Anomaly:
    kind: str
    pool: str
    detail: str
    slot_id: str | None = None
    action: str | None = None

    def view(self) -> dict[str, Any]:
        return asdict(self)


class Healer:
    """Scans pools and mends what it finds. It changes slots through the slot table and kicks
    them (``lifecycle`` rebuilds or cleans them); it may end an overdue lease (allocator), adopt
    a worktree (lifecycle), remove mirror locks with the pool to itself (gate) and fetch a
    mirror's objects again (mirror keeper)."""

    def __init__(
        self, *, table: SlotTable, jobs: Jobs, gate: GitGate, allocator: Allocator, lifecycle: Lifecycle,
        keeper: MirrorKeeper, metrics: Metrics, clock: Clock,
    ) -> None:  # fmt: skip
        self.table = table
        self.jobs = jobs
        self.gate = gate
        self.allocator = allocator
        self.lifecycle = lifecycle
        self.keeper = keeper
        self.metrics = metrics
        self.clock = clock
        self.release_overdue = False

    async def scan(self, p: Pool, *, heal: bool, deep: bool = False) -> list[Anomaly]:
        found: list[Anomaly] = []
        for slot in list(p.slots.values()):
            found += await self._check_slot(p, slot, heal=heal, deep=deep)
        found += await self._check_directories(p, heal=heal)
        found += await self._check_mirror_locks(p, heal=heal)
        if deep:
            found += await self.check_mirror_objects(p, heal=heal)
        for anomaly in found:
            if p.config.metrics:
                self.metrics.anomalies.labels(p.name, anomaly.kind).inc()
            log.warning("anomaly", **anomaly.view())
        return found

    # --- slots ------------------------------------------------------------------------------------

    async def _check_slot(self, p: Pool, slot: Slot, *, heal: bool, deep: bool) -> list[Anomaly]:
        if slot.state is SlotState.ERROR:
            return [Anomaly("quarantined", p.name, slot.error or "in error", slot.slot_id)]
        if slot.state is SlotState.ALLOCATED and slot.lease is not None:
            out = []
            held_s = self.clock.wall() - slot.lease.granted_at
            limit = p.config.max_lease_s
            if limit is not None and held_s > limit:
                action = None
                if heal and self.release_overdue:
                    self.allocator.expire(slot, "overdue")
                    action = "lease ended, slot salvaged and cleaned"
                out.append(Anomaly("lease_overdue", p.name, f"held {held_s:.0f}s by {slot.lease.holder} "
                                   f"(max_lease_s {limit:g})", slot.slot_id, action))  # fmt: skip
            if not os.path.isdir(slot.path):
                out.append(Anomaly("slot_missing", p.name, "the directory of a held slot is gone", slot.slot_id,
                                   "rebuilt when its lease ends"))  # fmt: skip
            return out
        if slot.state is not SlotState.AVAILABLE or slot.reserved or slot.busy:
            return []
        sg = self.gate.slot_git(p, slot)
        problem = sg.healthy()
        if problem is not None:
            if heal:
                self.jobs.kick(slot)
            return [Anomaly("slot_broken", p.name, problem, slot.slot_id, "rebuilding" if heal else None)]
        out = []
        pointer = p.kind_of(slot).pointer_problem(slot.admin, slot.path)
        if pointer is not None:
            if heal:
                await self.gate.check_mirror(p, slot)
            out.append(Anomaly("slot_broken", p.name, pointer, slot.slot_id, "repaired" if heal else None))
        # In a thread, and nothing followed: an agent decides what is at a lock's name.
        locks = await anyio.to_thread.run_sync(sg.clear_stale_locks if heal else sg.stale_locks)
        if locks:
            out.append(
                Anomaly("stale_lock", p.name, ", ".join(locks), slot.slot_id, "removed" if heal else None)
            )
        due = self.clock.monotonic() - slot.verified_at >= VERIFY_IDLE_EVERY_S
        if not (deep or due):
            return out
        try:
            async with self.gate.limits(p):
                # git status may run filter drivers: the mirror's config is made canonical first.
                await self.gate.check_mirror(p, slot)
                # Without optional locks: a status that refreshed the index would write into the
                # idle slot (an overlay's upper), which is what it looks for.
                status = await sg.run(["status", "--porcelain=v2", "--branch", "-z", "--untracked-files=all"],
                                      env={"GIT_OPTIONAL_LOCKS": "0"})  # fmt: skip
        except (GitError, OSError) as exc:
            if self._still_idle(slot) and heal:
                slot.rebuild = True
                await self._to_cleaning(p, slot, "status_failed")
            out.append(
                Anomaly("status_failed", p.name, str(exc), slot.slot_id, "rebuilding" if heal else None)
            )
            return out
        slot.verified_at = self.clock.monotonic()
        fields = [f for f in status.out.split("\0") if f]
        head = next((f.split()[-1] for f in fields if f.startswith("# branch.oid ")), None)
        changes = [f for f in fields if not f.startswith("#")]
        if not self._still_idle(slot):
            return out
        if changes:
            if heal:
                slot.salvage_as = f"stray-{p.name}-{slot.number}-{int(self.clock.wall())}"
                slot.salvage_note = "written to while idle"
                slot.salvage_commit = slot.commit
                await self._to_cleaning(p, slot, "dirty_while_idle")
            out.append(Anomaly("dirty_while_idle", p.name, f"{len(changes)} changed path(s) in an idle slot",
                               slot.slot_id, "salvaged and cleaned" if heal else None))  # fmt: skip
        elif head != slot.commit:
            if heal:
                await self._to_cleaning(p, slot, "wrong_commit")
            out.append(Anomaly("wrong_commit", p.name, f"at {head}, recorded {slot.commit}", slot.slot_id,
                               "cleaned" if heal else None))  # fmt: skip
        return out

    @staticmethod
    def _still_idle(slot: Slot) -> bool:
        return slot.state is SlotState.AVAILABLE and not slot.reserved and not slot.busy

    async def _to_cleaning(self, p: Pool, slot: Slot, reason: str) -> None:
        slot.state = SlotState.CLEANING
        await self.table.persist_or_keep(slot, [slot_event(slot, reason)])
        self.jobs.kick(slot)

    # --- the pool's directories -----------------------------------------------------------------

    async def _check_directories(self, p: Pool, *, heal: bool) -> list[Anomaly]:
        out = []
        for entry in p.unknown_entries():
            if p.kind.owns(entry):
                action = None
                if heal:
                    await self.lifecycle.adopt(p, entry, "found on disk by self-healing")
                    action = "adopted: salvaged and cleaned"
                out.append(
                    Anomaly("unknown_directory", p.name, f"a worktree no slot owns: {entry}", None, action)
                )
            else:
                action = None
                if heal:
                    target = p.root / "orphans" / f"{entry.name}-{int(time.time())}"
                    target.parent.mkdir(exist_ok=True)
                    await anyio.to_thread.run_sync(shutil.move, str(entry), str(target))
                    action = f"moved to {target}"
                out.append(Anomaly("unknown_directory", p.name, f"not a slot: {entry}", None, action))
        return out

    # --- the mirror -----------------------------------------------------------------------------

    def _mirror_locks(self, p: Pool) -> list[Path]:
        locks = []
        root = p.mirror.path
        for dirpath, dirnames, filenames in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            if rel == "objects":
                dirnames[:] = [d for d in dirnames if d == "info"]  # skip the 256 loose-object dirs and packs
            elif rel == "worktrees":
                dirnames[:] = []  # per-slot locks are the slots' business
            locks += [Path(dirpath) / f for f in filenames if f.endswith(".lock") or f == "gc.pid"]
        return locks

    async def _check_mirror_locks(self, p: Pool, *, heal: bool) -> list[Anomaly]:
        if not p.mirror.exists:
            return []
        locks = await anyio.to_thread.run_sync(self._mirror_locks, p)
        if not locks:
            return []
        names = ", ".join(str(lock.relative_to(p.mirror.path)) for lock in locks)
        if not heal:
            return [Anomaly("stale_mirror_lock", p.name, names)]
        async with self.gate.exclusive(p, EXCLUSIVE_WAIT_S) as alone:
            if not alone:
                return [Anomaly("stale_mirror_lock", p.name, names, None, "not removed: git kept running")]
            for lock in locks:
                lock.unlink(missing_ok=True)
            try:
                await p.kind.prune()
            except GitError as exc:
                log.warning("worktree_prune_failed", pool=p.name, error=str(exc))
        return [Anomaly("stale_mirror_lock", p.name, names, None, "removed")]

    async def check_mirror_objects(self, p: Pool, *, heal: bool) -> list[Anomaly]:
        found = await self.keeper.verify_mirror(p, heal)
        if found is None:
            return []
        problem, action = found
        return [Anomaly("mirror_objects_missing", p.name, problem, None, action)]
