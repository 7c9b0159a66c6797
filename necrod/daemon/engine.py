"""The pool engine: startup and recovery, fetching, and applying config changes.

It is made of three parts (see each module): ``engine_base`` (shared state, durable changes,
limits), ``leases`` (allocation, heartbeat, release, expiry) and ``lifecycle`` (what happens to
a slot after its lease, and the pool's size). The in-memory state is the authority while the
daemon runs; every change a reply reports is written to the store before the reply.

Startup is recovery: the state is loaded, every lease gets one fresh ``ttl_s`` of grace, each
pool's mirror is opened (or cloned), worktrees on disk the state does not know are adopted,
and every slot is kicked — one caught mid-cleanup or mid-creation is simply driven again.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
from anyio.abc import TaskStatus

from necrod.core.config import Config, PoolConfig
from necrod.core.refs import resolve
from necrod.core.retention import to_prune
from necrod.core.slots import Slot, SlotState
from necrod.daemon.engine_base import log
from necrod.daemon.leases import LeaseOps
from necrod.daemon.lifecycle import Lifecycle
from necrod.daemon.mirror import ProgressLog
from necrod.daemon.pool import Pool
from necrod.io.gitrun import GitError
from necrod.io.store import Event, Put
from necrod.proto.errors import NecrodError, NotFound, Unavailable


class PoolEngine(LeaseOps, Lifecycle):
    """See the module docstring."""

    async def run(self, config: Config, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            self._tg = tg
            self._load(config)
            for pool in self.pools.values():
                self._spawn(self._bring_up, pool, True)
            self._spawn(self._reap_leases)
            task_status.started()

    def _new_pool(self, config: PoolConfig) -> Pool:
        pool = Pool(config, self.workspaces / config.name, self.git)
        fence = self.fences.get(config.name)
        if fence is not None:  # a pool of this name was here before: go on from its numbers
            pool.next_number = int(fence["next_number"])
        self.pools[config.name] = pool
        return pool

    def _load(self, config: Config) -> None:
        self.fences = self.store.load("fence")
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
        log.info("state_loaded", pools=len(self.pools), slots=sum(len(p.slots) for p in self.pools.values()),
                 leases=len(self.leases))  # fmt: skip

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
                event = Event(
                    "pools", "pool.state", {"pool": pool.name, "state": "failed", "error": str(exc)}
                )
                await self._persist_quietly([event])
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
        ready = Event(
            "pools", "pool.state", {"pool": pool.name, "state": "ready", "base_commit": pool.base_commit}
        )
        await self._persist_quietly([Put("pool", pool.name, pool.to_row()), ready])

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
        state does not know (salvaged, then cleaned), report anything else."""
        try:
            await pool.kind.prune()
        except GitError as exc:
            log.warning("worktree_prune_failed", pool=pool.name, error=str(exc))
        for entry in self.unknown_entries(pool):
            if pool.kind.owns(entry):
                await self.adopt(pool, entry, "found on disk at start")
            else:
                log.warning("unknown_directory", pool=pool.name, path=str(entry))

    def unknown_entries(self, pool: Pool) -> list[Any]:
        """Entries of the pool's slots directory that no slot owns."""
        known = {s.number for s in pool.slots.values()}
        try:
            entries = sorted(pool.slots_dir.iterdir())
        except FileNotFoundError:
            return []
        return [e for e in entries if not (e.name.isdigit() and int(e.name) in known)]

    # --- fetching ---------------------------------------------------------------------------------

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
                    await self._check_mirror(p)
                    # The fetch prunes tags origin does not have: agents' own, in a worktree
                    # pool, which must wait for their lease's salvage (issue 16, defect 18).
                    agents_tags = await p.mirror.local_tags(p.refs) if p.refs else {}
                    await p.mirror.fetch(timeout=p.config.clone_timeout_s)
                    if extra:
                        await p.mirror.fetch(timeout=p.config.clone_timeout_s, refspecs=extra)
                    p.refs = await p.mirror.read_refs()
                    await p.mirror.put_back_tags({n: o for n, o in agents_tags.items() if n not in p.refs})
            except (GitError, OSError) as exc:
                p.fetch.failures += 1
                p.fetch.consecutive_failures += 1
                started_failing = p.fetch.failing_since is None
                if started_failing:
                    p.fetch.failing_since = self.clock.wall()
                p.fetch.last_error = str(exc)
                if p.config.metrics:
                    self.metrics.fetch_failures.labels(p.name).inc()
                if started_failing:  # one event per outage, and one when it ends
                    await self._persist_quietly([Event("pools", "pool.fetch", {
                    "pool": p.name, "ok": False, "error": str(exc), "failing_since": p.fetch.failing_since})])  # fmt: skip
                raise
            finally:
                p.fetch.generation += 1
            recovered = p.fetch.failing_since is not None
            p.fetch.fetches += 1
            p.fetch.consecutive_failures = 0
            p.fetch.failing_since = None
            p.fetch.last_error = None
            p.fetch.last_ok_at = self.clock.wall()
            p.fetch.last_duration_s = time.perf_counter() - started
            if p.config.metrics:
                self.metrics.fetch_seconds.labels(p.name).observe(p.fetch.last_duration_s)
            if recovered:
                log.info("fetch_recovered", pool=p.name)
                await self._persist_quietly([Event("pools", "pool.fetch", {"pool": p.name, "ok": True})])
            return await self._set_base(p, resolve(p.refs, p.base_ref or ""))

    async def _set_base(self, p: Pool, commit: str | None) -> bool:
        if commit is None:
            log.error("base_missing", pool=p.name, base=p.base_ref)
            return False
        if commit == p.base_commit:
            return False
        old, p.base_commit = p.base_commit, commit
        log.info("base_moved", pool=p.name, base=p.base_ref, commit=commit, previous=old)
        moved = Event(
            "pools", "pool.base", {"pool": p.name, "base": p.base_ref, "commit": commit, "previous": old}
        )
        await self._persist_quietly([Put("pool", p.name, p.to_row()), moved])
        for slot in list(p.slots.values()):
            if slot.state is SlotState.AVAILABLE:
                self._kick(slot)
        return True

    # --- configuration ----------------------------------------------------------------------------

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
                drained = Event("pools", "pool.draining", {"pool": name})
                await self._persist_quietly([Put("pool", name, p.to_row()), drained])
                self._maintain(p)
        return changes

    def _reconfigure(self, p: Pool, new: PoolConfig) -> list[str]:
        old = p.config
        changed = [name for name in old.__dataclass_fields__ if getattr(old, name) != getattr(new, name)]
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
        if "fetch_interval_s" in changed:
            p.fetch.next_at = 0.0
        if "isolation" in changed:
            for slot in p.slots.values():
                self._kick(slot)  # idle slots are remade now, held ones after release
        if "repo_url" in changed or "base" in changed:
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

    # --- salvage retention ------------------------------------------------------------------------

    async def prune_salvage(self, pool: str | None = None, *, dry_run: bool = False) -> list[dict[str, Any]]:
        """Delete the salvage refs past each pool's retention (``salvage_keep_*``); what went
        (or, with ``dry_run``, would go)."""
        pools = [self.pool(pool)] if pool is not None else list(self.pools.values())
        pruned: list[dict[str, Any]] = []
        for p in pools:
            if p.state != "ready" or not p.mirror.exists:
                continue
            items = await p.mirror.salvage_refs()
            refs = to_prune(items, p.config.salvage_retention, self.clock.wall())
            gone = [{"pool": p.name, **i.view()} for i in items if i.ref in refs]
            if not refs or dry_run:
                pruned += gone
                continue
            async with self._limits(p):
                await self._check_mirror(p)
                await p.mirror.prune_salvage(refs, timeout=p.config.clone_timeout_s)
            pruned += gone
            log.info("salvage_pruned", pool=p.name, refs=len(refs))
            await self._persist_quietly([Event("pools", "salvage.pruned", {
                "pool": p.name, "lease_ids": [g["lease_id"] for g in gone][:100], "count": len(refs)})])  # fmt: skip
        return pruned

    # --- views and shutdown -----------------------------------------------------------------------

    def list_slots(
        self, pool: str | None = None, state: str | None = None, viewer: int | None = None
    ) -> list[dict[str, Any]]:
        """Slot views; ``viewer`` (a non-admin's uid) sees only its own lease ids."""
        pools = [self.pool(pool)] if pool is not None else list(self.pools.values())
        return [
            slot.view(viewer)
            for p in pools
            for slot in sorted(p.slots.values(), key=lambda s: s.number)
            if state is None or slot.state == state
        ]

    def stop(self) -> None:
        """No new leases; waiting allocations are told the daemon is going away."""
        self.stopping = True
        for p in self.pools.values():
            self._fail_waiters(p, Unavailable("the daemon is shutting down"))
