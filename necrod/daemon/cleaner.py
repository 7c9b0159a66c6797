"""Git work inside one slot: resetting it to a clean checkout (salvage is ``salvage.py``); how a
reset is done is the slot kind's (``slotkinds``, ``overlayslots``).

Every call names the slot's git directory and work tree explicitly (``--git-dir``,
``--work-tree``) instead of trusting the slot's ``.git``, which the agent could rewrite. Where
that git directory is and how salvage reaches the mirror depend on the pool's slot kind.
"""

from __future__ import annotations

import anyio

from necrod.daemon.partial import backfill
from necrod.daemon.slotkinds import GitSlots, SlotKind
from necrod.io import slotfs
from necrod.io.gitrun import GitResult, GitRunner
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


class SlotGit:
    """git in one slot of a pool."""

    def __init__(
        self,
        git: GitRunner,
        kind: SlotKind,
        admin: str,
        path: str,
        timeout: float,
        sparse: tuple[str, ...] = (),
    ) -> None:
        self.git = git
        #: The pool's sparse set: what a reset and a move leave the slot holding (() : all of it).
        self.sparse = sparse
        self.kind = kind
        self.admin = admin
        self.admin_dir = kind.git_dir(admin, path)
        self.path = path
        self.timeout = timeout
        self._state_cleared = False
        #: What ``prepare`` found: why the slot must be rebuilt (None: it need not), and the
        #: stale lock files it removed.
        self.problem: str | None = None
        self.locks: list[str] = []

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

    def prepare(self, clear_state: bool) -> None:
        """A cleanup's first look at the slot, in the thread that checked the mirror: its
        interrupted operation's state cleared (``clear_state``), what is wrong with it
        (``problem``), and if nothing is, the lock files a killed git left removed (``locks``).
        Not on the event loop: what an agent left at a lock's name (a directory of a million
        files) is the agent's to decide."""
        if clear_state:
            self.clear_operation_state_early()
        self.problem = self.healthy()
        if self.problem is None:
            self.locks = self.clear_stale_locks()

    def clear_stale_locks(self) -> list[str]:
        """Remove lock files left by a killed git, but only when no process works in the slot;
        in a worker thread (see ``prepare``)."""
        present = self.stale_locks()
        root, rel = self.kind.git_dir_at(self.admin, self.path)
        for name in present:
            slotfs.remove(root, f"{rel}/{name}")
        return present

    def stale_locks(self) -> list[str]:
        """The lock files a killed git left (whatever is at their names), when no process works
        in the slot; blocking."""
        root, rel = self.kind.git_dir_at(self.admin, self.path)
        present = [name for name in _LOCKS if slotfs.kind(root, f"{rel}/{name}") is not None]
        return [] if not present or processes_in(self.path) else present

    def clear_operation_state(self) -> None:
        root, rel = self.kind.git_dir_at(self.admin, self.path)
        for name in _OPERATION_STATE:
            slotfs.remove(root, f"{rel}/{name}")

    def clear_operation_state_early(self) -> None:
        """``clear_operation_state`` ahead of ``reset``, in a thread the caller has anyway,
        where the slot's git directory allows it (``reset`` then skips it). A slot too broken
        for it is rebuilt, or ``reset`` tries again and says why it cannot."""
        try:
            self.clear_operation_state()
        except OSError:
            return
        self._state_cleared = True

    async def reset(self, commit: str, clean_flags: str) -> tuple[str, ...]:
        """Detached at ``commit``, as clean as the slot's kind makes it (``SlotKind.reset``),
        no interrupted merge or rebase left behind; the layers it now stands on."""
        if self.kind.resets_with_git and not self._state_cleared:  # an overlay's upper goes, state and all
            await anyio.to_thread.run_sync(self.clear_operation_state)
        return await self.kind.reset(self.admin, self.path, commit, clean_flags, timeout=self.timeout,
                                     sparse=self.sparse)  # fmt: skip

    async def drift(self, commit: str) -> str | None:
        """How the just-reset slot differs from a clean checkout at ``commit`` (None: it does
        not); ``SlotKind.drift``."""
        problem = await self.kind.drift(self.admin, self.path, commit, timeout=self.timeout)
        return f"its reset left it different from the base: {problem}" if problem else None

    async def move(self, commit: str) -> tuple[str, ...]:
        """An idle, clean slot to a new base commit; the layers it now stands on."""
        return await self.kind.move(self.admin, self.path, commit, timeout=self.timeout, sparse=self.sparse)

    async def checkout(self, commit: str, branch: str | None, sparse: tuple[str, ...] | None = None) -> None:
        """A clean slot to ``commit`` (on ``branch``) for a lease, narrowed or widened to the
        lease's ``sparse`` set when it asked for one (else it keeps the pool's)."""
        self.kind.pin(self.admin, commit)
        args = ["checkout", "--quiet", "--detach", commit] if branch is None else ["checkout", "--quiet", "-B",
                                                                                   branch, commit]  # fmt: skip
        if not isinstance(self.kind, GitSlots):  # an overlay slot: no sparse sets, no submodules
            await backfill(self.kind.mirror, commit, timeout=self.timeout)
            await self.run(args)
            return
        wanted = self.sparse if sparse is None else sparse
        await self.kind.checkout(self.admin, self.path, args, commit, wanted if (wanted or sparse is not None)
                                 else None, timeout=self.timeout)  # fmt: skip
        if self.kind.submodules is not None and self.kind.submodules.enabled:
            # The submodules ``commit`` records, from the host's mirrors (no fetch here).
            await self.kind.check_out_submodules(self.admin, self.path, commit, timeout=self.timeout)

    async def resume(
        self, salvage: str, head: str, branch: str | None, sparse: tuple[str, ...] | None = None
    ) -> None:
        """A salvage's work in this slot (``resume.py``): HEAD (and ``branch``, if named) at
        the lost lease's last commit ``head``, the work tree as that lease left it, what it had
        not committed uncommitted again (within the lease's ``sparse`` set, as ``checkout``)."""
        await self.checkout(salvage, branch, sparse)
        await self.run(["reset", "--quiet", "--mixed", head, "--"])

    async def delete_branch(self, branch: str) -> None:
        await self.kind.delete_branch(self.admin, self.path, branch, timeout=self.timeout)
