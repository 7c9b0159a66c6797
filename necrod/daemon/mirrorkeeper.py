"""Each pool's mirror, kept: cloned on first use, fetched once per pool (never per slot), its
refs read and the base moved, its objects checked and fetched again when some are missing, and
salvage past the pool's retention pruned, and salvage turned into branches.

A moved base kicks the pool's idle slots (``lifecycle`` moves them). Every git here goes through
the gate (limits, and the mirror made canonical first). It calls the slot table, the background
jobs and the gate.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable
from typing import Any

import structlog

from necrod.core.clock import Clock
from necrod.core.refs import resolve
from necrod.core.retention import to_prune
from necrod.core.slots import SlotState
from necrod.daemon import lfs
from necrod.daemon.gitgate import GitGate
from necrod.daemon.jobs import Jobs
from necrod.daemon.metrics import Metrics
from necrod.daemon.partial import backfill
from necrod.daemon.pickup import drop_branch, make_branch, push_branch
from necrod.daemon.pool import Pool
from necrod.daemon.poolprogress import PoolProgress
from necrod.daemon.resume import SalvagePoint
from necrod.daemon.slottable import SlotTable
from necrod.daemon.submirrors import SubmoduleMirrors
from necrod.io.gitrun import GitError
from necrod.io.store import Event, Put
from necrod.proto.errors import NotFound, Unavailable

log = structlog.get_logger("necrod.engine")


class MirrorKeeper:
    def __init__(self, table: SlotTable, jobs: Jobs, gate: GitGate, metrics: Metrics, clock: Clock,
                 submodules: SubmoduleMirrors | None = None) -> None:  # fmt: skip
        self.table = table
        self.submodules = submodules
        self.jobs = jobs
        self.gate = gate
        self.metrics = metrics
        self.clock = clock
        #: Called with the pool after its base moved (and its idle slots were kicked).
        self.on_base_moved: list[Callable[[Pool], None]] = []

    async def open(self, pool: Pool) -> None:
        """Open the pool's mirror (cloning it the first time), learn the default branch when no
        base is configured, read the refs and resolve the base commit."""
        pool.root.mkdir(parents=True, exist_ok=True)
        await lfs.check_git_lfs(pool.mirror)
        if not pool.mirror.exists:
            pool.state = "cloning"
            log.info("mirror_clone", pool=pool.name, repo_url=pool.config.repo_url)
            started = time.perf_counter()
            pool.progress = progress = PoolProgress(
                pool.name, lambda event: self.jobs.spawn(self.table.persist_quietly, [event])
            )
            async with self.gate.limits(pool):
                await pool.mirror.create(timeout=pool.config.clone_timeout_s, on_progress=progress.git_line)
            pool.fetch.last_ok_at = self.clock.wall()
            pool.fetch.fetches += 1
            log.info("mirror_cloned", pool=pool.name, s=round(time.perf_counter() - started, 2))
            pool.default_branch = None
        else:
            changed = pool.mirror.restore_canonical()
            if changed:
                self.gate.report_tamper(pool, changed)
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
        if pool.config.lfs is True and base != pool.mirror.lfs_fetched:
            async with self.gate.limits(pool):
                await lfs.fetch_objects(pool.mirror, base, timeout=pool.config.clone_timeout_s)
        pool.base_commit = base
        async with self.gate.limits(pool):
            await self.sync_submodules(pool, base, fresh_s=0)
        if pool.progress is not None and pool.mirror.partial is not None:
            # The first slot's checkout needs the base's blobs: fetched here, with progress.
            pool.progress.stage = "blobs"
            async with self.gate.limits(pool):
                await backfill(pool.mirror, base, pool.config.sparse, timeout=pool.config.clone_timeout_s,
                               on_progress=pool.progress.git_line)  # fmt: skip

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
                async with self.gate.limits(p):
                    await self.gate.check_mirror(p)
                    # The fetch prunes tags origin does not have: agents' own, in a worktree
                    # pool, which must wait for their lease's salvage (issue 16, defect 18).
                    agents_tags = await p.mirror.local_tags(p.refs) if p.refs else {}
                    await p.mirror.fetch(timeout=p.config.clone_timeout_s)
                    if extra:
                        await p.mirror.fetch(timeout=p.config.clone_timeout_s, refspecs=extra)
                    p.refs = await p.mirror.read_refs()
                    await p.mirror.put_back_tags({n: o for n, o in agents_tags.items() if n not in p.refs})
                    # Before the base moves: no slot stands on a commit whose LFS objects are
                    # not here, and the slots it kicks check the new submodule commits out.
                    base = resolve(p.refs, p.base_ref or "")
                    await lfs.fetch_objects(p.mirror, base, timeout=p.config.clone_timeout_s)
                    await self.sync_submodules(p, base)
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
                    await self.table.persist_quietly([Event("pools", "pool.fetch", {
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
                await self.table.persist_quietly([Event("pools", "pool.fetch", {"pool": p.name, "ok": True})])
            return await self._set_base(p, resolve(p.refs, p.base_ref or ""))

    async def sync_submodules(self, p: Pool, commit: str | None, fresh_s: float | None = None) -> None:
        """With ``submodules:``, the host's mirrors of the submodules ``commit`` records made to
        hold their commits (``submirrors``; under the caller's git limits). What stops one from
        being checked out is the pool's ``submodule_problems``, and a ``pool.submodules`` event
        when that changes; it never fails the fetch."""
        if not p.config.submodules or self.submodules is None:
            p.submodule_problems = ()
            return
        if commit is None:
            return
        problems = tuple(await self.submodules.sync(
            p.mirror, commit, recursive=p.config.submodules == "recursive",
            fresh_s=p.config.fetch_interval_s / 2 if fresh_s is None else fresh_s, timeout=p.config.clone_timeout_s))  # fmt: skip
        if problems != p.submodule_problems:
            p.submodule_problems = problems
            if problems:
                log.error("submodules_refused", pool=p.name, commit=commit, problems=list(problems))
            await self.table.persist_quietly([Event("pools", "pool.submodules", {
                "pool": p.name, "commit": commit, "problems": list(problems)})])  # fmt: skip

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
        await self.table.persist_quietly([Put("pool", p.name, p.to_row()), moved])
        for slot in list(p.slots.values()):
            if slot.state is SlotState.AVAILABLE:
                self.jobs.kick(slot)
        for callback in self.on_base_moved:
            callback(p)
        return True

    async def refetch_base(self, p: Pool) -> None:
        """After a reload changed the pool's origin or base: learn the default branch again if
        needed, and fetch."""
        try:
            if p.config.base is None and p.default_branch is None:
                p.default_branch = await p.mirror.remote_head(timeout=60)
            await self.fetch_pool(p)
        except (GitError, OSError) as exc:
            log.error("refetch_failed", pool=p.name, error=str(exc))

    # --- the mirror's objects ---------------------------------------------------------------------

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
            lost: list[str] = []
            try:
                async with self.gate.limits(p):
                    # Objects are missing because something removed them: an agent in a
                    # worktree slot can, and leave a symlink where git is about to write them.
                    await self.gate.check_mirror(p)
                    # A salvage only the mirror had cannot be fetched again, and a ref to a
                    # missing object fails every fetch after (the refetch's too): dropped first.
                    lost = await p.mirror.drop_lost_salvage(timeout=p.config.clone_timeout_s)
                    if lost:
                        log.error("salvage_lost", pool=p.name, refs=lost[:20], count=len(lost))
                    await p.mirror.refetch(timeout=p.config.clone_timeout_s)
                after = await p.mirror.connectivity_problem(timeout=p.config.clone_timeout_s)
            except (GitError, OSError) as exc:
                return problem, f"refetch failed: {exc}"
            finally:
                p.repairing = False
            for slot in list(p.slots.values()):
                if slot.state is SlotState.AVAILABLE:
                    slot.verified_at = 0.0  # look at them again at the next scan
            repaired = Event("pools", "pool.repaired", {"pool": p.name, "problem": problem, "still": after,
                                                        "salvage_lost": lost[:100]})  # fmt: skip
            self.jobs.spawn(self.table.persist_quietly, [repaired])
            return problem, "refetched" + (f", still broken: {after}" if after else "")
        finally:
            p.verifying = False

    # --- what a pool offers -----------------------------------------------------------------------

    async def refs(self, pool: str, pattern: str | None = None) -> dict[str, Any]:
        """The branches and tags of ``pool``'s origin as last fetched, with their commits (tags
        peeled): what a caller may ask for as ``ref``. ``pattern``: a glob on the short name."""
        p = self.table.pool(pool)
        branches, tags = [], []
        for name, commit in sorted(p.refs.items()):
            if name.startswith("refs/remotes/origin/") and name != "refs/remotes/origin/HEAD":
                branches.append({"name": name.removeprefix("refs/remotes/origin/"), "commit": commit})
            elif name.startswith("refs/tags/"):
                tags.append({"name": name.removeprefix("refs/tags/"), "commit": commit})
        if pattern is not None:
            branches = [b for b in branches if fnmatch.fnmatchcase(b["name"], pattern)]
            tags = [t for t in tags if fnmatch.fnmatchcase(t["name"], pattern)]
        return {"pool": p.name, "base": p.base_ref, "base_commit": p.base_commit,
                "fetched_at": p.fetch.last_ok_at, "branches": branches, "tags": tags}  # fmt: skip

    # --- salvage retention ------------------------------------------------------------------------

    async def prune_salvage(self, pool: str | None = None, *, dry_run: bool = False) -> list[dict[str, Any]]:
        """Delete the salvage refs past each pool's retention (``salvage_keep_*``); what went
        (or, with ``dry_run``, would go)."""
        pools = [self.table.pool(pool)] if pool is not None else list(self.table.pools.values())
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
            async with self.gate.limits(p):
                await self.gate.check_mirror(p)
                await p.mirror.prune_salvage(refs, timeout=p.config.clone_timeout_s)
            pruned += gone
            log.info("salvage_pruned", pool=p.name, refs=len(refs))
            await self.table.persist_quietly([Event("pools", "salvage.pruned", {
                "pool": p.name, "lease_ids": [g["lease_id"] for g in gone][:100], "count": len(refs)})])  # fmt: skip
        return pruned

    async def salvage_branch(
        self, p: Pool, point: SalvagePoint, branch: str, subject: str, *, push: bool
    ) -> str:
        """A branch holding a salvage's work (``pickup.py``) in the mirror, and with ``push`` on
        the origin too; its commit. A push that fails leaves no branch behind."""
        async with self.gate.limits(p):
            # The push reads the mirror's config: an agent in a worktree slot can write it.
            await self.gate.check_mirror(p)
            commit = await make_branch(p.mirror, point, branch, subject)
            if push:
                try:
                    await push_branch(p.mirror, commit, branch)
                except BaseException:
                    await drop_branch(p.mirror, commit, branch)
                    raise
        log.info(
            "salvage_branch", pool=p.name, lease_id=point.lease_id, branch=branch, commit=commit, pushed=push
        )
        await self.table.persist_quietly([Event("pools", "salvage.branched", {
            "pool": p.name, "lease_id": point.lease_id, "branch": branch, "commit": commit, "pushed": push})])  # fmt: skip
        return commit
