"""Cleanup: what happens to a slot after its lease, until it is offered again.

Whatever still runs in the slot is stopped (a slot whose processes will not stop is isolated),
the lease's work is salvaged (``salvage.py``), the slot is reset to the pool's base (``checkout
--force --detach``, ``clean``) or remade when its repository is broken or its kind changed, the
reset is verified (a slot that still differs from the base is isolated with the evidence), and
it is looked at once more for processes started meanwhile before it is offered. An overlay
slot's reset is a fresh upper (``overlayslots.py``); a git slot gets the pool's prepare output
and ``files:`` after its reset (``prepare.py``). A cleanup that
fails twice leaves the slot in ``error``. Retiring slots are salvaged, not reset.

It calls the slot table, the background jobs, the git gate, the pool sizer, the allocator (to
offer the clean slot), the mirror keeper (a failing cleanup may be missing objects) and the
preparer.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import anyio
import structlog

from necrod.core.clock import Clock
from necrod.core.slots import Slot, SlotState
from necrod.daemon.allocator import Allocator
from necrod.daemon.cleaner import SlotGit
from necrod.daemon.gitgate import GitGate
from necrod.daemon.jobs import Jobs
from necrod.daemon.metrics import Metrics
from necrod.daemon.mirrorkeeper import MirrorKeeper
from necrod.daemon.pool import Pool
from necrod.daemon.poolsize import PoolSizer
from necrod.daemon.prepare import Preparer
from necrod.daemon.slotkinds import SlotKind
from necrod.daemon.slottable import SlotTable, slot_event
from necrod.io import slotfs
from necrod.io.gitrun import GitError
from necrod.io.procs import Holder, ScanStuck, kernel_path
from necrod.io.procscan import ProcScanner
from necrod.io.store import Event

log = structlog.get_logger("necrod.engine")

#: Wait before the second attempt at a failed cleanup.
CLEANUP_RETRY_S = 5.0
#: Between SIGTERM and SIGKILL for what a lease left running in its slot: its holder is gone,
#: so this only lets a well-behaved process flush what it was writing.
LEFTOVER_GRACE_S = 2.0
#: Processes named in a slot's error and events (a respawning parent may have started hundreds).
PROCESSES_NAMED = 5


class Cleanup:
    def __init__(
        self, *, table: SlotTable, jobs: Jobs, gate: GitGate, sizer: PoolSizer, allocator: Allocator,
        keeper: MirrorKeeper, preparer: Preparer, metrics: Metrics, clock: Clock,
    ) -> None:  # fmt: skip
        self.table = table
        self.jobs = jobs
        self.gate = gate
        self.sizer = sizer
        self.allocator = allocator
        self.keeper = keeper
        self.preparer = preparer
        self.metrics = metrics
        self.clock = clock
        #: The daemon's passes over /proc: the resets of slots cleaned at once share them.
        self.scanner = ProcScanner()

    def _retiring(self, p: Pool, slot: Slot) -> bool:
        if p.draining or slot.retire:
            return True
        counts = p.counts()
        if counts.total > max(p.baseline, p.config.max_slots):
            return True
        return (
            (p.shrinking or self.table.disk_low)
            and counts.total > p.baseline
            and counts.idle >= p.config.min_idle
        )

    async def clean(self, p: Pool, slot: Slot) -> None:
        """Return a used slot to clean: stop leftovers, salvage, reset, look again, offer it."""
        if slot.cleanup_failures:
            await anyio.sleep(CLEANUP_RETRY_S)
        base = p.base_commit
        assert base is not None
        retiring = self._retiring(p, slot)
        if slot.isolate is not None:
            await self._isolate_now(p, slot, slot.isolate)
            return
        kind = p.kind_of(slot)
        # An overlay's reset mounts a fresh upper: one found unused is left unmounted (nothing
        # can reach its upper any more), and mounted again only if its work is to be salvaged.
        detached = untouched = False
        if not kind.resets_with_git:
            detached, untouched = await self._detach(p, slot)
        if not detached and not await self._stop_leftovers(p, slot, looked=not kind.resets_with_git):
            return
        sg = self.gate.slot_git(p, slot)
        salvaged = drift = None
        started = time.perf_counter()
        try:
            if not kind.resets_with_git and not detached and slot.salvage_as is not None:
                # Looked at once its processes are stopped (a git slot cannot tell: no hop).
                untouched = await anyio.to_thread.run_sync(kind.untouched, slot.admin, slot.path)
            # A remount runs no git: such a cleanup, with nothing to salvage and no kind to
            # change, does not queue behind the pool's git processes.
            git_free = (
                not kind.resets_with_git and slot.kind == p.config.isolation and not slot.rebuild
                and not slot.branch and (slot.salvage_as is None or untouched)
            )  # fmt: skip
            if detached and not git_free:
                await kind.remount(slot.admin, slot.path, slot.layers)
                detached = False
            elif not detached and slot.salvage_as and not untouched:
                # An overlay left unmounted (by a cleanup that failed half-way, or from outside)
                # is mounted again on its layers and upper: its work is salvaged from its view,
                # not from the bare mount point.
                await kind.mount_again(slot.admin, slot.path, slot.layers)
            async with self.gate.pool_git(p) if git_free else self.gate.limits(p):
                slot.busy = True
                try:
                    fresh = detached and not retiring
                    if fresh:
                        drift = await self._fresh_upper(p, slot, sg, base)
                    else:
                        # The slot's first look, and a reset's removal of an interrupted
                        # operation's state, in the same thread as the mirror's check (one hop
                        # fewer holding a git slot). A detached overlay has no view to look at:
                        # its upper is dropped unseen.
                        clear = kind.resets_with_git and not retiring and not slot.rebuild
                        await self.gate.check_mirror(
                            p, slot, also=None if detached else partial(sg.prepare, clear)
                        )
                    problem = sg.problem
                    if sg.locks:
                        log.warning("stale_locks_removed", slot=slot.slot_id, locks=sg.locks)
                    if slot.salvage_as and not untouched:
                        # Even a slot whose repository is broken has its work tree salvaged.
                        note = f" ({slot.salvage_note})" if slot.salvage_note else ""
                        salvaged = await self.gate.salvager(p, slot).salvage(
                            slot.salvage_as, slot.salvage_commit,
                            f"necrod salvage of lease {slot.salvage_as} in slot {slot.slot_id}{note}",
                            origin_tags=p.refs, owner_uid=slot.salvage_uid,
                        )  # fmt: skip
                    if problem is None and not fresh:
                        branch = slot.branch or self._own_head_branch(p, slot)
                        remake = slot.rebuild or slot.kind != p.config.isolation
                        if not retiring and not remake:
                            await self.preparer.files_changed(p)
                            slot.layers = await sg.reset(base, p.config.clean_flags)
                            drift = await sg.drift(base)
                        if branch:
                            await sg.delete_branch(branch)
                    if not retiring and slot.kind != p.config.isolation:
                        # The pool changed kind: the slot is remade as the new kind, its work
                        # salvaged first by the kind it was.
                        await p.kind_of(slot).remove(Path(slot.path), slot.admin,
                                                     timeout=p.config.cleanup_timeout_s)  # fmt: skip
                        slot.kind, problem = p.config.isolation, "its kind changed"
                    if not retiring and (problem is not None or slot.rebuild):
                        slot.prepared = None
                        slot.layers = await p.kind.add(
                            Path(slot.path),
                            slot.admin,
                            base,
                            timeout=p.config.cleanup_timeout_s,
                            sparse=p.config.sparse,
                        )
                finally:
                    slot.busy = False
            if not retiring:
                slot.busy = True
                try:
                    # Outside the git limits: a step may take minutes.
                    await self.preparer.prepare_slot(p, slot, base)
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
                "submodules": list(salvaged.submodules),
            }))  # fmt: skip
        # Removed (slots.remove) or its pool dropped while it was cleaned: it goes, not offered.
        retiring = retiring or p.draining or slot.retire
        # A slot nothing ran in when it came back, remounted fresh in milliseconds, is not
        # looked at again: the window such a look covers is the one after the offer.
        came_back = (
            None if retiring or (detached and drift is None and slot.isolate is None)
            else slot.isolate or drift or await self._came_back(p, slot)
        )  # fmt: skip
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
            events.append(slot_event(slot, "isolated", detail=came_back))
        else:
            events.append(slot_event(slot, "cleaned"))
        if await self.table.commit_or_log(slot, snap, events):
            if p.config.metrics:
                self.metrics.cleanup_seconds.labels(p.name).observe(time.perf_counter() - started)
            if slot.state is SlotState.AVAILABLE:
                self.allocator.offer(p, slot)
            self.sizer.maintain(p)
            if slot.layers:
                self.jobs.coalesce(f"tidy {p.name}", self.preparer.tidy, p, slot)

    async def _fresh_upper(self, p: Pool, slot: Slot, sg: SlotGit, base: str) -> str | None:
        """A detached overlay's reset: a fresh upper on the pool's layers, with the mirror's
        check in a thread beside it, not before it (no git runs here, and the slot's own git
        files are in the upper that goes). How the slot then differs from ``base``, or None."""
        failed: list[Exception] = []

        async def check_mirror() -> None:
            try:
                await self.gate.check_mirror(p)
            except OSError as exc:
                failed.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(check_mirror)
            try:  # caught here: a task group would wrap it in an ExceptionGroup
                await self.preparer.files_changed(p)
                slot.layers = await sg.reset(base, p.config.clean_flags)
            except (GitError, OSError) as exc:
                failed.append(exc)
        if failed:
            raise failed[-1]
        return await sg.drift(base)

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
        admin = str(self.gate.slot_git(p, slot).admin_dir)
        return [kernel_path(slot.path, str(p.root)), kernel_path(admin, str(p.root))]

    async def _stop_leftovers(self, p: Pool, slot: Slot, looked: bool = False) -> bool:
        """Stop whatever still runs in the slot (a lease's background job, a runner's detached
        child) before its work is salvaged and it is reset; when something will not stop, the
        slot is isolated instead. True when nothing runs there any more. ``looked``: the slot's
        kind was just asked (``_unused``) and could not tell."""
        if not looked and await self._unused(p, slot):
            return True
        try:
            stop = await self.scanner.stop(self._slot_dirs(p, slot), LEFTOVER_GRACE_S)
        except ScanStuck as exc:
            await self._isolate_now(p, slot, f"could not tell what runs in it: {exc}")
            return False
        if stop.stopped:
            found = [h.describe() for h in stop.stopped[:PROCESSES_NAMED]]
            count = len(stop.stopped)
            log.warning("slot_processes_stopped", slot=slot.slot_id, count=count, processes=found)
            event = slot_event(slot, "processes_stopped", count=count, processes=found)
            await self.table.persist_quietly([event])
        if stop.left:
            left = _named(stop.left)
            await self._isolate_now(p, slot, f"processes in it would not stop: {left}")
            return False
        return True

    async def _came_back(self, p: Pool, slot: Slot) -> str | None:
        """Look again once the slot is reset, just before it is offered: a process found now
        was started while it was being cleaned, by something outside it (a respawning parent),
        and may have written into the fresh checkout. Why the slot must not be offered, or None."""
        if await self._unused(p, slot):
            return None
        try:
            found = await self.scanner.holders(self._slot_dirs(p, slot))
            if not found:
                return None
            await self.scanner.stop(self._slot_dirs(p, slot), 0.0)
        except ScanStuck as exc:
            return f"could not tell what runs in it: {exc}"
        who = _named(found)
        return f"processes started in it while it was cleaned (something outside it starts them): {who}"

    async def _detach(self, p: Pool, slot: Slot) -> tuple[bool, bool]:
        """An overlay's first look, in one thread: whether no process works in it (it is then
        left unmounted, and nothing can reach its upper any more) and, if so and its work is to
        be salvaged, whether the lease changed nothing."""
        kind = p.kind_of(slot)

        def look() -> tuple[bool, bool]:
            if not kind.detach_if_unused(slot.admin, slot.path, slot.layers):
                return False, False
            try:
                return True, slot.salvage_as is not None and kind.untouched(slot.admin, slot.path)
            except OSError:  # what cannot be looked at is salvaged (which says why if it fails too)
                return True, False

        try:
            return await anyio.to_thread.run_sync(look)
        except OSError as exc:
            log.warning("slot_use_unknown", slot=slot.slot_id, error=str(exc))
            return False, False

    async def _unused(self, p: Pool, slot: Slot) -> bool:
        """Whether the slot's kind can tell at once that no process works in it (an overlay:
        the kernel refuses to unmount one in use), sparing a scan of every process."""
        try:
            return await p.kind_of(slot).unused(slot.admin, slot.path, slot.layers)
        except OSError as exc:
            log.warning("slot_use_unknown", slot=slot.slot_id, error=str(exc))
            return False

    async def _isolate_now(self, p: Pool, slot: Slot, why: str) -> None:
        log.error("slot_isolated", slot=slot.slot_id, reason=why)
        slot.state = SlotState.ERROR
        slot.error = f"isolated: {why}"
        await self.table.persist_or_keep(slot, [slot_event(slot, "isolated", detail=why)])
        self.sizer.maintain(p)

    async def _cleanup_failed(self, p: Pool, slot: Slot, exc: Exception) -> None:
        if p.config.metrics:
            self.metrics.cleanup_failures.labels(p.name).inc()
        slot.cleanup_failures += 1
        events = []
        if slot.cleanup_failures >= 2:
            slot.state = SlotState.ERROR
            slot.error = f"cleanup failed twice: {exc}"
            events.append(slot_event(slot, "quarantined", error=slot.error))
            log.error("slot_quarantined", slot=slot.slot_id, error=str(exc))
        else:
            log.warning("cleanup_failed", slot=slot.slot_id, error=str(exc), retry_in_s=CLEANUP_RETRY_S)
        await self.table.persist_or_keep(slot, events)
        self.jobs.spawn(self.keeper.verify_mirror, p, True)  # a cleanup may fail for want of objects
        if slot.state is SlotState.ERROR:
            self.sizer.maintain(p)


def _named(found: list[Holder]) -> str:
    named = "; ".join(h.describe() for h in found[:PROCESSES_NAMED])
    return named + (f"; and {len(found) - PROCESSES_NAMED} more" if len(found) > PROCESSES_NAMED else "")


def _head_branch(kind: SlotKind, slot: Slot) -> str | None:
    """The branch a slot's HEAD is on, read from its HEAD file (None when detached or unreadable)."""
    root, rel = kind.git_dir_at(slot.admin, slot.path)
    head = (slotfs.read_text_or_none(root, f"{rel}/HEAD") or "").strip()
    prefix = "ref: refs/heads/"
    return head[len(prefix) :] if head.startswith(prefix) else None
