"""A partial mirror (``filter:``) made whole enough for a checkout, before the checkout runs.

A mirror cloned with ``--filter=blob:none`` has every commit and tree but only the blobs
fetched since. A slot's checkout would fetch a missing blob lazily, through the promisor remote
of the repository it runs in: a worktree slot through the mirror's config, straight to origin
(one request per batch, from a slot); a shared-clone slot, which only borrows the mirror's
objects, not at all (the checkout fails). So before any checkout in a slot, the daemon fetches
into the mirror, in one request, the blobs of that commit which the slot's checkout will write
(only those in its sparse cone), and slots never reach the origin themselves.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from necrod.core.sparse import in_cone
from necrod.daemon.mirror import Mirror

log = structlog.get_logger("necrod.mirror")

#: (commit, sparse set) pairs remembered as complete per mirror; older ones are forgotten.
REMEMBERED = 64


async def backfill(
    mirror: Mirror, commit: str, sparse: tuple[str, ...] = (), *, timeout: float,
    on_progress: Callable[[str], None] | None = None,
) -> int:  # fmt: skip
    """Fetch into a partial mirror the blobs of ``commit`` a checkout of ``sparse`` writes and
    the mirror lacks; how many were fetched (0 for a mirror that is not partial)."""
    if mirror.partial is None or (commit, sparse) in mirror.backfilled or (commit, ()) in mirror.backfilled:
        return 0
    listed = await mirror.git.run(["rev-list", "--objects", "--no-walk", "--missing=print", "--end-of-options",
                                   commit], git_dir=mirror.path, timeout=timeout)  # fmt: skip
    missing = {line[1:].strip() for line in listed.lines() if line.startswith("?")}
    wanted: list[str] = []
    if missing:
        for mode, oid, path in await mirror.tree(commit):
            if oid in missing and mode != "160000" and in_cone(path, sparse):
                wanted.append(oid)
    if wanted:
        wanted = sorted(set(wanted))
        await mirror.git.run(
            ["fetch", "--progress", "--no-tags", "--no-write-fetch-head",
             "--recurse-submodules=no", f"--filter={mirror.partial}", "--stdin", *mirror.fetch_options(), "origin"],
            git_dir=mirror.path, timeout=timeout, network=True,
            env={"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "fetch.negotiationAlgorithm",
                 "GIT_CONFIG_VALUE_0": "noop"},
            input="".join(f"{oid}\n" for oid in wanted).encode(), on_stderr_line=on_progress,
        )  # fmt: skip
        log.info("mirror_backfilled", mirror=str(mirror.path), commit=commit, blobs=len(wanted),
                 sparse=list(sparse))  # fmt: skip
    if len(mirror.backfilled) >= REMEMBERED:
        mirror.backfilled.clear()
    mirror.backfilled.add((commit, sparse))
    return len(wanted)
