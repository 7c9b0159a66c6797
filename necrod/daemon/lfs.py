"""A pool's LFS objects (``lfs: true``): fetched once into the mirror's store, never per slot.

``git lfs fetch`` runs in the bare mirror for one commit (the base, after each fetch of the
pool; a ``ref`` a lease asks for, before its checkout), under the pool's git limits and its
``clone_timeout_s``, with the endpoint the daemon derives from ``repo_url`` and nothing a
``.lfsconfig`` says about where or what to fetch (``core.lfs`` says why). Slots then smudge from
that store through the filter their repository config names; a worktree's git-lfs finds it as
``<common dir>/lfs``, a shared clone, an overlay layer and a salvage scratch repository are told
(``lfs.storage``).

Error handling: a fetch that fails raises ``GitError`` like the pool's own fetch (the base does
not move); git-lfs missing where a pool wants it is ``FailedPrecondition`` at the pool's start.
"""

from __future__ import annotations

import re

import structlog

from necrod.core.lfs import fetch_overrides, lfs_endpoint
from necrod.daemon.mirror import Mirror
from necrod.io.gitlfs import git_lfs_problem
from necrod.proto.errors import FailedPrecondition

log = structlog.get_logger("necrod.lfs")

_COMMIT = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")


async def check_git_lfs(mirror: Mirror) -> None:
    """Refuse a pool that wants LFS content where git-lfs cannot be run (its start fails, with
    this as the pool's error, and is retried: installing git-lfs is enough)."""
    if mirror.lfs is True:
        problem = await git_lfs_problem(mirror.git.env)
        if problem is not None:
            raise FailedPrecondition(problem)


async def fetch_objects(mirror: Mirror, commit: str | None, *, timeout: float) -> None:
    """The LFS objects ``commit`` names into the mirror's store, unless the pool wants none or
    they were fetched last time. Callers hold the pool's git limits."""
    if mirror.lfs is not True or commit is None or commit == mirror.lfs_fetched:
        return
    if not _COMMIT.fullmatch(commit):
        raise ValueError(f"not a full commit id: {commit!r}")
    await mirror.git.run(
        ["lfs", "fetch", "origin", commit],
        git_dir=mirror.path,
        cwd=mirror.path,
        timeout=timeout,
        network=True,
        env=fetch_overrides(lfs_endpoint(mirror.repo_url)),
    )
    mirror.lfs_fetched = commit
    log.info("lfs_fetched", mirror=str(mirror.path), commit=commit)
