"""A checkout in a slot under a sparse set (cone mode), and the partial mirror's blobs first.

The pattern file (``info/sparse-checkout`` in the slot's git directory) is always written by
necrod just before its checkout, without following links, from the set the daemon knows: never
read back from the slot, where the agent may have rewritten it or run ``git sparse-checkout
disable``. Sparse checkout is turned on for that one git process (``GIT_CONFIG_*``), never in a
config file: a worktree shares the mirror's, which stays canonical.
"""

from __future__ import annotations

from pathlib import Path

from necrod.core.sparse import cone_patterns
from necrod.daemon.mirror import Mirror
from necrod.daemon.partial import backfill
from necrod.io import slotfs

#: In a slot's git directory: the sparse patterns.
SPARSE_FILE = "info/sparse-checkout"


def sparse_env(sparse: tuple[str, ...]) -> dict[str, str]:
    """Config for a git that applies ``SPARSE_FILE``: cone mode for a set, and the non-cone
    ``/*`` (everything) for the full checkout, which widens a narrowed slot again."""
    return {"GIT_CONFIG_COUNT": "2", "GIT_CONFIG_KEY_0": "core.sparseCheckout", "GIT_CONFIG_VALUE_0": "true",
            "GIT_CONFIG_KEY_1": "core.sparseCheckoutCone",
            "GIT_CONFIG_VALUE_1": "true" if sparse else "false"}  # fmt: skip


async def sparse_checkout(
    mirror: Mirror, git_dir: Path, at: tuple[Path, str], path: str, args: list[str], commit: str,
    sparse: tuple[str, ...] | None, *, timeout: float,
) -> None:  # fmt: skip
    """``git <args>`` (a checkout of ``commit``) in the slot at ``path`` whose git directory is
    ``git_dir`` (``at``: the same, as a trusted root and a path below it), the blobs it writes
    fetched into a partial mirror first. With ``sparse`` (``()``: the full checkout) the slot is
    narrowed or widened to that set; with None, its index's sparse bits are left as they are."""
    await backfill(mirror, commit, sparse or (), timeout=timeout)
    root, rel = at
    env = None
    if sparse is not None:
        slotfs.ensure_dir(root, f"{rel}/info")
        slotfs.write_atomic(root, f"{rel}/{SPARSE_FILE}", cone_patterns(sparse))
        env = sparse_env(sparse)
    await mirror.git.run(args, git_dir=git_dir, work_tree=path, cwd=path, timeout=timeout, env=env)
    if sparse == ():
        slotfs.remove(root, f"{rel}/{SPARSE_FILE}")
