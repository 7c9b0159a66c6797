"""Leases: allocation (with FIFO waiting), heartbeats, release, expiry.

Allocation touches no git when it can: a plain allocation picks an available slot (one already
at the requested commit first, else the least recently used) and only waits for the state
write. ``ref`` at another commit or ``branch`` costs one git checkout in the chosen slot, which
is first recorded as ``cleaning`` on disk so that a crash mid-checkout leaves a slot to clean,
never one handed out half-done.

A lease that ends (released, expired, revoked) sends its slot to ``cleaning`` and kicks it
(``lifecycle`` salvages and cleans it); a slot that becomes available again comes back through
``offer``, first to the allocations waiting for one. It calls the slot table, the background
jobs, the git gate (a grant's checkout), the pool sizer (an idle slot fewer may want another)
and the mirror keeper (a ref the mirror does not have yet is fetched once).

Over 500 lines because granting, waiting and a lease's end are one protocol over the same
records (the grant's slow path undoes itself through the same release); a split would pass the
half-made lease between modules.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import structlog

from necrod.core.clock import Clock
from necrod.core.names import check_branch, check_ref, looks_like_sha, shown_url
from necrod.core.ports import choose_block
from necrod.core.refs import resolve
from necrod.core.slots import Lease, Slot, SlotState, branch_holder, choose_slot, new_lease_id
from necrod.core.sparse import check_sparse
from necrod.daemon import lfs
from necrod.daemon.gitgate import GitGate
from necrod.daemon.jobs import Jobs
from necrod.daemon.metrics import Metrics
from necrod.daemon.mirrorkeeper import MirrorKeeper
from necrod.daemon.pool import Pool, Waiter
from necrod.daemon.poolsize import PoolSizer
from necrod.daemon.resume import SalvagePoint
from necrod.daemon.slottable import SlotTable, iso, lease_event, slot_event
from necrod.io.gitrun import GitError
from necrod.io.ports import free_on_host
from necrod.io.store import Delete, Event, Put
from necrod.proto.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    NecrodError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

log = structlog.get_logger("necrod.engine")

#: What a caller commits with its grant, in the same transaction, made from the lease (as
#: ``allocate`` returns it) once the slot is chosen: a task's attempt, say.
WithGrant = Callable[[dict[str, Any]], list[Put | Delete | Event]]

#: How often the lease reaper looks at deadlines.
REAP_INTERVAL_S = 0.25
#: Time to fetch a ref the mirror does not have yet, when the caller gave no wait_s.
REF_FETCH_DEFAULT_S = 30.0

LeaseHook = Callable[[Slot, Lease, str], Awaitable[None]]


class Allocator:
    def __init__(
        self, *, table: SlotTable, jobs: Jobs, gate: GitGate, sizer: PoolSizer, keeper: MirrorKeeper,
        metrics: Metrics, clock: Clock, port_range: tuple[int, int] = (20000, 29999),
        max_leases_per_uid: int = 64,
    ) -> None:  # fmt: skip
        self.table = table
        self.jobs = jobs
        self.gate = gate
        self.sizer = sizer
        self.keeper = keeper
        self.metrics = metrics
        self.clock = clock
        #: Awaited when a lease ends other than by release (expiry, revocation), before the
        #: slot is salvaged: the dispatcher stops the processes it started there.
        self.lease_hooks: list[LeaseHook] = []
        #: Slots whose grant has not answered yet: their lease is not the holder's until it has.
        self.granting: set[str] = set()
        #: Called with the pool's name after a slot becomes available.
        self.on_slot_available: list[Callable[[str], None]] = []
        #: ``daemon.port_range`` and ``max_leases_per_uid`` (kept current by the engine at a reload).
        self.port_range = port_range
        self.max_leases_per_uid = max_leases_per_uid
        #: Allocations under way (waiting included) by uids that are not admins.
        self._allocating: Counter[int] = Counter()
        self._next_port: int | None = None

    async def allocate(
        self,
        *,
        pool: str,
        holder: str | None = None,
        ttl_s: float | None = None,
        ref: str | None = None,
        branch: str | None = None,
        wait_s: float | None = None,
        metadata: dict[str, Any] | None = None,
        task_id: str | None = None,
        uid: int | None = None,
        runner_uid: int | None = None,
        affinity: str | None = None,
        ports: int | None = None,
        sparse: list[str] | None = None,
        resume: SalvagePoint | None = None,
        with_grant: WithGrant | None = None,
        admin: bool = True,
    ) -> dict[str, Any]:
        """A lease on a slot of ``pool``, owned by ``uid`` (and, for a task's contained runner,
        also usable by ``runner_uid``); with ``affinity``, preferably the idle slot last
        released under that key; with ``ports`` (else the pool's), that many TCP ports; with
        ``sparse``, the slot narrowed or widened to those directories (``[]``: all) for it; with
        ``resume``, starting where that salvage's lease stopped (``resume.py``); with ``with_grant``,
        what it makes committed with the grant. A ``uid`` that is not an ``admin`` holds and
        waits for ``max_leases_per_uid`` leases at most."""
        if admin or uid is None:
            return await self._allocate(pool, holder, ttl_s, ref, branch, wait_s, metadata, task_id, uid, runner_uid,
                                        affinity, ports, sparse, resume, with_grant)  # fmt: skip
        # A task's lease counts against its submitter's tasks (``max_tasks_per_uid``), not here.
        held = sum(1 for p in self.table.pools.values() for s in p.slots.values()
                   if s.lease and s.lease.uid == uid and s.lease.task_id is None)  # fmt: skip
        if held + self._allocating[uid] >= self.max_leases_per_uid:
            raise ResourceExhausted(
                f"uid {uid} holds or waits for {held + self._allocating[uid]} leases, its most "
                f"(daemon.max_leases_per_uid: {self.max_leases_per_uid}); release one first", pool=pool,
            )  # fmt: skip
        self._allocating[uid] += 1
        try:
            return await self._allocate(pool, holder, ttl_s, ref, branch, wait_s, metadata, task_id, uid, runner_uid,
                                        affinity, ports, sparse, resume, with_grant)  # fmt: skip
        finally:
            self._allocating[uid] -= 1

    async def _allocate(
        self, pool: str, holder: str | None, ttl_s: float | None, ref: str | None, branch: str | None,
        wait_s: float | None, metadata: dict[str, Any] | None, task_id: str | None, uid: int | None,
        runner_uid: int | None, affinity: str | None, ports: int | None, sparse: list[str] | None,
        resume: SalvagePoint | None, with_grant: WithGrant | None,
    ) -> dict[str, Any]:  # fmt: skip
        started = time.perf_counter()
        p = self.table.pool(pool)
        wanted = None if sparse is None else check_sparse(sparse)
        if wanted is not None and wanted != p.config.sparse and p.config.isolation == "overlay":
            raise FailedPrecondition(f"pool {p.name} has overlay slots, which hold the whole checkout: sparse "
                                     "does not apply to them", pool=p.name, param="sparse")  # fmt: skip
        if ref is not None:
            check_ref(ref)
        if branch is not None:
            check_branch(branch)
        self._check_serving(p)
        wait = wait_s or 0.0
        deadline = self.clock.monotonic() + wait
        if p.repairing:
            raise Unavailable(f"pool {p.name} is repairing its mirror (objects were missing); retry shortly",
                              pool=p.name, state="repairing")  # fmt: skip
        if p.state != "ready":
            if not wait:
                raise Unavailable(self._not_ready_message(p), pool=p.name, state=p.state)
            with anyio.move_on_after(wait):
                await p.became_ready.wait()
            self._check_serving(p)
            if p.state != "ready":
                raise Unavailable(self._not_ready_message(p), pool=p.name, state=p.state)
        if resume is not None:
            target: str | None = resume.commit
        else:
            target = await self._resolve_ref(p, ref, deadline) if ref is not None else None
        if branch is not None:
            self._check_branch_free(p, branch)
        slot = None if p.waiters else self._choose_whole(p, target or p.base_commit, affinity)
        if slot is None:
            if not wait:
                c = p.by_state()
                raise ResourceExhausted(
                    f"no free slot in pool {p.name} ({c['allocated']} allocated, {c['cleaning']} cleaning, "
                    f"{c['creating']} creating); pass wait_s to queue",
                    pool=p.name,
                )
            slot = await self._wait_for_slot(p, max(0.0, deadline - self.clock.monotonic()), wait)
            if p.repairing:
                self._give_back(p, slot)
                raise Unavailable(f"pool {p.name} is repairing its mirror (objects were missing); retry shortly",
                                  pool=p.name, state="repairing")  # fmt: skip
            if branch is not None:
                try:
                    self._check_branch_free(p, branch)  # again: another caller may have taken it meanwhile
                except AlreadyExists:
                    self._give_back(p, slot)
                    raise
        # From choosing the ports to the grant nothing awaits: no other lease can take them.
        block = self._ports(p, p.config.ports if ports is None else ports)
        if block is None:
            self._give_back(p, slot)
            low, high = self.port_range
            raise ResourceExhausted(f"no {ports or p.config.ports} consecutive free ports in daemon.port_range "
                                    f"{low}-{high}", pool=p.name)  # fmt: skip
        self.granting.add(slot.slot_id)
        try:
            result = await self._grant(
                p, slot, holder=holder, ttl_s=ttl_s or p.config.lease_ttl_s, target=target, branch=branch,
                metadata=metadata or {}, task_id=task_id, uid=uid, runner_uid=runner_uid, affinity=affinity,
                ports=block, sparse=wanted, resume=resume, with_grant=with_grant,
            )  # fmt: skip
        finally:
            self.granting.discard(slot.slot_id)
        if p.config.metrics:
            self.metrics.allocated(p.name, time.perf_counter() - started)
        self.sizer.maintain_soon(p)  # one idle slot fewer: min_idle may want another cut
        return result

    def _ports(self, p: Pool, count: int) -> list[int] | None:
        """A block of ``count`` ports no live lease holds and nothing on the host is bound to."""
        if count <= 0:
            return []
        taken = (port for s in self.table.leases.values() if s.lease is not None for port in s.lease.ports)
        block = choose_block(count, self.port_range, taken, free_on_host, self._next_port)
        if block:
            self._next_port = block[-1] + 1
        return block

    def _not_ready_message(self, p: Pool) -> str:
        if p.state == "failed":
            return f"pool {p.name} failed to start: {p.error} (retrying)"
        if p.state == "cloning":
            return f"pool {p.name} is still cloning its mirror; pass wait_s to wait"
        return f"pool {p.name} is starting; pass wait_s to wait"

    def _check_serving(self, p: Pool) -> None:
        if self.table.stopping:
            raise Unavailable("the daemon is shutting down")
        if p.draining:
            raise Unavailable(f"pool {p.name} is being removed (draining)", pool=p.name)

    def _check_branch_free(self, p: Pool, branch: str) -> None:
        holder = branch_holder(p.slots.values(), branch)
        if holder is not None:
            raise AlreadyExists(f"branch {branch!r} is checked out in slot {holder.slot_id}", branch=branch)

    async def _resolve_ref(self, p: Pool, ref: str, deadline: float) -> str:
        commit = resolve(p.refs, ref)
        if commit is not None:
            return commit
        if looks_like_sha(ref):
            found = await p.mirror.has_commit(ref)
            if found:
                return found
        # A just-pushed branch: fetch once, within the caller's wait (or a short default).
        budget = max(deadline - self.clock.monotonic(), 0.0) or REF_FETCH_DEFAULT_S
        with anyio.move_on_after(budget) as scope:
            try:
                await self.keeper.fetch_pool(p, extra=[ref] if looks_like_sha(ref) else None)
            except GitError as exc:
                raise Unavailable(f"could not fetch {ref!r} for pool {p.name}: {exc}") from None
        if scope.cancelled_caught:
            raise DeadlineExceeded(f"fetching {ref!r} for pool {p.name} took longer than {budget:g}s")
        commit = resolve(p.refs, ref)
        if commit is None and looks_like_sha(ref):
            commit = await p.mirror.has_commit(ref)
        if commit is None:
            raise NotFound(
                f"ref {ref!r} is not in {shown_url(p.config.repo_url)} (fetched just now)", ref=ref
            )
        return commit

    # --- waiting -------------------------------------------------------------------------------------

    async def _wait_for_slot(self, p: Pool, timeout: float, wait_s: float) -> Slot:
        waiter = Waiter()
        p.waiters.append(waiter)
        self.sizer.maintain(p)
        try:
            with anyio.move_on_after(timeout):
                await waiter.event.wait()
        except BaseException:
            if waiter.slot is not None:
                self._give_back(p, waiter.slot)
            raise
        finally:
            if waiter.slot is None and waiter in p.waiters:
                p.waiters.remove(waiter)
        if waiter.error is not None:
            raise waiter.error
        if waiter.slot is None:
            raise ResourceExhausted(f"no slot in pool {p.name} became free within {wait_s:g}s", pool=p.name)
        return waiter.slot

    def _give_back(self, p: Pool, slot: Slot) -> None:
        slot.reserved = False
        if slot.state is SlotState.AVAILABLE:
            self.offer(p, slot)

    def _choose_whole(self, p: Pool, commit: str | None, affinity: str | None = None) -> Slot | None:
        """``choose_slot``, skipping (and sending to be rebuilt) slots damaged on disk since they
        were cleaned: a few stat calls, so nothing broken is ever handed out."""
        while (slot := choose_slot(p.slots.values(), commit, affinity, p.wanted_layers())) is not None:
            if self._whole(p, slot):
                return slot
        return None

    def _whole(self, p: Pool, slot: Slot) -> bool:
        kind = p.kind_of(slot)
        written = kind.written(slot.admin)
        if written is not None:
            # Written to while idle (an overlay's upper is empty after its reset): never handed
            # out; what was written is salvaged as a stray, then the slot is reset.
            log.warning("slot_written_while_idle", slot=slot.slot_id, found=written)
            slot.salvage_as = f"stray-{p.name}-{slot.number}-{int(self.clock.wall())}"
            slot.salvage_note, slot.salvage_commit = "written to while idle", slot.commit
            slot.state = SlotState.CLEANING
            event = slot_event(slot, "dirty_while_idle", detail=f"written to while idle: {written}")
            self.jobs.spawn(self.table.persist_or_keep, slot, [event])
            self.jobs.kick(slot)
            return False
        if kind.looks_whole(slot.admin, slot.path):
            return True
        problem = self.gate.slot_git(p, slot).healthy() or kind.pointer_problem(slot.admin, slot.path)
        if problem is None:
            return True
        # Repaired (restored, or rebuilt) by its cleanup, in a worker thread: what is there to
        # remove is the agent's to choose.
        log.warning("slot_broken", slot=slot.slot_id, reason=problem)
        slot.state = SlotState.CLEANING
        self.jobs.spawn(self.table.persist_or_keep, slot, [slot_event(slot, "broken", error=problem)])
        self.jobs.kick(slot)
        return False

    def offer(self, p: Pool, slot: Slot) -> None:
        """A slot became available: hand it to the first waiting allocation, if any."""
        if slot.state is not SlotState.AVAILABLE or slot.reserved or slot.busy or slot.retire:
            return
        if p.waiters and not self._whole(p, slot):
            return
        while p.waiters:
            waiter = p.waiters.popleft()
            if waiter.event.is_set():
                continue
            slot.reserved = True
            waiter.slot = slot
            waiter.event.set()
            return
        for callback in self.on_slot_available:
            callback(p.name)

    def fail_waiters(self, p: Pool, error: NecrodError) -> None:
        while p.waiters:
            waiter = p.waiters.popleft()
            if not waiter.event.is_set():
                waiter.error = error
                waiter.event.set()

    # --- granting ------------------------------------------------------------------------------------

    async def _grant(
        self, p: Pool, slot: Slot, *, holder: str | None, ttl_s: float, target: str | None, branch: str | None,
        metadata: dict[str, Any], task_id: str | None, uid: int | None, runner_uid: int | None,
        affinity: str | None = None, ports: list[int] | None = None, sparse: tuple[str, ...] | None = None,
        resume: SalvagePoint | None = None, with_grant: WithGrant | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        # Everything up to the first await is atomic: the slot is ours from here on.
        now_m, now_w = self.clock.monotonic(), self.clock.wall()
        snap = slot.snapshot()
        slot.reserved = False
        slot.fencing_token += 1
        lease = Lease(
            lease_id=new_lease_id(), holder=holder, metadata=metadata, ttl_s=ttl_s, granted_at=now_w,
            expires_at=now_w + ttl_s, fencing_token=slot.fencing_token, start_commit=slot.commit, branch=branch,
            task_id=task_id, uid=uid, runner_uid=runner_uid, affinity=affinity, ports=ports or [],
            sparse=list(p.config.sparse if sparse is None else sparse), deadline=now_m + ttl_s,
            resumed_from=resume.lease_id if resume else None,
        )  # fmt: skip
        slot.state = SlotState.ALLOCATED
        slot.lease = lease
        slot.allocations += 1
        self.table.hold(slot)
        # A lease whose sparse set is not the pool's has its slot narrowed or widened first.
        narrow = sparse if sparse is not None and sparse != p.config.sparse else None
        if (target is None or target == slot.commit) and branch is None and narrow is None:
            extra, events = await self._with_grant(with_grant, slot, lease)
            await self.table.commit(
                [(slot, snap)], [lease_event("granted", slot, lease, commit=slot.commit), *events], extra
            )
            return self._lease_view(slot)

        # Slow path: record the slot as dirty before git touches it, and keep the lease from
        # expiring while its checkout runs (nobody knows its id yet).
        lease.deadline = math.inf
        dirty = slot.to_row()
        dirty.update(state=str(SlotState.CLEANING), lease=None)
        await self.table.write_row(slot, dirty, snap)
        slot.busy = True
        try:
            if target is not None and target != p.mirror.lfs_fetched and p.config.lfs is True:
                async with self.gate.limits(p):  # the slot smudges from the mirror's store only
                    await self.gate.check_mirror(p)  # git-lfs reads the mirror's config
                    await lfs.fetch_objects(p.mirror, target, timeout=p.config.clone_timeout_s)
            async with self.gate.pool_git(p):
                await self.gate.check_mirror(p, slot)
                if resume is not None:
                    await self.gate.slot_git(p, slot).resume(resume.commit, resume.head, branch, narrow)
                else:
                    await self.gate.slot_git(p, slot).checkout(target or slot.commit or "", branch, narrow)
        except BaseException as exc:
            slot.busy = False
            with anyio.CancelScope(shield=True):
                await self._abandon_grant(slot, lease)
            if isinstance(exc, GitError | OSError):
                raise Unavailable(
                    f"could not check out {target or branch} in slot {slot.slot_id}: {exc}"
                ) from None
            raise
        slot.busy = False
        snap = slot.snapshot()
        slot.commit = resume.head if resume else target or slot.commit
        slot.branch = branch
        lease.branch = branch
        lease.start_commit = slot.commit
        lease.renew(self.clock.monotonic(), self.clock.wall())
        extra, events = await self._with_grant(with_grant, slot, lease)
        try:
            await self.table.commit(
                [(slot, snap)], [lease_event("granted", slot, lease, commit=slot.commit, branch=branch), *events],
                extra,
            )  # fmt: skip
        except Unavailable:
            await self._abandon_grant(slot, lease)
            raise
        return self._lease_view(slot)

    async def _with_grant(
        self, with_grant: WithGrant | None, slot: Slot, lease: Lease
    ) -> tuple[list[Put | Delete], list[Event]]:
        """What the caller commits with the grant; if making it fails, the grant is abandoned."""
        if with_grant is None:
            return [], []
        try:
            ops = with_grant(self._lease_view(slot))
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._abandon_grant(slot, lease)
            raise
        return [op for op in ops if not isinstance(op, Event)], [op for op in ops if isinstance(op, Event)]

    async def _abandon_grant(self, slot: Slot, lease: Lease) -> None:
        """A lease whose grant could not complete: nobody holds it; clean the slot."""
        if slot.lease is not lease:
            return
        slot.lease = None
        slot.state = SlotState.CLEANING
        slot.salvage_as = None
        self.table.let_go(lease.lease_id)
        await self.table.persist_or_keep(slot, [slot_event(slot, "grant_abandoned")])
        self.jobs.kick(slot)

    def _lease_view(self, slot: Slot) -> dict[str, Any]:
        lease = slot.lease
        assert lease is not None
        return {
            "slot_id": slot.slot_id,
            "pool": slot.pool,
            "path": slot.path,
            "commit": slot.commit,
            "branch": slot.branch,
            "lease_id": lease.lease_id,
            "fencing_token": lease.fencing_token,
            "expires_at": lease.expires_at,
            "ttl_s": lease.ttl_s,
            "holder": lease.holder,
            "ports": list(lease.ports),
            "sparse": list(lease.sparse or []),
            "resumed_from": lease.resumed_from,
        }

    # --- heartbeat, release, expiry -----------------------------------------------------------------

    async def heartbeat(self, lease_id: str, ttl_s: float | None = None) -> dict[str, Any]:
        slot = self.table.slot_for_lease(lease_id)
        lease = slot.lease
        assert lease is not None
        now_m = self.clock.monotonic()
        if lease.deadline <= now_m:
            self.expire(slot, "expired")
            raise FailedPrecondition(
                f"lease {lease_id} expired at {iso(lease.expires_at)}; its slot is being reclaimed",
                lease_id=lease_id, reason="expired",
            )  # fmt: skip
        snap = slot.snapshot()
        lease.renew(now_m, self.clock.wall(), ttl_s)
        await self.table.commit([(slot, snap)])
        return {
            "lease_id": lease_id, "slot_id": slot.slot_id, "expires_at": lease.expires_at, "ttl_s": lease.ttl_s,
            "fencing_token": lease.fencing_token,
        }  # fmt: skip

    async def release(self, lease_id: str, salvage: bool | None = None) -> dict[str, Any]:
        slot = self.table.slot_for_lease(lease_id)
        p = self.table.pools[slot.pool]
        lease = slot.lease
        assert lease is not None
        keep = p.config.salvage if salvage is None else salvage
        snap = slot.snapshot()
        self._end_lease(slot, lease, salvage=keep)
        self.table.ended(lease_id, "released")
        await self.table.commit(
            [(slot, snap)],
            [lease_event("released", slot, lease, salvage=keep), slot_event(slot, "released")],
            on_undo=lambda: self.table.forget_ended(lease_id),
        )
        if p.config.metrics:
            self.metrics.releases.labels(p.name).inc()
        self.jobs.kick(slot)
        return {"slot_id": slot.slot_id, "state": str(slot.state), "salvage": keep}

    def abandon(self, lease_id: str) -> None:
        """Release a lease whose grant never reached its holder (no work to salvage)."""

        async def release() -> None:
            try:
                await self.release(lease_id, salvage=False)
                log.warning("lease_undelivered_released", lease_id=lease_id)
            except NecrodError:
                pass

        if self.jobs.running:
            self.jobs.spawn(release)

    def _end_lease(self, slot: Slot, lease: Lease, *, salvage: bool) -> None:
        """The lease is over: the slot goes to cleaning (or, isolated, to error untouched)."""
        slot.lease = None
        slot.salvage_as = lease.lease_id if salvage else None
        slot.salvage_commit = lease.start_commit
        slot.salvage_note = f"holder {lease.holder}" if lease.holder else None
        slot.salvage_uid = lease.uid
        slot.last_released_at = self.clock.wall()
        slot.held_s += max(0.0, slot.last_released_at - lease.granted_at)
        slot.affinity = lease.affinity
        self.table.let_go(lease.lease_id)
        if slot.isolate is not None:
            slot.state = SlotState.ERROR
            slot.error = f"isolated: {slot.isolate}"
        else:
            slot.state = SlotState.CLEANING

    def expire(self, slot: Slot, how: str) -> None:
        """Expire (or revoke) the slot's lease now: bump the token, then in the background stop
        the holder's processes, salvage and clean."""
        if slot.lease is None or slot.state is not SlotState.ALLOCATED or not self.jobs.running:
            return
        lease = slot.lease
        p = self.table.pools[slot.pool]
        slot.fencing_token += 1
        self._end_lease(slot, lease, salvage=p.config.salvage)
        self.table.ended(lease.lease_id, how)
        if p.config.metrics:
            self.metrics.lease_ends.labels(p.name, how).inc()
        log.warning("lease_" + how, lease_id=lease.lease_id, slot=slot.slot_id, holder=lease.holder)
        self.jobs.spawn(self._finish_expiry, slot, lease, how)

    async def _finish_expiry(self, slot: Slot, lease: Lease, how: str) -> None:
        await self.table.persist_or_keep(slot, [lease_event(how, slot, lease), slot_event(slot, how)])
        for hook in self.lease_hooks:
            try:
                await hook(slot, lease, how)
            except Exception:
                log.exception("lease_hook_failed", lease_id=lease.lease_id)
        self.jobs.kick(slot)

    async def reap_leases(self) -> None:
        paused = False
        while True:
            now = self.clock.monotonic()
            if self.table.read_only is not None:
                # Heartbeats are refused while the state cannot be saved: no lease expires for
                # want of them. Once it can, every lease gets a fresh TTL, as after a restart.
                paused = True
            elif paused:
                paused = False
                for slot in self.table.leases.values():
                    if slot.lease is not None:
                        slot.lease.renew(now, self.clock.wall())
                log.info("lease_expiry_resumed", leases=len(self.table.leases))
            for slot in list(self.table.leases.values()) if not paused else []:
                lease = slot.lease
                if lease is not None and lease.deadline <= now:
                    self.expire(slot, "expired")
            # A lease lives at least a second (ttl_s >= 1): a scan every quarter of one finds
            # each expiry in time, and grants and heartbeats need not wake it (each wake was
            # a scan of every lease, per allocation in a burst).
            await anyio.sleep(REAP_INTERVAL_S)
