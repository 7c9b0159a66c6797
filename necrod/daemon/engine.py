"""The pool engine: its rooms wired together, startup and recovery, and config changes.

The rooms, each given what it calls in its constructor (docs/design.md has the map):

- ``slottable`` — pools, slots, leases, and the durable writes that change them;
- ``jobs`` — the background task group, one driver per slot;
- ``gitgate`` — git limits, and the mirror made canonical before git runs;
- ``poolsize`` — cutting and retiring slots, forgetting a drained pool;
- ``mirrorkeeper`` — clone, fetch, refs and base, the mirror's objects, salvage retention;
- ``allocator`` — allocation with FIFO waiting, heartbeat, release, expiry;
- ``prepare`` — the prepare step and ``files:``: keys, the output as a layer or per slot;
- ``cleanup`` — a used slot back to clean: leftovers stopped, salvage, reset;
- ``lifecycle`` — the driver of each slot's state, and the operator's slot actions.

The in-memory state is the authority while the daemon runs; every change a reply reports is
written to the store before the reply.

Startup is recovery: the state is loaded, every lease gets one fresh ``ttl_s`` of grace, each
pool's mirror is opened (or cloned), worktrees on disk the state does not know are adopted,
and every slot is kicked — one caught mid-cleanup or mid-creation is simply driven again.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import structlog
from anyio.abc import TaskStatus

from necrod.core.clock import Clock
from necrod.core.config import Config, PoolConfig
from necrod.core.config.model import DEFAULT_PROTOCOLS
from necrod.core.slots import Slot, SlotState
from necrod.daemon.allocator import Allocator
from necrod.daemon.cleanup import Cleanup
from necrod.daemon.gitgate import GitGate
from necrod.daemon.jobs import Jobs
from necrod.daemon.lifecycle import Lifecycle
from necrod.daemon.metrics import Metrics
from necrod.daemon.mirrorkeeper import MirrorKeeper
from necrod.daemon.pool import Pool
from necrod.daemon.poolsize import PoolSizer
from necrod.daemon.prepare import Preparer
from necrod.daemon.slottable import SlotTable, slot_event
from necrod.daemon.submirrors import SubmoduleMirrors
from necrod.io import overlay
from necrod.io.gitrun import GitError, GitRunner
from necrod.io.store import Event, Put, StateStore
from necrod.proto.errors import NecrodError, Unavailable

log = structlog.get_logger("necrod.engine")


class PoolEngine:
    """See the module docstring. The rooms are public: the daemon hands each caller the ones
    it uses."""

    def __init__(
        self,
        *,
        store: StateStore,
        git: GitRunner,
        workspaces: Path,
        git_concurrency: int,
        port_range: tuple[int, int] = (20000, 29999),
        max_leases_per_uid: int = 64,
        allowed_protocols: tuple[str, ...] = DEFAULT_PROTOCOLS,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.git = git
        self.workspaces = workspaces
        self.clock = clock or Clock()
        metrics = metrics or Metrics()
        self.table = table = SlotTable(store, self.clock)
        self.jobs = jobs = Jobs(table)
        self.gate = gate = GitGate(git, git_concurrency, table, jobs, metrics)
        self.sizer = sizer = PoolSizer(table, jobs, self.clock)
        #: The host's submodule mirrors, shared by every pool (``submodules:``).
        self.submodules = SubmoduleMirrors(workspaces / ".submodules", git, allowed_protocols)
        self.keeper = keeper = MirrorKeeper(table, jobs, gate, metrics, self.clock, self.submodules)
        self.preparer = preparer = Preparer(table=table, jobs=jobs, gate=gate, clock=self.clock)
        self.allocator = allocator = Allocator(
            table=table, jobs=jobs, gate=gate, sizer=sizer, keeper=keeper, metrics=metrics, clock=self.clock,
            port_range=port_range, max_leases_per_uid=max_leases_per_uid,
        )  # fmt: skip
        self.cleanup = cleanup = Cleanup(table=table, jobs=jobs, gate=gate, sizer=sizer, allocator=allocator,
                                         keeper=keeper, preparer=preparer, metrics=metrics, clock=self.clock)  # fmt: skip
        self.lifecycle = Lifecycle(table=table, jobs=jobs, gate=gate, sizer=sizer, allocator=allocator,
                                   cleanup=cleanup, preparer=preparer, clock=self.clock)  # fmt: skip
        keeper.on_base_moved.append(lambda p: jobs.spawn(preparer.refresh, p))

    async def run(self, config: Config, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            self.jobs.start(tg, self.lifecycle.drive)
            self._load(config)
            for pool in self.table.pools.values():
                self.jobs.spawn(self._bring_up, pool, True)
            self.jobs.spawn(self.allocator.reap_leases)
            task_status.started()

    def _new_pool(self, config: PoolConfig) -> Pool:
        pool = Pool(config, self.workspaces / config.name, self.git, self.submodules)
        self.table.add_pool(pool)
        return pool

    def _load(self, config: Config) -> None:
        table = self.table
        table.load_fences()
        pool_rows = table.load("pool")
        for name, pc in config.pools.items():
            pool = self._new_pool(pc)
            if name in pool_rows:
                pool.restore_row(pool_rows[name])
        for name, row in pool_rows.items():
            if name not in table.pools:
                gone = self._new_pool(PoolConfig(name=name, repo_url=row["repo_url"]))
                gone.restore_row(row)
                gone.draining = True
        now_m, now_w = self.clock.monotonic(), self.clock.wall()
        for sid, row in table.load("slot").items():
            slot = Slot.from_row(row)
            owner = table.pools.get(slot.pool)
            if owner is None:
                log.warning("slot_without_pool", slot=sid)
                continue
            owner.slots[sid] = slot
            owner.next_number = max(owner.next_number, slot.number + 1)
            if slot.lease is not None:
                # After a restart every lease gets one fresh ttl_s of grace.
                slot.lease.renew(now_m, now_w)
                table.hold(slot)
        log.info("state_loaded", pools=len(table.pools), slots=sum(len(p.slots) for p in table.pools.values()),
                 leases=len(table.leases))  # fmt: skip

    async def _bring_up(self, pool: Pool, first: bool = False) -> None:
        """Open (or clone) the mirror, then reconcile and fill the pool; retried with backoff."""
        while not self.table.stopping:
            try:
                await self.keeper.open(pool)
                break
            except (GitError, OSError, NecrodError) as exc:
                pool.bring_up_failures += 1
                pool.state = "failed"
                pool.error = str(exc)
                delay = min(600.0, 5.0 * 2 ** min(pool.bring_up_failures - 1, 7))
                log.error("pool_failed", pool=pool.name, error=str(exc), retry_in_s=delay)
                self.allocator.fail_waiters(pool, Unavailable(f"pool {pool.name} failed to start: {exc}"))
                event = Event(
                    "pools", "pool.state", {"pool": pool.name, "state": "failed", "error": str(exc)}
                )
                await self.table.persist_quietly([event])
                await anyio.sleep(delay)
        if self.table.stopping or self.table.pools.get(pool.name) is not pool:
            return
        if pool.config.isolation == "overlay":
            problem = await anyio.to_thread.run_sync(overlay.probe, pool.root / "uppers")
            if problem is not None:
                await self._refuse(pool, f"isolation: overlay cannot be served here: {problem}")
                return
        if first:
            await self._reconcile_disk(pool)
            await self._mount_again(pool)
        # From here to maintain nothing awaits: the pool never looks ready without its slots.
        pool.state = "ready"
        pool.error = None
        pool.bring_up_failures = 0
        pool.became_ready.set()
        for slot in list(pool.slots.values()):
            self.jobs.kick(slot)
            if slot.state is SlotState.AVAILABLE:
                self.allocator.offer(pool, slot)
        self.sizer.maintain(pool)
        if pool.progress is not None and not any(s.state is SlotState.CREATING for s in pool.slots.values()):
            pool.progress = None  # no slot to make: it is up
        ready = Event(
            "pools", "pool.state", {"pool": pool.name, "state": "ready", "base_commit": pool.base_commit}
        )
        await self.table.persist_quietly([Put("pool", pool.name, pool.to_row()), ready])
        self.jobs.spawn(self.preparer.refresh, pool)

    async def _refuse(self, pool: Pool, why: str) -> None:
        """A pool that cannot be served as configured: failed, until a reload changes it."""
        pool.state = "failed"
        pool.error = why
        log.error("pool_refused", pool=pool.name, error=why)
        self.allocator.fail_waiters(pool, Unavailable(f"pool {pool.name} failed to start: {why}"))
        await self.table.persist_quietly([Event("pools", "pool.state", {"pool": pool.name, "state": "failed",
                                                                        "error": why})])  # fmt: skip

    async def _mount_again(self, pool: Pool) -> None:
        """At start, every overlay slot's mount found again, or made again on its recorded layers
        and its upper as it is (after a reboot): a held lease's work is never dropped."""
        for slot in list(pool.slots.values()):
            if slot.kind != "overlay" or slot.state is SlotState.REMOVING:
                continue
            try:
                await pool.kind_of(slot).mount_again(slot.admin, slot.path, slot.layers)
            except (OSError, GitError) as exc:
                log.error("overlay_mount_failed", slot=slot.slot_id, error=str(exc))

    async def _reconcile_disk(self, pool: Pool) -> None:
        """At start: forget worktrees whose directories vanished, adopt worktrees of ours the
        state does not know (salvaged, then cleaned), report anything else."""
        try:
            await pool.kind.prune()
        except GitError as exc:
            log.warning("worktree_prune_failed", pool=pool.name, error=str(exc))
        for entry in pool.unknown_entries():
            if pool.kind.owns(entry):
                await self.lifecycle.adopt(pool, entry, "found on disk at start")
            else:
                log.warning("unknown_directory", pool=pool.name, path=str(entry))

    # --- configuration ----------------------------------------------------------------------------

    async def apply_config(self, config: Config) -> list[str]:
        """Apply a validated config as a difference; returns what changed, in words."""
        changes: list[str] = []
        self.gate.limiter.total_tokens = config.daemon.git_concurrency
        self.allocator.port_range = config.daemon.port_range
        self.allocator.max_leases_per_uid = config.daemon.max_leases_per_uid
        for name, pc in config.pools.items():
            p = self.table.pools.get(name)
            if p is None:
                p = self._new_pool(pc)
                changes.append(f"added pool {name}")
                await self.table.persist_quietly([Event("pools", "pool.added", {"pool": name})])
                self.jobs.spawn(self._bring_up, p, True)
                continue
            if p.draining:
                p.draining = False
                changes.append(f"pool {name} is back (no longer draining)")
            if p.config != pc:
                changes.extend(self._reconfigure(p, pc))
        for name, p in list(self.table.pools.items()):
            if name not in config.pools and not p.draining:
                p.draining = True
                self.allocator.fail_waiters(p, Unavailable(f"pool {name} was removed from the config"))
                changes.append(
                    f"removed pool {name} (draining: slots go as they come back; the mirror is kept)"
                )
                drained = Event("pools", "pool.draining", {"pool": name})
                await self.table.persist_quietly([Put("pool", name, p.to_row()), drained])
                self.sizer.maintain(p)
        return changes

    def _reconfigure(self, p: Pool, new: PoolConfig) -> list[str]:
        old = p.config
        changed = [name for name in old.__dataclass_fields__ if getattr(old, name) != getattr(new, name)]
        p.config = new
        out = [f"pool {p.name}: {key} {getattr(old, key)!r} -> {getattr(new, key)!r}" for key in changed]
        if "git_concurrency" in changed:
            p.limiter.total_tokens = new.git_concurrency
        if "repo_url" in changed or "lfs" in changed or "filter" in changed:
            p.mirror.set_url(new.repo_url, new.lfs, new.filter)
        if "repo_url" in changed:
            p.default_branch = None
        if "slots" in changed:
            p.delta = 0
            if new.slots < old.slots:
                p.shrinking = True
        if "fetch_interval_s" in changed:
            p.fetch.next_at = 0.0
        if "lfs" in changed:
            for slot in p.slots.values():
                slot.rebuild = True  # its LFS files were checked out the other way (kicked after _bring_up)
        if "isolation" in changed:
            for slot in p.slots.values():
                self.jobs.kick(slot)  # idle slots are remade now, held ones after release
        if "repo_url" in changed or "base" in changed:
            self.jobs.spawn(self.keeper.refetch_base, p)
        if "sparse" in changed:
            self.jobs.spawn(self._resparse, p)
        if "isolation" in changed and new.isolation == "overlay" and p.state == "ready":
            self.jobs.spawn(self._bring_up, p)  # checks it can mount first
        elif "lfs" in changed and p.state == "ready":
            self.jobs.spawn(self._bring_up, p)  # checks git-lfs is here, fetches the base's objects
        elif {"prepare", "files", "isolation"} & set(changed):
            self.jobs.spawn(self.preparer.refresh, p)
        if "submodules" in changed:
            self.jobs.spawn(self._submodules_changed, p)
        self.sizer.maintain(p)
        return out

    async def _submodules_changed(self, p: Pool) -> None:
        """``submodules:`` changed: the mirrors made to hold what the base records, then every
        idle slot cleaned again (its submodules checked out, or emptied); held ones at release."""
        if p.state == "ready" and p.base_commit is not None:
            async with self.gate.limits(p):
                await self.keeper.sync_submodules(p, p.base_commit, fresh_s=0)
        await self._clean_idle(p, "reconfigured")

    async def _resparse(self, p: Pool) -> None:
        """The pool's sparse set changed: its idle slots are cleaned onto the new one now (held
        ones get it when released)."""
        await self._clean_idle(p, "sparse_changed")

    async def _clean_idle(self, p: Pool, reason: str) -> None:
        for slot in list(p.slots.values()):
            if slot.state is SlotState.AVAILABLE and not slot.reserved and not slot.busy:
                slot.state = SlotState.CLEANING
                await self.table.persist_or_keep(slot, [slot_event(slot, reason)])
                self.jobs.kick(slot)

    # --- shutdown ---------------------------------------------------------------------------------

    def stop(self) -> None:
        """No new leases; waiting allocations are told the daemon is going away."""
        self.table.stopping = True
        for p in self.table.pools.values():
            self.allocator.fail_waiters(p, Unavailable("the daemon is shutting down"))
