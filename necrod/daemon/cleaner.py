"""Git work inside one slot: salvaging what a lease left, and resetting to a clean checkout.

Every call names the slot's git directory and work tree explicitly (``--git-dir``,
``--work-tree``) instead of trusting the slot's ``.git``, which the agent could rewrite. Where
that git directory is and how salvage reaches the mirror depend on the pool's slot kind.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import anyio

from necrod.daemon.slotkinds import SlotKind
from necrod.io.gitrun import GitError, GitResult, GitRunner
from necrod.io.procs import processes_in

#: State files of interrupted operations in a worktree's admin directory: a clean slot has none.
_OPERATION_STATE = (
    "MERGE_HEAD",
    "MERGE_MSG",
    "MERGE_MODE",
    "MERGE_RR",
    "AUTO_MERGE",
    "CHERRY_PICK_HEAD",
    "REVERT_HEAD",
    "BISECT_LOG",
    "BISECT_START",
    "BISECT_EXPECTED_REV",
    "BISECT_TERMS",
    "BISECT_NAMES",
    "BISECT_ANCESTORS_OK",
    "rebase-merge",
    "rebase-apply",
    "sequencer",
)
_LOCKS = ("index.lock", "HEAD.lock", "ORIG_HEAD.lock")


@dataclass(frozen=True, slots=True)
class Salvage:
    ref: str
    commit: str
    #: Whether the slot held uncommitted work (else only commits the agent made).
    dirty: bool
    #: Files git could not read were left out (the rest was kept).
    partial: bool = False


class SlotGit:
    """git in one slot of a pool."""

    def __init__(self, git: GitRunner, kind: SlotKind, admin: str, path: str, timeout: float) -> None:
        self.git = git
        self.kind = kind
        self.admin = admin
        self.admin_dir = kind.git_dir(admin, path)
        self.path = path
        self.timeout = timeout

    def healthy(self) -> str | None:
        """Why the slot cannot be cleaned in place (it must be rebuilt), or None."""
        return self.kind.problem(self.admin, self.path)

    async def run(
        self, args: list[str], *, env: dict[str, str] | None = None, check: bool = True
    ) -> GitResult:
        return await self.git.run(
            args,
            git_dir=self.admin_dir,
            work_tree=self.path,
            cwd=self.path,
            timeout=self.timeout,
            env=env,
            check=check,
        )

    def clear_stale_locks(self) -> list[str]:
        """Remove lock files left by a killed git, but only when no process works in the slot."""
        present = [name for name in _LOCKS if (self.admin_dir / name).exists()]
        if not present or processes_in(self.path):
            return []
        for name in present:
            (self.admin_dir / name).unlink(missing_ok=True)
        return present

    def clear_operation_state(self) -> None:
        for name in _OPERATION_STATE:
            p = self.admin_dir / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            elif os.path.lexists(p):
                p.unlink(missing_ok=True)

    async def salvage(self, lease_id: str, start_commit: str | None, message: str) -> Salvage | None:
        """Commit everything the lease left (tracked changes, untracked files, commits made on
        top; not ignored files) to ``refs/necrod/salvage/<lease_id>``. Uses a copy of the
        index, so the slot itself is untouched. None when there was nothing to keep."""
        index = self.admin_dir / "index"
        scratch = self.admin_dir / "necrod-salvage.index"
        if index.exists():
            await anyio.to_thread.run_sync(shutil.copyfile, index, scratch)
        else:
            scratch.unlink(missing_ok=True)
        env = {"GIT_INDEX_FILE": str(scratch)}
        try:
            # Ignore rules apply to untracked files; --ignore-errors keeps what can be read
            # when the agent left something unreadable.
            added = await self.run(["add", "--all", "--ignore-errors"], env=env, check=False)
            if added.returncode != 0 and "fatal:" in added.err:
                raise GitError(["add"], added.returncode, added.err)
            tree = (await self.run(["write-tree"], env=env)).out.strip()
        finally:
            scratch.unlink(missing_ok=True)
        head_out = (await self.run(["rev-parse", "HEAD", "HEAD^{tree}"])).out.split()
        head, head_tree = head_out[0], head_out[1]
        dirty = tree != head_tree
        if not dirty and (start_commit is None or head == start_commit):
            return None
        # Always a commit of our own, so its trailers say where the lease started.
        trailers = f"\n\nNecrod-Lease: {lease_id}\nNecrod-Start: {start_commit or head}\n"
        commit = (await self.run(["commit-tree", tree, "-p", head, "-m", message + trailers])).out.strip()
        ref = f"refs/necrod/salvage/{lease_id}"
        await self.kind.keep(self.admin, self.path, ref, commit, timeout=self.timeout)
        return Salvage(ref, commit, dirty, partial=added.returncode != 0)

    async def reset(self, commit: str, clean_flags: str) -> None:
        """Detached at ``commit``, tracked files as committed, untracked (and ignored, with -x)
        files gone, no interrupted merge or rebase left behind, nothing of the lease's own in
        the slot's repository."""
        self.clear_operation_state()
        self.kind.pin(self.admin, commit)
        await self.run(["checkout", "--quiet", "--force", "--detach", commit])
        await self.run(["clean", "--quiet", clean_flags])
        await anyio.to_thread.run_sync(self.kind.forget, self.admin, self.path)

    async def move(self, commit: str) -> None:
        """An idle, clean slot to a new base commit: only the tracked files that differ change."""
        self.kind.pin(self.admin, commit)
        await self.run(["checkout", "--quiet", "--force", "--detach", commit])

    async def checkout(self, commit: str, branch: str | None) -> None:
        self.kind.pin(self.admin, commit)
        if branch is None:
            await self.run(["checkout", "--quiet", "--detach", commit])
        else:
            await self.run(["checkout", "--quiet", "-B", branch, commit])

    async def delete_branch(self, branch: str) -> None:
        await self.kind.delete_branch(self.admin, self.path, branch, timeout=self.timeout)
