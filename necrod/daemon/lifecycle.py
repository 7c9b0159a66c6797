"""The life of a slot after its lease: creation, cleanup, moves to a new base, removal, and the
pool's size. All of it runs in the background, driven by slot state (``_drive``).

=============  ===========================================================================
state          what the driver does
=============  ===========================================================================
creating       ``git worktree add --detach`` at the base commit → available
cleaning       stop what still runs in the slot, salvage what the lease left,
               ``checkout --force --detach <base>``, ``clean``, look for processes again
               → available (or removing, when retiring); failing twice, or processes that
               would not stop or came back → error
removing       ``git worktree remove`` → the slot is forgotten
available      behind the base commit → moved there; broken on disk → cleaning
=============  ===========================================================================
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from necrod.core.names import slot_id
from necrod.core.sizing import idle_to_remove, may_retire_idle, slots_to_create
from necrod.core.slots import Slot, SlotState
from necrod.daemon.engine_base import EngineBase, log
from necrod.daemon.pool import Pool
from necrod.daemon.slotkinds import SlotKind
from necrod.io import slotfs
from necrod.io.diskusage import disk_usage
from necrod.io.gitrun import GitError
from necrod.io.procs import Holder, ScanStuck, find_holders, kernel_path, stop_holders
from necrod.io.store import Delete, Event, Put
from necrod.proto.errors import FailedPrecondition, ResourceExhausted, Unavailable

#: Wait before the second attempt at a failed cleanup.
CLEANUP_RETRY_S = 5.0
#: Between SIGTERM and SIGKILL for what a lease left running in its slot: its holder is gone,
#: so this only lets a well-behaved process flush what it was writing.
LEFTOVER_GRACE_S = 2.0
#: Processes named in a slot's error and events (a respawning parent may have started hundreds).
PROCESSES_NAMED = 5
Action = Callable[[Pool, Slot], Awaitable[None]]


class Lifecycle(EngineBase):
    def _start_expiry(self, slot: Slot, how: str) -> None:
        raise NotImplementedError

    # --- driving -------------------------------------------------------------------------------------

    async def _drive(self, slot: Slot) -> None:
        try:
            while not self.stopping:
                if self.store.read_only is not None:
                    # Nothing this slot's git work leads to could be recorded: wait for room
                    # rather than redo it (and its salvage) every few seconds meanwhile.
                    await self.store.wait_writable()
                    continue
                p = self.pools.get(slot.pool)
                if p is None or p.slots.get(slot.slot_id) is not slot or p.state != "ready":
                    return
                action = self._next_action(p, slot)
                if action is None:
                    return
                await action(p, slot)
        except Exception:
            log.exception("slot_job_crashed", slot=slot.slot_id)
        finally:
            self._active.discard(slot.slot_id)

    def _next_action(self, p: Pool, slot: Slot) -> Action | None:
        match slot.state:
            case SlotState.CREATING:
                return self._build
            case SlotState.CLEANING:
                return self._clean
            case SlotState.REMOVING:
                return self._remove
            case SlotState.AVAILABLE if not slot.reserved:
                if p.draining or slot.retire:
                    return self._retire
                if self._slot_git(p, slot).healthy() is not None or slot.kind != p.config.isolation:
                    return self._mark_broken
                if p.base_commit and slot.commit != p.base_commit:
                    return self._move
        return None

    # --- actions -------------------------------------------------------------------------------------

    async def _build(self, p: Pool, slot: Slot) -> None:
        base = p.base_commit
        assert base is not None
        try:
            async with self._limits(p):
                slot.busy = True
                try:
                    await self._check_mirror(p)
                    slot.kind = p.config.isolation
                    await p.kind.add(Path(slot.path), slot.admin, base, timeout=p.config.cleanup_timeout_s)
                finally:
                    slot.busy = False
        except (GitError, OSError) as exc:
            p.create_failures += 1
            delay = min(300.0, 2.0**p.create_failures)
            p.create_not_before = self.clock.monotonic() + delay
            log.error("slot_create_failed", slot=slot.slot_id, error=str(exc), next_try_in_s=delay)
            slot.state = SlotState.REMOVING
            slot.error = f"creating the worktree failed: {exc}"
            await self._persist_or_keep(slot, [self._slot_event(slot, "create_failed", error=slot.error)])
            return
        p.create_failures = 0
        snap = slot.snapshot()
        slot.state = SlotState.AVAILABLE
        slot.commit = base
        slot.error = None
        slot.verified_at = self.clock.monotonic()
        if await self._commit_or_log(slot, snap, [self._slot_event(slot, "created")]):
            self._offer(p, slot)
            self._maintain(p)

    def _retiring(self, p: Pool, slot: Slot) -> bool:
        if p.draining or slot.retire:
            return True
        counts = p.counts()
        if counts.total > max(p.baseline, p.config.max_slots):
            return True
        return (
            (p.shrinking or self.disk_low) and counts.total > p.baseline and counts.idle >= p.config.min_idle
        )

    async def _clean(self, p: Pool, slot: Slot) -> None:
        if slot.cleanup_failures:
            await anyio.sleep(CLEANUP_RETRY_S)
        base = p.base_commit
        assert base is not None
        retiring = self._retiring(p, slot)
        if slot.isolate is not None:
            await self._isolate_now(p, slot, slot.isolate)
            return
        if not await self._stop_leftovers(p, slot):
            return
        sg = self._slot_git(p, slot)
        salvaged = None
        started = time.perf_counter()
        try:
            async with self._limits(p):
                slot.busy = True
                try:
                    await self._check_mirror(p, slot)
                    problem = sg.healthy()
                    if problem is None:
                        locks = sg.clear_stale_locks()
                        if locks:
                            log.warning("stale_locks_removed", slot=slot.slot_id, locks=locks)
                    if slot.salvage_as:
                        # Even a slot whose repository is broken has its work tree salvaged.
                        note = f" ({slot.salvage_note})" if slot.salvage_note else ""
                        salvaged = await self._salvager(p, slot).salvage(
                            slot.salvage_as, slot.salvage_commit,
                            f"necrod salvage of lease {slot.salvage_as} in slot {slot.slot_id}{note}",
                            origin_tags=p.refs, owner_uid=slot.salvage_uid,
                        )  # fmt: skip
                    if problem is None:
                        branch = slot.branch or self._own_head_branch(p, slot)
                        remake = slot.rebuild or slot.kind != p.config.isolation
                        if not retiring and not remake:
                            await sg.reset(base, p.config.clean_flags)
                        if branch:
                            await sg.delete_branch(branch)
                    if not retiring and slot.kind != p.config.isolation:
                        # The pool changed kind: the slot is remade as the new kind, its work
                        # salvaged first by the kind it was.
                        await p.kind_of(slot).remove(Path(slot.path), slot.admin,
                                                     timeout=p.config.cleanup_timeout_s)  # fmt: skip
                        slot.kind, problem = p.config.isolation, "its kind changed"
                    if not retiring and (problem is not None or slot.rebuild):
                        await p.kind.add(
                            Path(slot.path), slot.admin, base, timeout=p.config.cleanup_timeout_s
                        )
                finally:
                    slot.busy = False
        except (GitError, OSError) as exc:
            await self._cleanup_failed(p, slot, exc)
            return
        events = []
        if salvaged is not None:
            if p.config.metrics:
                self.metrics.salvages.labels(p.name).inc()
            events.append(Event("slots", "salvage.saved", {
                "slot_id": slot.slot_id, "pool": p.name, "lease_id": slot.salvage_as, "ref": salvaged.ref,
                "commit": salvaged.commit, "dirty": salvaged.dirty, "partial": salvaged.partial,
                "bytes": salvaged.bytes, "skipped": salvaged.skipped_count, "kept": list(salvaged.extras),
            }))  # fmt: skip
        came_back = None if retiring else slot.isolate or await self._came_back(p, slot)
        snap = slot.snapshot()
        slot.salvage_as = slot.salvage_commit = slot.salvage_note = slot.salvage_uid = None
        slot.branch = None
        slot.cleanup_failures = 0
        slot.rebuild = False
        slot.error = None
        if retiring:
            slot.state = SlotState.REMOVING
        elif came_back is not None:
            slot.state = SlotState.ERROR
            slot.error = f"isolated: {came_back}"
        else:
            slot.state = SlotState.AVAILABLE
            slot.commit = base
            slot.verified_at = self.clock.monotonic()
            if p.clean_bytes is not None and p.clean_bytes[0] == base:
                slot.disk_bytes = p.clean_bytes[1]
        if came_back is not None:
            log.error("slot_isolated", slot=slot.slot_id, reason=came_back)
            events.append(self._slot_event(slot, "isolated", detail=came_back))
        else:
            events.append(self._slot_event(slot, "cleaned"))
        if await self._commit_or_log(slot, snap, events):
            if p.config.metrics:
                self.metrics.cleanup_seconds.labels(p.name).observe(time.perf_counter() - started)
            if slot.state is SlotState.AVAILABLE:
                self._offer(p, slot)
            self._maintain(p)

    def _own_head_branch(self, p: Pool, slot: Slot) -> str | None:
        """The branch the slot's HEAD is on, if it is the lease's to delete: in a worktree pool
        branches are shared, and an agent can point HEAD at another slot's."""
        branch = _head_branch(p.kind_of(slot), slot)
        if branch is None or slot.kind != "worktree":
            return branch
        for other in p.slots.values():
            if (
                other is not slot
                and other.kind == "worktree"
                and branch in (other.branch, _head_branch(p.kind_of(other), other))
            ):
                log.warning("branch_kept", slot=slot.slot_id, branch=branch, used_by=other.slot_id)
                return None
        return branch

    def _slot_dirs(self, p: Pool, slot: Slot) -> list[str]:
        """Where a process of the slot's may work: its checkout and its git directory."""
        return [kernel_path(slot.path), kernel_path(str(self._slot_git(p, slot).admin_dir))]

    async def _stop_leftovers(self, p: Pool, slot: Slot) -> bool:
        """Stop whatever still runs in the slot (a lease's background job, a runner's detached
        child) before its work is salvaged and it is reset; when something will not stop, the
        slot is isolated instead. True when nothing runs there any more."""
        try:
            stop = await stop_holders(self._slot_dirs(p, slot), LEFTOVER_GRACE_S)
        except ScanStuck as exc:
            await self._isolate_now(p, slot, f"could not tell what runs in it: {exc}")
            return False
        if stop.stopped:
            found = [h.describe() for h in stop.stopped[:PROCESSES_NAMED]]
            count = len(stop.stopped)
            log.warning("slot_processes_stopped", slot=slot.slot_id, count=count, processes=found)
            event = self._slot_event(slot, "processes_stopped", count=count, processes=found)
            await self._persist_quietly([event])
        if stop.left:
            left = _named(stop.left)
            await self._isolate_now(p, slot, f"processes in it would not stop: {left}")
            return False
        return True

    async def _came_back(self, p: Pool, slot: Slot) -> str | None:
        """Look again once the slot is reset, just before it is offered: a process found now
        was started while it was being cleaned, by something outside it (a respawning parent),
        and may have written into the fresh checkout. Why the slot must not be offered, or None."""
        try:
            found = await find_holders(self._slot_dirs(p, slot))
            if not found:
                return None
            await stop_holders(self._slot_dirs(p, slot), 0.0)
        except ScanStuck as exc:
            return f"could not tell what runs in it: {exc}"
        who = _named(found)
        return f"processes started in it while it was cleaned (something outside it starts them): {who}"

    async def _isolate_now(self, p: Pool, slot: Slot, why: str) -> None:
        log.error("slot_isolated", slot=slot.slot_id, reason=why)
        slot.state = SlotState.ERROR
        slot.error = f"isolated: {why}"
        await self._persist_or_keep(slot, [self._slot_event(slot, "isolated", detail=why)])
        self._maintain(p)

    async def _cleanup_failed(self, p: Pool, slot: Slot, exc: Exception) -> None:
        if p.config.metrics:
            self.metrics.cleanup_failures.labels(p.name).inc()
        slot.cleanup_failures += 1
        events = []
        if slot.cleanup_failures >= 2:
            slot.state = SlotState.ERROR
            slot.error = f"cleanup failed twice: {exc}"
            events.append(self._slot_event(slot, "quarantined", error=slot.error))
            log.error("slot_quarantined", slot=slot.slot_id, error=str(exc))
        else:
            log.warning("cleanup_failed", slot=slot.slot_id, error=str(exc), retry_in_s=CLEANUP_RETRY_S)
        await self._persist_or_keep(slot, events)
        self._spawn(self.verify_mirror, p, True)  # a cleanup may fail for want of objects
        if slot.state is SlotState.ERROR:
            self._maintain(p)

    async def _mark_broken(self, p: Pool, slot: Slot) -> None:
        reason = (
            self._slot_git(p, slot).healthy() or f"it is a {slot.kind} slot in a {p.config.isolation} pool"
        )
        log.warning("slot_broken", slot=slot.slot_id, reason=reason)
        slot.state = SlotState.CLEANING
        await self._persist_or_keep(slot, [self._slot_event(slot, "broken")])

    async def _retire(self, p: Pool, slot: Slot) -> None:
        slot.state = SlotState.REMOVING
        await self._persist_or_keep(slot, [self._slot_event(slot, "retired")])

    async def _move(self, p: Pool, slot: Slot) -> None:
        """Bring an available slot to the pool's new base commit, in the background."""
        async with self._limits(p):
            base = p.base_commit
            if (
                slot.state is not SlotState.AVAILABLE
                or slot.reserved
                or slot.busy
                or base is None
                or slot.commit == base
            ):
                return
            slot.busy = True
            try:
                dirty = slot.to_row()
                dirty["state"] = str(SlotState.CLEANING)
                await self.store.write([Put("slot", slot.slot_id, dirty)])
                await self._check_mirror(p, slot)
                await self._slot_git(p, slot).move(base)
            except (GitError, OSError, Unavailable) as exc:
                log.warning("slot_move_failed", slot=slot.slot_id, error=str(exc))
                slot.busy = False
                slot.state = SlotState.CLEANING
                await self._persist_or_keep(slot, [self._slot_event(slot, "move_failed")])
                return
            finally:
                slot.busy = False
        snap = slot.snapshot()
        slot.commit = base
        if await self._commit_or_log(slot, snap, [self._slot_event(slot, "moved")]):
            self._offer(p, slot)
        else:
            # The worktree moved but the state could not say so: never hand it out as it is.
            slot.state = SlotState.CLEANING

    async def _remove(self, p: Pool, slot: Slot) -> None:
        async with self._limits(p):
            slot.busy = True
            try:
                await p.kind_of(slot).remove(Path(slot.path), slot.admin, timeout=p.config.cleanup_timeout_s)
            except (GitError, OSError) as exc:
                log.error("slot_remove_failed", slot=slot.slot_id, error=str(exc))
            finally:
                slot.busy = False
        removed = Event("slots", "slot.removed", {"slot_id": slot.slot_id, "pool": p.name})
        if not await self._persist_quietly([Delete("slot", slot.slot_id), removed]):
            await anyio.sleep(CLEANUP_RETRY_S)
            return
        p.slots.pop(slot.slot_id, None)
        done = self._removed.pop(slot.slot_id, None)
        if done is not None:
            done.set()
        if p.draining:
            await self._maybe_forget(p)
        else:
            self._maintain(p)

    async def verify_mirror(self, p: Pool, heal: bool) -> tuple[str, str | None] | None:
        """Check the mirror's objects (``git fsck --connectivity-only``); with ``heal``, fetch
        them all again when some are missing, handing nothing out of the pool meanwhile. Returns
        None when nothing is missing, else the problem and what was done about it."""
        if p.verifying or not p.mirror.exists:
            return None
        p.verifying = True
        try:
            p.mirror_checked_at = self.clock.monotonic()
            problem = await p.mirror.connectivity_problem(timeout=p.config.clone_timeout_s)
            if problem is None:
                return None
            if not heal:
                return problem, None
            log.error("mirror_objects_missing", pool=p.name, problem=problem)
            p.repairing = True
            try:
                async with self._limits(p):
                    await p.mirror.refetch(timeout=p.config.clone_timeout_s)
                after = await p.mirror.connectivity_problem(timeout=p.config.clone_timeout_s)
            except (GitError, OSError) as exc:
                return problem, f"refetch failed: {exc}"
            finally:
                p.repairing = False
            for slot in list(p.slots.values()):
                if slot.state is SlotState.AVAILABLE:
                    slot.verified_at = 0.0  # look at them again at the next scan
            self._persist_quietly_later(Event("pools", "pool.repaired", {"pool": p.name, "problem": problem,
                                                                         "still": after}))  # fmt: skip
            return problem, "refetched" + (f", still broken: {after}" if after else "")
        finally:
            p.verifying = False

    def _persist_quietly_later(self, event: Event) -> None:
        self._spawn(self._persist_quietly, [event])

    async def measure(self, slot: Slot) -> int | None:
        """Disk use of one slot (shown by ``necroctl slots -l``); the supervisor calls this, never
        the cleanup path: a walk of a large checkout costs tens of milliseconds."""
        slot.disk_bytes = await disk_usage(slot.path)
        return slot.disk_bytes

    # --- pool size -----------------------------------------------------------------------------------

    def _maintain(self, p: Pool) -> None:
        """Create or remove slots so the pool matches its size rules (core.sizing)."""
        if self.stopping or p.state != "ready" or self._tg is None:
            return
        if p.draining:
            for slot in list(p.slots.values()):
                self._kick(slot)
            if not p.slots:
                self._spawn(self._maybe_forget, p)
            return
        counts = p.counts()
        cfg = p.config
        wanted = 0 if self.disk_low else slots_to_create(
            counts, baseline=p.baseline, min_idle=cfg.min_idle, max_slots=cfg.max_slots, waiting=len(p.waiters)
        )  # fmt: skip
        now = self.clock.monotonic()
        if wanted and now < p.create_not_before:
            if not p.maintain_scheduled:
                p.maintain_scheduled = True
                self._spawn(self._maintain_later, p, p.create_not_before - now)
        else:
            for _ in range(wanted):
                self._spawn(self._persist_new, p, self._new_slot(p))
        excess = idle_to_remove(
            counts, baseline=p.baseline, min_idle=cfg.min_idle, max_slots=cfg.max_slots,
            shrinking=p.shrinking or self.disk_low,
        )  # fmt: skip
        if excess:
            idle = [
                s
                for s in p.slots.values()
                if s.state is SlotState.AVAILABLE and not (s.reserved or s.busy or s.retire)
            ]
            for slot in sorted(idle, key=lambda s: -s.number)[:excess]:
                slot.retire = True
                self._kick(slot)
        if p.shrinking and p.counts().total <= p.baseline:
            p.shrinking = False

    async def _maintain_later(self, p: Pool, delay: float) -> None:
        await anyio.sleep(delay)
        p.maintain_scheduled = False
        self._maintain(p)

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
                self._kick(slot)
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
            await self.store.write(
                [Put("slot", slot.slot_id, slot.to_row()), Put("pool", p.name, p.to_row()),
                 self._slot_event(slot, "creating")], undo,
            )  # fmt: skip
        except Unavailable:
            return
        self._kick(slot)

    async def _maybe_forget(self, p: Pool) -> None:
        if not p.draining or p.slots or self.pools.get(p.name) is not p:
            return
        # The pool goes, its slot numbers stay taken: a pool of this name added later starts
        # after them, so no slot id (and no fencing token of one) ever comes back.
        fence = {"next_number": p.next_number}
        if await self._persist_quietly(
            [
                Delete("pool", p.name),
                Put("fence", p.name, fence),
                Event("pools", "pool.removed", {"pool": p.name}),
            ]
        ):
            self.fences[p.name] = fence
            self.pools.pop(p.name, None)
            log.info("pool_removed", pool=p.name, mirror_kept=str(p.mirror.path))

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
        await self._persist_quietly(
            [
                Put("slot", slot.slot_id, slot.to_row()),
                Put("pool", p.name, p.to_row()),
                self._slot_event(slot, "adopted"),
            ]
        )
        self._kick(slot)
        return slot

    # --- operator actions ---------------------------------------------------------------------------

    async def add_slot(self, pool: str, wait_s: float | None = None) -> dict[str, Any]:
        p = self.pool(pool)
        if self.stopping or p.draining or p.state != "ready":
            raise Unavailable(
                f"pool {p.name} is not ready ({'draining' if p.draining else p.state})", pool=p.name
            )
        if self.disk_low:
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

    async def remove_slot(self, sid: str, *, force: bool = False, wait_s: float = 300) -> dict[str, Any]:
        slot = self.slot(sid)
        p = self.pools[slot.pool]
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
            self._start_expiry(slot, "revoked")
        elif slot.state is not SlotState.REMOVING:
            slot.retire = True
            if slot.state in (SlotState.AVAILABLE, SlotState.ERROR) and not slot.reserved:
                snap = slot.snapshot()
                slot.state = SlotState.REMOVING
                await self._commit([(slot, snap)], [self._slot_event(slot, "removed_by_operator")])
        if counted:
            p.delta -= 1
            await self._persist_quietly([Put("pool", p.name, p.to_row())])
        done = self._removed.setdefault(sid, anyio.Event())
        self._kick(slot)
        with anyio.move_on_after(wait_s):
            await done.wait()
        view = slot.view()
        view["state"] = "removed" if done.is_set() else str(slot.state)
        return view

    async def recover(self, sid: str, wait_s: float = 300) -> dict[str, Any]:
        """Rebuild a quarantined (or suspect idle) slot, salvaging what it holds first."""
        slot = self.slot(sid)
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
        await self._commit([(slot, snap)], [self._slot_event(slot, "recover")])
        self._kick(slot)
        with anyio.move_on_after(wait_s):
            while slot.state is SlotState.CLEANING:
                await anyio.sleep(0.05)
        return slot.view()

    async def isolate(self, sid: str, reason: str | None) -> dict[str, Any]:
        """Take a slot out of rotation, untouched, for inspection: at once when it is idle,
        when its lease ends when it is held, before (or, when it has begun, instead of being
        offered after) its cleanup when it is being cleaned."""
        slot = self.slot(sid)
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
        await self._commit([(slot, snap)], [self._slot_event(slot, "isolated", detail=why)])
        if slot.state is SlotState.ERROR:
            self._maintain(self.pools[slot.pool])
        return slot.view()


def _named(found: list[Holder]) -> str:
    named = "; ".join(h.describe() for h in found[:PROCESSES_NAMED])
    return named + (f"; and {len(found) - PROCESSES_NAMED} more" if len(found) > PROCESSES_NAMED else "")


def _head_branch(kind: SlotKind, slot: Slot) -> str | None:
    """The branch a slot's HEAD is on, read from its HEAD file (None when detached or unreadable)."""
    root, rel = kind.git_dir_at(slot.admin, slot.path)
    head = (slotfs.read_text_or_none(root, f"{rel}/HEAD") or "").strip()
    prefix = "ref: refs/heads/"
    return head[len(prefix) :] if head.startswith(prefix) else None
