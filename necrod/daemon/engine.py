"""The pool engine: leases handed out in milliseconds, slots cleaned in the background.

The in-memory state is the authority while the daemon runs. Every change a reply reports is
made synchronously in memory (so two callers can never take the same slot), then written to the
store; the reply waits for the write. A failed write undoes the change in memory and the caller
gets ``unavailable``.

Slow work is driven by slot state, one driver task per slot at a time (``_kick``):
``creating`` builds the worktree, ``cleaning`` salvages and resets it, ``removing`` deletes it,
and an ``available`` slot whose commit is behind the pool's base is moved forward. Each
action persists its outcome as a state change like any other. Before git touches a slot the
slot is recorded as ``cleaning`` on disk, so a crash mid-git is cleaned again at restart.

Allocation touches no git when it can: a plain allocation picks an available slot (one already
at the requested commit first, else the least recently used) and only waits for the state
write. ``ref`` at another commit or ``branch`` costs one git checkout in that slot.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus

from necrod.core.clock import Clock
from necrod.core.config import Config, PoolConfig
from necrod.core.names import (
    check_branch,
    check_lease_id,
    check_pool_name,
    check_ref,
    looks_like_sha,
    parse_slot_id,
    slot_id,
)
from necrod.core.refs import resolve
from necrod.core.sizing import idle_to_remove, may_retire_idle, slots_to_create
from necrod.core.slots import Lease, Slot, SlotState, choose_slot, new_lease_id
from necrod.daemon.cleaner import SlotGit
from necrod.daemon.mirror import ProgressLog
from necrod.daemon.pool import Pool, Waiter
from necrod.io.gitrun import GitError, GitRunner
from necrod.io.store import Delete, Event, Put, StateStore
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

#: Wait before the second attempt at a failed cleanup.
CLEANUP_RETRY_S = 5.0
#: How often the lease reaper looks at deadlines, at most.
REAP_INTERVAL_S = 0.25
#: Default time to fetch a ref the mirror does not have yet, when the caller gave no wait_s.
REF_FETCH_DEFAULT_S = 30.0
#: Ended leases remembered, to tell "expired" from "never existed".
ENDED_MEMORY = 10_000

LeaseHook = Callable[[Slot, Lease, str], Awaitable[None]]


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class PoolEngine:
    """See the module docstring."""

    def __init__(
        self,
        *,
        store: StateStore,
        git: GitRunner,
        workspaces: Path,
        git_concurrency: int,
        clock: Clock | None = None,
    ) -> None:
        self.store = store
        self.git = git
        self.workspaces = workspaces
        self.clock = clock or Clock()
        self.pools: dict[str, Pool] = {}
        self.leases: dict[str, Slot] = {}
        self.ended: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self.git_limiter = anyio.CapacityLimiter(git_concurrency)
        self.stopping = False
        #: Awaited when a lease ends other than by release (expiry, revocation), before the
        #: slot is salvaged: the dispatcher stops the processes it started there.
        self.lease_hooks: list[LeaseHook] = []
        #: Called after each slot becomes available (the dispatcher starts queued tasks).
        self.on_slot_available: list[Callable[[str], None]] = []
        self.stats: dict[str, float] = {
            "allocations": 0,
            "releases": 0,
            "expiries": 0,
            "cleanups": 0,
            "cleanup_failures": 0,
            "salvages": 0,
            "tampers": 0,
            "creations": 0,
            "removals": 0,
            "moves": 0,
        }
        self.allocation_ms: list[float] = []
        self.cleanup_s: list[float] = []
        self._tg: TaskGroup | None = None
        self._active: set[str] = set()
        self._removed: dict[str, anyio.Event] = {}
        self._reap_wake = anyio.Event()

    # --- startup ----------------------------------------------------------------------------------

    async def run(self, config: Config, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            self._load(config)
            for pool in self.pools.values():
                tg.start_soon(self._bring_up, pool, True)
            tg.start_soon(self._reap_leases)
            task_status.started()

    def _new_pool(self, config: PoolConfig) -> Pool:
        pool = Pool(config, self.workspaces / config.name, self.git)
        self.pools[config.name] = pool
        return pool

    def _load(self, config: Config) -> None:
        pool_rows = self.store.load("pool")
        for name, pc in config.pools.items():
            pool = self._new_pool(pc)
            if name in pool_rows:
                pool.restore_row(pool_rows[name])
        for name, row in pool_rows.items():
            if name not in self.pools:
                gone = self._new_pool(PoolConfig(name=name, repo_url=row["repo_url"]))
                gone.restore_row(row)
                gone.draining = True
        now_m, now_w = self.clock.monotonic(), self.clock.wall()
        for sid, row in self.store.load("slot").items():
            slot = Slot.from_row(row)
            owner = self.pools.get(slot.pool)
            if owner is None:
                log.warning("slot_without_pool", slot=sid)
                continue
            owner.slots[sid] = slot
            owner.next_number = max(owner.next_number, slot.number + 1)
            if slot.lease is not None:
                # After a restart every lease gets one fresh ttl_s of grace.
                slot.lease.renew(now_m, now_w)
                self.leases[slot.lease.lease_id] = slot
        log.info(
            "state_loaded",
            pools=len(self.pools),
            slots=sum(len(p.slots) for p in self.pools.values()),
            leases=len(self.leases),
        )

    async def _bring_up(self, pool: Pool, first: bool = False) -> None:
        """Open (or clone) the mirror, then reconcile and fill the pool; retried with backoff."""
        while not self.stopping:
            try:
                await self._open_mirror(pool)
                break
            except (GitError, OSError, NecrodError) as exc:
                pool.bring_up_failures += 1
                pool.state = "failed"
                pool.error = str(exc)
                delay = min(600.0, 5.0 * 2 ** min(pool.bring_up_failures - 1, 7))
                log.error("pool_failed", pool=pool.name, error=str(exc), retry_in_s=delay)
                self._fail_waiters(pool, Unavailable(f"pool {pool.name} failed to start: {exc}"))
                await self._persist_quietly(
                    [Event("pools", "pool.state", {"pool": pool.name, "state": "failed", "error": str(exc)})]
                )
                await anyio.sleep(delay)
        if self.stopping or self.pools.get(pool.name) is not pool:
            return
        if first:
            await self._reconcile_disk(pool)
        # From here to _maintain nothing awaits: the pool never looks ready without its slots.
        pool.state = "ready"
        pool.error = None
        pool.bring_up_failures = 0
        pool.became_ready.set()
        for slot in list(pool.slots.values()):
            self._kick(slot)
            if slot.state is SlotState.AVAILABLE:
                self._offer(pool, slot)
        self._maintain(pool)
        await self._persist_quietly(
            [
                Put("pool", pool.name, pool.to_row()),
                Event(
                    "pools",
                    "pool.state",
                    {"pool": pool.name, "state": "ready", "base_commit": pool.base_commit},
                ),
            ]
        )

    async def _open_mirror(self, pool: Pool) -> None:
        pool.root.mkdir(parents=True, exist_ok=True)
        if not pool.mirror.exists:
            pool.state = "cloning"
            log.info("mirror_clone", pool=pool.name, repo_url=pool.config.repo_url)
            started = time.perf_counter()
            async with self._limits(pool):
                await pool.mirror.create(
                    timeout=pool.config.clone_timeout_s, on_progress=ProgressLog(pool.name)
                )
            pool.fetch.last_ok_at = self.clock.wall()
            pool.fetch.fetches += 1
            log.info("mirror_cloned", pool=pool.name, s=round(time.perf_counter() - started, 2))
            pool.default_branch = None
        else:
            changed = pool.mirror.restore_canonical()
            if changed:
                self._report_tamper(pool, changed)
        if pool.config.base is None and pool.default_branch is None:
            pool.default_branch = await pool.mirror.remote_head(timeout=60)
            if pool.default_branch is None:
                raise Unavailable(
                    f"cannot tell the default branch of {pool.config.repo_url}; set base: for pool {pool.name}"
                )
        pool.refs = await pool.mirror.read_refs()
        base = resolve(pool.refs, pool.base_ref or "")
        if base is None:
            raise NotFound(f"base {pool.base_ref!r} is not a branch or tag of {pool.config.repo_url}")
        pool.base_commit = base

    async def _reconcile_disk(self, pool: Pool) -> None:
        """At start: forget worktrees whose directories vanished, adopt worktrees of ours the
        state does not know (they are salvaged and cleaned), report anything else."""
        try:
            await pool.mirror.prune_worktrees()
        except GitError as exc:
            log.warning("worktree_prune_failed", pool=pool.name, error=str(exc))
        known = {s.number for s in pool.slots.values()}
        try:
            entries = sorted(pool.slots_dir.iterdir())
        except FileNotFoundError:
            entries = []
        for entry in entries:
            if entry.name.isdigit() and int(entry.name) in known:
                continue
            dotgit = entry / ".git"
            admin = pool.mirror.path / "worktrees" / entry.name
            try:
                ours = (
                    entry.name.isdigit()
                    and dotgit.read_text().strip() == f"gitdir: {admin}"
                    and admin.is_dir()
                )
            except OSError:
                ours = False
            if not ours:
                log.warning("unknown_directory", pool=pool.name, path=str(entry))
                continue
            number = int(entry.name)
            now = self.clock.wall()
            slot = Slot(
                slot_id=slot_id(pool.name, number),
                pool=pool.name,
                number=number,
                path=str(entry),
                admin=entry.name,
                state=SlotState.CLEANING,
                created_at=now,
                salvage_as=f"adopted-{pool.name}-{number}-{int(now)}",
                salvage_note="adopted at start",
            )
            pool.slots[slot.slot_id] = slot
            pool.next_number = max(pool.next_number, number + 1)
            log.warning("worktree_adopted", pool=pool.name, slot=slot.slot_id)
            await self._persist_quietly(
                [
                    Put("slot", slot.slot_id, slot.to_row()),
                    Put("pool", pool.name, pool.to_row()),
                    self._slot_event(slot, "adopted"),
                ]
            )

    # --- persistence helpers ----------------------------------------------------------------------

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
                current = slot.lease.lease_id if slot.lease else None
                if slot.restore(snap, version):
                    self._reindex(slot, current)
            if on_undo is not None:
                on_undo()

        await self.store.write(ops, undo)

    async def _persist_quietly(self, ops: list[Put | Delete | Event]) -> bool:
        try:
            await self.store.write(ops)
        except Unavailable as exc:
            log.error("persist_failed", error=exc.message)
            return False
        return True

    def _reindex(self, slot: Slot, old_lease_id: str | None) -> None:
        if (
            old_lease_id
            and self.leases.get(old_lease_id) is slot
            and (slot.lease is None or slot.lease.lease_id != old_lease_id)
        ):
            del self.leases[old_lease_id]
        if slot.lease is not None:
            self.leases[slot.lease.lease_id] = slot

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
        return Event(
            "leases",
            f"lease.{kind}",
            {
                "lease_id": lease.lease_id,
                "slot_id": slot.slot_id,
                "pool": slot.pool,
                "holder": lease.holder,
                "fencing_token": slot.fencing_token,
                "task_id": lease.task_id,
                **extra,
            },
        )

    def _forget_ended(self, lease_id: str) -> None:
        self.ended.pop(lease_id, None)

    def _ended(self, lease_id: str, how: str) -> None:
        self.ended[lease_id] = (how, self.clock.wall())
        while len(self.ended) > ENDED_MEMORY:
            self.ended.popitem(last=False)

    # --- lookups ----------------------------------------------------------------------------------

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
        check_lease_id(lease_id)
        slot = self.leases.get(lease_id)
        if (
            slot is None
            or slot.lease is None
            or slot.lease.lease_id != lease_id
            or slot.lease.deadline == math.inf
        ):
            ended = self.ended.get(lease_id)
            if ended is not None:
                how, at = ended
                if how == "released":
                    raise NotFound(
                        f"lease {lease_id} was released at {_iso(at)}", lease_id=lease_id, reason=how
                    )
                raise FailedPrecondition(
                    f"lease {lease_id} {how} at {_iso(at)}; its slot was reclaimed",
                    lease_id=lease_id,
                    reason=how,
                )
            raise NotFound(f"no lease {lease_id!r} (it may have ended before a restart)", lease_id=lease_id)
        return slot

    # --- leases -----------------------------------------------------------------------------------

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
    ) -> dict[str, Any]:
        started = time.perf_counter()
        p = self.pool(pool)
        if ref is not None:
            check_ref(ref)
        if branch is not None:
            check_branch(branch)
        self._check_serving(p)
        wait = wait_s or 0.0
        deadline = self.clock.monotonic() + wait
        if p.state != "ready":
            if not wait:
                raise Unavailable(self._not_ready_message(p), pool=p.name, state=p.state)
            with anyio.move_on_after(wait):
                await p.became_ready.wait()
            self._check_serving(p)
            if p.state != "ready":
                raise Unavailable(self._not_ready_message(p), pool=p.name, state=p.state)
        target = await self._resolve_ref(p, ref, deadline) if ref is not None else None
        if branch is not None:
            self._check_branch_free(p, branch)
        slot = None if p.waiters else choose_slot(p.slots.values(), target or p.base_commit)
        if slot is None:
            if not wait:
                c = p.by_state()
                raise ResourceExhausted(
                    f"no free slot in pool {p.name} ({c['allocated']} allocated, {c['cleaning']} cleaning, "
                    f"{c['creating']} creating); pass wait_s to queue",
                    pool=p.name,
                )
            slot = await self._wait_for_slot(p, max(0.0, deadline - self.clock.monotonic()), wait)
        result = await self._grant(
            p,
            slot,
            holder=holder,
            ttl_s=ttl_s or p.config.lease_ttl_s,
            target=target,
            branch=branch,
            metadata=metadata or {},
            task_id=task_id,
        )
        self.allocation_ms.append((time.perf_counter() - started) * 1000)
        if len(self.allocation_ms) > 10_000:
            del self.allocation_ms[:5_000]
        return result

    def _not_ready_message(self, p: Pool) -> str:
        if p.state == "failed":
            return f"pool {p.name} failed to start: {p.error} (retrying)"
        if p.state == "cloning":
            return f"pool {p.name} is still cloning its mirror; pass wait_s to wait"
        return f"pool {p.name} is starting; pass wait_s to wait"

    def _check_serving(self, p: Pool) -> None:
        if self.stopping:
            raise Unavailable("the daemon is shutting down")
        if p.draining:
            raise Unavailable(f"pool {p.name} is being removed (draining)", pool=p.name)

    def _check_branch_free(self, p: Pool, branch: str) -> None:
        for other in p.slots.values():
            if other.branch == branch and other.state in (SlotState.ALLOCATED, SlotState.CLEANING):
                raise AlreadyExists(
                    f"branch {branch!r} is checked out in slot {other.slot_id}", branch=branch
                )

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
            await self.fetch_pool(p, extra=[ref] if looks_like_sha(ref) else None)
        if scope.cancelled_caught:
            raise DeadlineExceeded(f"fetching {ref!r} for pool {p.name} took longer than {budget:g}s")
        commit = resolve(p.refs, ref)
        if commit is None and looks_like_sha(ref):
            commit = await p.mirror.has_commit(ref)
        if commit is None:
            raise NotFound(f"ref {ref!r} is not in {p.config.repo_url} (fetched just now)", ref=ref)
        return commit

    async def _wait_for_slot(self, p: Pool, timeout: float, wait_s: float) -> Slot:
        waiter = Waiter()
        p.waiters.append(waiter)
        self._maintain(p)
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
            self._offer(p, slot)

    def _offer(self, p: Pool, slot: Slot) -> None:
        """A slot became available: hand it to the first waiting allocation, if any."""
        if slot.state is not SlotState.AVAILABLE or slot.reserved or slot.busy:
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

    def _fail_waiters(self, p: Pool, error: NecrodError) -> None:
        while p.waiters:
            waiter = p.waiters.popleft()
            if not waiter.event.is_set():
                waiter.error = error
                waiter.event.set()

    async def _grant(
        self,
        p: Pool,
        slot: Slot,
        *,
        holder: str | None,
        ttl_s: float,
        target: str | None,
        branch: str | None,
        metadata: dict[str, Any],
        task_id: str | None,
    ) -> dict[str, Any]:
        # Everything up to the first await is atomic: the slot is ours from here on.
        now_m, now_w = self.clock.monotonic(), self.clock.wall()
        snap = slot.snapshot()
        slot.reserved = False
        slot.fencing_token += 1
        lease = Lease(
            lease_id=new_lease_id(),
            holder=holder,
            metadata=metadata,
            ttl_s=ttl_s,
            granted_at=now_w,
            expires_at=now_w + ttl_s,
            fencing_token=slot.fencing_token,
            start_commit=slot.commit,
            task_id=task_id,
            deadline=now_m + ttl_s,
        )
        slot.state = SlotState.ALLOCATED
        slot.lease = lease
        slot.allocations += 1
        self.leases[lease.lease_id] = slot
        needs_git = (target is not None and target != slot.commit) or branch is not None
        if not needs_git:
            await self._commit(
                [(slot, snap)], [self._lease_event("granted", slot, lease, commit=slot.commit)]
            )
            self.stats["allocations"] += 1
            self._reap_wake.set()
            return self._lease_view(slot)

        # Slow path: record the slot as dirty before git touches it, and keep the lease from
        # expiring while its checkout runs (nobody knows its id yet).
        lease.deadline = math.inf
        dirty = slot.to_row()
        dirty.update(state=str(SlotState.CLEANING), lease=None)
        slot.version += 1
        await self.store.write(
            [Put("slot", slot.slot_id, dirty)], undo=self._undo_to(slot, snap, slot.version)
        )
        slot.busy = True
        try:
            self._check_mirror(p)
            await self._slot_git(p, slot).checkout(target or slot.commit or "", branch)
        except BaseException as exc:
            slot.busy = False
            with anyio.CancelScope(shield=True):
                await self._abandon_grant(p, slot, lease)
            if isinstance(exc, GitError | OSError):
                raise Unavailable(
                    f"could not check out {target or branch} in slot {slot.slot_id}: {exc}"
                ) from None
            raise
        slot.busy = False
        snap = slot.snapshot()
        slot.commit = target or slot.commit
        slot.branch = branch
        lease.branch = branch
        lease.start_commit = slot.commit
        lease.renew(self.clock.monotonic(), self.clock.wall())
        try:
            await self._commit(
                [(slot, snap)], [self._lease_event("granted", slot, lease, commit=slot.commit, branch=branch)]
            )
        except Unavailable:
            await self._abandon_grant(p, slot, lease)
            raise
        self.stats["allocations"] += 1
        self._reap_wake.set()
        return self._lease_view(slot)

    def _undo_to(self, slot: Slot, snap: Slot, version: int) -> Callable[[], None]:
        def undo() -> None:
            current = slot.lease.lease_id if slot.lease else None
            if slot.restore(snap, version):
                self._reindex(slot, current)

        return undo

    async def _abandon_grant(self, p: Pool, slot: Slot, lease: Lease) -> None:
        """A lease whose grant could not complete: nobody holds it; clean the slot."""
        if slot.lease is not lease:
            return
        slot.lease = None
        slot.state = SlotState.CLEANING
        slot.salvage_as = None
        self.leases.pop(lease.lease_id, None)
        await self._persist_or_keep(slot, [self._slot_event(slot, "grant_abandoned")])
        self._kick(slot)

    async def _persist_or_keep(self, slot: Slot, events: list[Event]) -> None:
        """Persist a background change; if the store fails, keep it in memory (it is only ever
        a move towards cleaning, which is safe to redo)."""
        slot.version += 1
        ok = await self._persist_quietly([Put("slot", slot.slot_id, slot.to_row()), *events])
        if not ok:
            log.warning("state_not_saved", slot=slot.slot_id, state=str(slot.state))

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
        }

    async def heartbeat(self, lease_id: str, ttl_s: float | None = None) -> dict[str, Any]:
        slot = self.slot_for_lease(lease_id)
        lease = slot.lease
        assert lease is not None
        now_m = self.clock.monotonic()
        if lease.deadline <= now_m:
            self._start_expiry(slot, "expired")
            raise FailedPrecondition(
                f"lease {lease_id} expired at {_iso(lease.expires_at)}; its slot is being reclaimed",
                lease_id=lease_id,
                reason="expired",
            )
        snap = slot.snapshot()
        lease.renew(now_m, self.clock.wall(), ttl_s)
        await self._commit([(slot, snap)])
        self._reap_wake.set()
        return {
            "lease_id": lease_id,
            "slot_id": slot.slot_id,
            "expires_at": lease.expires_at,
            "ttl_s": lease.ttl_s,
            "fencing_token": lease.fencing_token,
        }

    async def release(self, lease_id: str, salvage: bool | None = None) -> dict[str, Any]:
        slot = self.slot_for_lease(lease_id)
        p = self.pools[slot.pool]
        lease = slot.lease
        assert lease is not None
        keep = p.config.salvage if salvage is None else salvage
        snap = slot.snapshot()
        self._to_cleaning(slot, lease, salvage=keep)
        self._ended(lease_id, "released")
        await self._commit(
            [(slot, snap)],
            [self._lease_event("released", slot, lease, salvage=keep), self._slot_event(slot, "released")],
            on_undo=lambda: self._forget_ended(lease_id),
        )
        self.stats["releases"] += 1
        self._kick(slot)
        return {"slot_id": slot.slot_id, "state": str(slot.state), "salvage": keep}

    def _to_cleaning(self, slot: Slot, lease: Lease, *, salvage: bool) -> None:
        slot.state = SlotState.CLEANING
        slot.lease = None
        slot.salvage_as = lease.lease_id if salvage else None
        slot.salvage_commit = lease.start_commit
        slot.salvage_note = f"holder {lease.holder}" if lease.holder else None
        slot.last_released_at = self.clock.wall()
        self.leases.pop(lease.lease_id, None)

    def _start_expiry(self, slot: Slot, how: str) -> None:
        if slot.lease is None or slot.state is not SlotState.ALLOCATED or self._tg is None:
            return
        lease = slot.lease
        p = self.pools[slot.pool]
        slot.fencing_token += 1
        self._to_cleaning(slot, lease, salvage=p.config.salvage)
        self._ended(lease.lease_id, how)
        self.stats["expiries"] += 1
        log.warning("lease_" + how, lease_id=lease.lease_id, slot=slot.slot_id, holder=lease.holder)
        self._spawn(self._finish_expiry, slot, lease, how)

    async def _finish_expiry(self, slot: Slot, lease: Lease, how: str) -> None:
        await self._persist_or_keep(slot, [self._lease_event(how, slot, lease), self._slot_event(slot, how)])
        for hook in self.lease_hooks:
            try:
                await hook(slot, lease, how)
            except Exception:
                log.exception("lease_hook_failed", lease_id=lease.lease_id)
        self._kick(slot)

    async def _reap_leases(self) -> None:
        while True:
            now = self.clock.monotonic()
            for slot in list(self.leases.values()):
                lease = slot.lease
                if lease is not None and lease.deadline <= now:
                    self._start_expiry(slot, "expired")
            self._reap_wake = anyio.Event()
            with anyio.move_on_after(REAP_INTERVAL_S):
                await self._reap_wake.wait()

    # --- slot lifecycle -----------------------------------------------------------------------------

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

    async def _drive(self, slot: Slot) -> None:
        try:
            while not self.stopping:
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

    def _next_action(self, p: Pool, slot: Slot) -> Callable[[Pool, Slot], Awaitable[None]] | None:
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
                if self._slot_git(p, slot).healthy() is not None:
                    return self._mark_broken
                if p.base_commit and slot.commit != p.base_commit:
                    return self._move
        return None

    @asynccontextmanager
    async def _limits(self, p: Pool) -> AsyncIterator[None]:
        # Pool first: a task never holds a global token while it queues for its pool's.
        async with p.limiter, self.git_limiter:
            yield

    def _slot_git(self, p: Pool, slot: Slot) -> SlotGit:
        return SlotGit(self.git, p.mirror.path, slot.admin, slot.path, p.config.cleanup_timeout_s)

    def _check_mirror(self, p: Pool, slot: Slot | None = None) -> None:
        changed = p.mirror.restore_canonical()
        if slot is not None:
            changed += p.mirror.restore_admin(slot.admin, slot.path)
        if changed:
            self._report_tamper(p, changed)

    def _report_tamper(self, p: Pool, changed: list[str]) -> None:
        holders = [
            {"lease_id": s.lease.lease_id, "slot_id": s.slot_id, "holder": s.lease.holder}
            for s in p.slots.values()
            if s.lease is not None
        ]
        self.stats["tampers"] += 1
        log.warning("tamper", pool=p.name, changed=changed, leases=holders)
        event = Event("pools", "tamper", {"pool": p.name, "changed": changed, "leases": holders})
        if self._tg is not None:
            self._spawn(self._persist_quietly, [event])

    async def _build(self, p: Pool, slot: Slot) -> None:
        base = p.base_commit
        assert base is not None
        try:
            async with self._limits(p):
                slot.busy = True
                try:
                    self._check_mirror(p)
                    await p.mirror.add_worktree(
                        Path(slot.path), slot.admin, base, timeout=p.config.cleanup_timeout_s
                    )
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
        if await self._commit_or_log(slot, snap, [self._slot_event(slot, "created")]):
            self.stats["creations"] += 1
            self._offer(p, slot)
            self._maintain(p)

    async def _commit_or_log(self, slot: Slot, snap: Slot, events: list[Event]) -> bool:
        try:
            await self._commit([(slot, snap)], events)
        except Unavailable as exc:
            log.error("persist_failed", slot=slot.slot_id, error=exc.message)
            await anyio.sleep(CLEANUP_RETRY_S)
            return False
        return True

    def _retiring(self, p: Pool, slot: Slot) -> bool:
        if p.draining or slot.retire:
            return True
        if p.shrinking:
            counts = p.counts()
            return (
                idle_to_remove(
                    counts,
                    baseline=p.baseline,
                    min_idle=p.config.min_idle,
                    max_slots=p.config.max_slots,
                    shrinking=True,
                )
                > 0
                or counts.total > p.baseline
            )
        return p.counts().total > max(p.baseline, p.config.max_slots)

    async def _clean(self, p: Pool, slot: Slot) -> None:
        if slot.cleanup_failures:
            await anyio.sleep(CLEANUP_RETRY_S)
        base = p.base_commit
        assert base is not None
        retiring = self._retiring(p, slot)
        sg = self._slot_git(p, slot)
        salvaged = None
        started = time.perf_counter()
        try:
            async with self._limits(p):
                slot.busy = True
                try:
                    self._check_mirror(p, slot)
                    problem = sg.healthy()
                    if problem is not None:
                        if slot.salvage_as:
                            log.warning("salvage_impossible", slot=slot.slot_id, reason=problem)
                        if not retiring:
                            await p.mirror.add_worktree(
                                Path(slot.path), slot.admin, base, timeout=p.config.cleanup_timeout_s
                            )
                    else:
                        locks = sg.clear_stale_locks()
                        if locks:
                            log.warning("stale_locks_removed", slot=slot.slot_id, locks=locks)
                        if slot.salvage_as:
                            note = f" ({slot.salvage_note})" if slot.salvage_note else ""
                            salvaged = await sg.salvage(
                                slot.salvage_as,
                                slot.salvage_commit,
                                f"necrod salvage of lease {slot.salvage_as} in slot {slot.slot_id}{note}",
                            )
                        branch = slot.branch or _head_branch(sg.admin_dir)
                        if not retiring:
                            await sg.reset(base, p.config.clean_flags)
                        if branch:
                            await sg.delete_branch(branch)
                finally:
                    slot.busy = False
        except (GitError, OSError) as exc:
            await self._cleanup_failed(p, slot, exc)
            return
        events = []
        if salvaged is not None:
            self.stats["salvages"] += 1
            events.append(
                Event(
                    "slots",
                    "salvage.saved",
                    {
                        "slot_id": slot.slot_id,
                        "pool": p.name,
                        "lease_id": slot.salvage_as,
                        "ref": salvaged.ref,
                        "commit": salvaged.commit,
                        "dirty": salvaged.dirty,
                        "partial": salvaged.partial,
                    },
                )
            )
        snap = slot.snapshot()
        slot.salvage_as = slot.salvage_commit = slot.salvage_note = None
        slot.branch = None
        slot.cleanup_failures = 0
        slot.error = None
        if retiring:
            slot.state = SlotState.REMOVING
        else:
            slot.state = SlotState.AVAILABLE
            slot.commit = base
        events.append(self._slot_event(slot, "cleaned"))
        if await self._commit_or_log(slot, snap, events):
            self.stats["cleanups"] += 1
            self.cleanup_s.append(time.perf_counter() - started)
            if len(self.cleanup_s) > 10_000:
                del self.cleanup_s[:5_000]
            if slot.state is SlotState.AVAILABLE:
                self._offer(p, slot)
            self._maintain(p)

    async def _cleanup_failed(self, p: Pool, slot: Slot, exc: Exception) -> None:
        self.stats["cleanup_failures"] += 1
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
        if slot.state is SlotState.ERROR:
            self._maintain(p)

    async def _mark_broken(self, p: Pool, slot: Slot) -> None:
        slot.state = SlotState.CLEANING
        log.warning("slot_broken", slot=slot.slot_id, reason=self._slot_git(p, slot).healthy())
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
                self._check_mirror(p, slot)
                await self._slot_git(p, slot).run(["checkout", "--quiet", "--force", "--detach", base])
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
            self.stats["moves"] += 1
            self._offer(p, slot)
        else:
            # The worktree moved but the state could not say so: never hand it out as it is.
            slot.state = SlotState.CLEANING

    async def _remove(self, p: Pool, slot: Slot) -> None:
        async with self._limits(p):
            slot.busy = True
            try:
                await p.mirror.remove_worktree(
                    Path(slot.path), slot.admin, timeout=p.config.cleanup_timeout_s
                )
            except (GitError, OSError) as exc:
                log.error("slot_remove_failed", slot=slot.slot_id, error=str(exc))
            finally:
                slot.busy = False
        if not await self._persist_quietly(
            [
                Delete("slot", slot.slot_id),
                Event("slots", "slot.removed", {"slot_id": slot.slot_id, "pool": p.name}),
            ]
        ):
            await anyio.sleep(CLEANUP_RETRY_S)
            return
        p.slots.pop(slot.slot_id, None)
        self.stats["removals"] += 1
        done = self._removed.pop(slot.slot_id, None)
        if done is not None:
            done.set()
        if p.draining:
            await self._maybe_forget(p)
        else:
            self._maintain(p)

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
        wanted = slots_to_create(
            counts,
            baseline=p.baseline,
            min_idle=cfg.min_idle,
            max_slots=cfg.max_slots,
            waiting=len(p.waiters),
        )
        now = self.clock.monotonic()
        if wanted and now < p.create_not_before:
            if not p.maintain_scheduled:
                p.maintain_scheduled = True
                self._spawn(self._maintain_later, p, p.create_not_before - now)
        else:
            for _ in range(wanted):
                self._spawn(self._persist_new, p, self._new_slot(p))
        excess = idle_to_remove(
            counts, baseline=p.baseline, min_idle=cfg.min_idle, max_slots=cfg.max_slots, shrinking=p.shrinking
        )
        if excess:
            idle = sorted(
                (
                    s
                    for s in p.slots.values()
                    if s.state is SlotState.AVAILABLE and not s.reserved and not s.busy and not s.retire
                ),
                key=lambda s: -s.number,
            )
            for slot in idle[:excess]:
                slot.retire = True
                self._kick(slot)
        if p.shrinking and p.counts().total <= p.baseline:
            p.shrinking = False

    async def _maintain_later(self, p: Pool, delay: float) -> None:
        await anyio.sleep(delay)
        p.maintain_scheduled = False
        self._maintain(p)

    def retire_idle(self, p: Pool, idle_for_s: float) -> int:
        """Remove slots above the baseline idle longer than ``idle_for_s`` (the supervisor calls this)."""
        now = self.clock.wall()
        removed = 0
        for slot in sorted(p.slots.values(), key=lambda s: -s.number):
            counts = p.counts()
            if not may_retire_idle(counts, baseline=p.baseline, min_idle=p.config.min_idle):
                break
            idle_since = slot.last_released_at or slot.created_at
            if (
                slot.state is SlotState.AVAILABLE
                and not slot.reserved
                and not slot.busy
                and not slot.retire
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
            slot_id=slot_id(p.name, number),
            pool=p.name,
            number=number,
            path=str(p.slots_dir / str(number)),
            admin=str(number),
            state=SlotState.CREATING,
            created_at=self.clock.wall(),
        )
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
                [
                    Put("slot", slot.slot_id, slot.to_row()),
                    Put("pool", p.name, p.to_row()),
                    self._slot_event(slot, "creating"),
                ],
                undo,
            )
        except Unavailable:
            return
        self._kick(slot)

    async def _maybe_forget(self, p: Pool) -> None:
        if not p.draining or p.slots or self.pools.get(p.name) is not p:
            return
        if await self._persist_quietly(
            [Delete("pool", p.name), Event("pools", "pool.removed", {"pool": p.name})]
        ):
            self.pools.pop(p.name, None)
            log.info("pool_removed", pool=p.name, mirror_kept=str(p.mirror.path))

    # --- operator actions ---------------------------------------------------------------------------

    async def add_slot(self, pool: str, wait_s: float | None = None) -> dict[str, Any]:
        p = self.pool(pool)
        self._check_serving(p)
        if p.state != "ready":
            raise Unavailable(self._not_ready_message(p), pool=p.name)
        if p.counts().total >= p.config.max_slots:
            raise ResourceExhausted(
                f"pool {p.name} is at max_slots ({p.config.max_slots}); raise it in pools.yaml", pool=p.name
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
                    f"slot {sid} is allocated (lease {slot.lease.lease_id}, holder "
                    f"{slot.lease.holder}); pass force to revoke the lease (its work is salvaged)"
                )
            slot.retire = True
            self._start_expiry(slot, "revoked")
        elif slot.state is SlotState.REMOVING:
            pass
        else:
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

    # --- fetching ---------------------------------------------------------------------------------------

    async def fetch_pool(self, p: Pool, *, extra: list[str] | None = None) -> bool:
        """Fetch the pool's mirror once (callers arriving during a fetch share it); then read its
        refs and move the base. Returns whether the base commit changed."""
        generation = p.fetch.generation
        async with p.fetch_lock:
            if p.fetch.generation != generation and not extra:
                return False  # somebody fetched while we queued
            started = time.perf_counter()
            p.fetch.last_attempt_at = self.clock.wall()
            try:
                async with self._limits(p):
                    self._check_mirror(p)
                    await p.mirror.fetch(timeout=p.config.clone_timeout_s)
                    if extra:
                        await p.mirror.fetch(timeout=p.config.clone_timeout_s, refspecs=extra)
                    p.refs = await p.mirror.read_refs()
            except (GitError, OSError) as exc:
                p.fetch.failures += 1
                p.fetch.consecutive_failures += 1
                if p.fetch.failing_since is None:
                    p.fetch.failing_since = self.clock.wall()
                p.fetch.last_error = str(exc)
                await self._persist_quietly(
                    [
                        Event(
                            "pools",
                            "pool.fetch",
                            {
                                "pool": p.name,
                                "ok": False,
                                "error": str(exc),
                                "failing_since": p.fetch.failing_since,
                            },
                        )
                    ]
                )
                raise
            finally:
                p.fetch.generation += 1
            p.fetch.fetches += 1
            p.fetch.consecutive_failures = 0
            p.fetch.failing_since = None
            p.fetch.last_error = None
            p.fetch.last_ok_at = self.clock.wall()
            p.fetch.last_duration_s = time.perf_counter() - started
            return await self._set_base(p, resolve(p.refs, p.base_ref or ""))

    async def _set_base(self, p: Pool, commit: str | None) -> bool:
        if commit is None:
            log.error("base_missing", pool=p.name, base=p.base_ref)
            return False
        if commit == p.base_commit:
            return False
        old, p.base_commit = p.base_commit, commit
        log.info("base_moved", pool=p.name, base=p.base_ref, commit=commit, previous=old)
        await self._persist_quietly(
            [
                Put("pool", p.name, p.to_row()),
                Event(
                    "pools",
                    "pool.base",
                    {"pool": p.name, "base": p.base_ref, "commit": commit, "previous": old},
                ),
            ]
        )
        for slot in list(p.slots.values()):
            if slot.state is SlotState.AVAILABLE:
                self._kick(slot)
        return True

    # --- configuration ----------------------------------------------------------------------------------

    async def apply_config(self, config: Config) -> list[str]:
        """Apply a validated config as a difference; returns what changed, in words."""
        changes: list[str] = []
        self.git_limiter.total_tokens = config.daemon.git_concurrency
        for name, pc in config.pools.items():
            p = self.pools.get(name)
            if p is None:
                p = self._new_pool(pc)
                changes.append(f"added pool {name}")
                await self._persist_quietly([Event("pools", "pool.added", {"pool": name})])
                assert self._tg is not None
                self._spawn(self._bring_up, p, True)
                continue
            if p.draining:
                p.draining = False
                changes.append(f"pool {name} is back (no longer draining)")
            if p.config != pc:
                changes.extend(self._reconfigure(p, pc))
        for name, p in list(self.pools.items()):
            if name not in config.pools and not p.draining:
                p.draining = True
                self._fail_waiters(p, Unavailable(f"pool {name} was removed from the config"))
                changes.append(
                    f"removed pool {name} (draining: slots go as they come back; the mirror is kept)"
                )
                await self._persist_quietly(
                    [Put("pool", name, p.to_row()), Event("pools", "pool.draining", {"pool": name})]
                )
                self._maintain(p)
        return changes

    def _reconfigure(self, p: Pool, new: PoolConfig) -> list[str]:
        old = p.config
        changed = [
            f.name for f in old.__dataclass_fields__.values() if getattr(old, f.name) != getattr(new, f.name)
        ]
        p.config = new
        out = [f"pool {p.name}: {key} {getattr(old, key)!r} -> {getattr(new, key)!r}" for key in changed]
        if "git_concurrency" in changed:
            p.limiter.total_tokens = new.git_concurrency
        if "repo_url" in changed:
            p.mirror.set_url(new.repo_url)
            p.default_branch = None
        if "slots" in changed:
            p.delta = 0
            if new.slots < old.slots:
                p.shrinking = True
        if ("repo_url" in changed or "base" in changed) and self._tg is not None:
            self._spawn(self._refetch_base, p)
        self._maintain(p)
        return out

    async def _refetch_base(self, p: Pool) -> None:
        try:
            if p.config.base is None and p.default_branch is None:
                p.default_branch = await p.mirror.remote_head(timeout=60)
            await self.fetch_pool(p)
        except (GitError, OSError) as exc:
            log.error("refetch_failed", pool=p.name, error=str(exc))

    # --- views and shutdown ------------------------------------------------------------------------------

    def list_slots(self, pool: str | None = None, state: str | None = None) -> list[dict[str, Any]]:
        pools = [self.pool(pool)] if pool is not None else list(self.pools.values())
        return [
            slot.view()
            for p in pools
            for slot in sorted(p.slots.values(), key=lambda s: s.number)
            if state is None or slot.state == state
        ]

    def stop(self) -> None:
        """No new leases; waiting allocations are told the daemon is going away."""
        self.stopping = True
        for p in self.pools.values():
            self._fail_waiters(p, Unavailable("the daemon is shutting down"))


def _head_branch(admin_dir: Path) -> str | None:
    """The branch a worktree's HEAD is on, read from its HEAD file (None when detached)."""
    try:
        head = (admin_dir / "HEAD").read_text().strip()
    except OSError:
        return None
    prefix = "ref: refs/heads/"
    return head[len(prefix) :] if head.startswith(prefix) else None
