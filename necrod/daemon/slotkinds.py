"""How a pool's slots stand on its mirror: git worktrees (the default) or shared clones (the
third kind, ``overlay``, is ``overlayslots.py``).

``worktree``: ``git worktree add``. The slot's ``.git`` is a file naming an admin directory in
the mirror (``worktrees/<n>``); every slot shares the mirror's config, hooks and refs. Cheapest,
but an agent can reach the mirror and, through it, every other slot.

``shared-clone``: each slot is a repository of its own (``<slot>/.git``) that borrows the
mirror's objects read-only through ``objects/info/alternates``, with its own config, hooks,
index, refs and new objects. The mirror can be mounted read-only into a container, and nothing
written in one slot reaches another. Two duties follow:

- The mirror must never lose an object a slot stands on (a force-push then ``git gc`` would
  corrupt a parked slot): each slot's commit is pinned by ``refs/necrod/slots/<n>`` in the
  mirror, moved *before* the slot is checked out elsewhere, deleted with the slot. Objects an
  agent makes live in its slot and need no pin.
- The slot's work is not in the mirror: salvage commits in the slot, then the mirror fetches
  that commit from the slot, from the daemon's side.

The slot's own ``.git`` is the agent's to write while it holds the lease, so before any git of
ours runs there, its config, hooks, info and alternates are put back as necrod wrote them.

Over 500 lines, on purpose: the two git kinds side by side, with what they do alike
(``GitSlots``) and the ``SlotKind`` protocol all three kinds keep, read as one contract; a
submodule's checkout is ``slotsubmodules``, a checkout under a sparse set and a partial mirror's
blobs are ``sparsecheckout`` and ``partial``.
"""

from __future__ import annotations

import os
import stat
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Protocol

import anyio
import structlog

from necrod.daemon.mirror import (
    Mirror,
    quote_config,
    remove_path,
    restore_files,
    unsafe_files,
    unsafe_structure,
)
from necrod.daemon.partial import backfill
from necrod.daemon.slotsubmodules import SubmoduleCheckout
from necrod.daemon.sparsecheckout import sparse_checkout
from necrod.io import slotfs
from necrod.io.gitrun import GitRunner

log = structlog.get_logger("necrod.slots")

PIN_PREFIX = "refs/necrod/slots/"

#: In a worktree's admin directory: files that must not be there.
_ADMIN_FORBIDDEN = ("config.worktree",)
#: In a shared clone's ``.git``: directories kept empty, and files that must not exist.
_CLONE_EMPTY = ("hooks", "info")
_CLONE_FORBIDDEN = ("commondir", "config.worktree", "objects/info/http-alternates", "shallow")


class SlotKind(Protocol):
    """What a pool does with a slot of one kind. ``add``, ``reset`` and ``move`` return the
    read-only layers the slot now stands on (only ``overlay`` slots have any)."""

    name: str
    mirror: Mirror
    #: Whether a reset runs git (a checkout, a clean) on the files the lease left; an overlay's
    #: is a remount under an empty upper, which drops all the lease wrote (a merge's state too).
    resets_with_git: bool

    def git_dir(self, admin: str, path: str) -> Path: ...
    def git_dir_at(self, admin: str, path: str) -> tuple[Path, str]: ...
    def problem(self, admin: str, path: str) -> str | None: ...
    def looks_whole(self, admin: str, path: str) -> bool: ...
    def pointer_problem(self, admin: str, path: str) -> str | None: ...
    def restore(self, admin: str, path: str) -> list[str]: ...
    def owns(self, directory: Path) -> bool: ...
    async def add(
        self, path: Path, admin: str, commit: str, *, timeout: float, sparse: tuple[str, ...] = ()
    ) -> tuple[str, ...]: ...
    async def reset(
        self, admin: str, path: str, commit: str, clean_flags: str, *, timeout: float,
        sparse: tuple[str, ...] = (),
    ) -> tuple[str, ...]: ...  # fmt: skip
    async def move(
        self, admin: str, path: str, commit: str, *, timeout: float, sparse: tuple[str, ...] = ()
    ) -> tuple[str, ...]: ...
    async def mount_again(self, admin: str, path: str, layers: tuple[str, ...]) -> bool: ...
    async def remove(self, path: Path, admin: str, *, timeout: float) -> None: ...
    async def prune(self) -> None: ...
    async def tidy(self) -> None: ...
    def own_disk(self, admin: str, path: str) -> str: ...
    def detach_if_unused(self, admin: str, path: str, layers: tuple[str, ...]) -> bool: ...
    async def unused(self, admin: str, path: str, layers: tuple[str, ...]) -> bool: ...
    async def remount(self, admin: str, path: str, layers: tuple[str, ...]) -> None: ...
    def untouched(self, admin: str, path: str) -> bool: ...
    async def drift(self, admin: str, path: str, commit: str, *, timeout: float) -> str | None: ...
    def written(self, admin: str) -> str | None: ...
    def pin(self, admin: str, commit: str) -> None: ...
    def object_dirs(self, admin: str, path: str) -> list[Path]: ...
    async def delete_branch(self, admin: str, path: str, branch: str, *, timeout: float) -> None: ...
    def forget(self, admin: str, path: str) -> None: ...


class GitSlots(ABC):
    """What the two git kinds do alike: a reset and a move are git's (checkout, clean); nothing
    to mount, nothing left behind, no cheap way to tell that a slot is unused or untouched. No
    state: each kind holds its own ``mirror`` and ``git``, and says where a slot's git directory
    is, how its commit is pinned and what of a lease its repository forgets."""

    mirror: Mirror
    git: GitRunner
    resets_with_git = True
    #: The pool's submodule checkout (``submodules:``); None: submodule directories stay empty.
    submodules: SubmoduleCheckout | None = None

    @abstractmethod
    def git_dir(self, admin: str, path: str) -> Path: ...

    @abstractmethod
    def git_dir_at(self, admin: str, path: str) -> tuple[Path, str]: ...

    @abstractmethod
    def pin(self, admin: str, commit: str) -> None: ...

    @abstractmethod
    def forget(self, admin: str, path: str, keep_modules: bool = False) -> None: ...

    async def checkout(
        self, admin: str, path: str, args: list[str], commit: str, sparse: tuple[str, ...] | None, *,
        timeout: float,
    ) -> None:  # fmt: skip
        """``git <args>`` (a checkout of ``commit``) in the slot, as ``sparsecheckout`` runs it."""
        await sparse_checkout(self.mirror, self.git_dir(admin, path), self.git_dir_at(admin, path), path, args,
                              commit, sparse, timeout=timeout)  # fmt: skip

    async def reset(
        self, admin: str, path: str, commit: str, clean_flags: str, *, timeout: float,
        sparse: tuple[str, ...] = (),
    ) -> tuple[str, ...]:  # fmt: skip
        """Back to ``commit``: tracked files as committed, untracked (and ignored, with -x)
        files gone, submodule directories emptied (then checked out afresh when the pool has
        ``submodules:``), nothing of the lease's own in its repository, and the pool's ``sparse``
        set (the full checkout: ()) whatever the lease made of it."""
        self.pin(admin, commit)
        git_dir = self.git_dir(admin, path)
        await self.checkout(admin, path, ["checkout", "--quiet", "--force", "--detach", commit], commit, sparse,
                            timeout=timeout)  # fmt: skip
        await self.git.run(["clean", "--quiet", clean_flags], git_dir=git_dir, work_tree=path, cwd=path,
                           timeout=timeout)  # fmt: skip
        managed = self.submodules is not None and self.submodules.enabled
        submodules = [] if managed else await self.mirror.gitlinks(commit)
        if submodules:
            await anyio.to_thread.run_sync(empty_submodules, path, submodules)
        await anyio.to_thread.run_sync(self.forget, admin, path, managed)
        await self.check_out_submodules(admin, path, commit, timeout=timeout, clean_flags=clean_flags)
        return ()

    async def move(
        self, admin: str, path: str, commit: str, *, timeout: float, sparse: tuple[str, ...] = ()
    ) -> tuple[str, ...]:
        """An idle, clean slot (at the pool's ``sparse`` set) to a new base commit: only the
        tracked files that differ change (with ``submodules:``, the submodules are checked out
        again, and one the new commit no longer has goes with the untracked files)."""
        if self.submodules is not None and self.submodules.enabled:
            return await self.reset(admin, path, commit, "-ffd", timeout=timeout, sparse=sparse)
        self.pin(admin, commit)
        await self.checkout(admin, path, ["checkout", "--quiet", "--force", "--detach", commit], commit,
                            sparse or None, timeout=timeout)  # fmt: skip
        return ()

    async def check_out_submodules(
        self, admin: str, path: str, commit: str, *, timeout: float, clean_flags: str = "-ffdx"
    ) -> None:
        """The submodules ``commit`` records, checked out in the slot (``slotsubmodules``)."""
        if self.submodules is not None:
            root, rel = self.git_dir_at(admin, path)
            await self.submodules.checkout(root, rel, path, commit, timeout=timeout, clean_flags=clean_flags)

    async def drift(self, admin: str, path: str, commit: str, *, timeout: float) -> str | None:
        """How a just-reset slot differs from a clean checkout at ``commit``, or None: HEAD read
        from its file, then git's stat of the work tree against the index (no hashing of what
        is unchanged): a changed, missing or untracked file is drift (ignored files are not)."""
        root, rel = self.git_dir_at(admin, path)
        head = (slotfs.read_text_or_none(root, f"{rel}/HEAD") or "").strip()
        if head != commit:
            return f"HEAD is {head[:64]!r}, not {commit}"
        status = await self.git.run(["status", "--porcelain=v1", "-z", "--untracked-files=all", "--no-renames",
                                     "--ignore-submodules=all"], git_dir=self.git_dir(admin, path), work_tree=path,
                                    cwd=path, timeout=timeout, env={"GIT_OPTIONAL_LOCKS": "0"},
                                    max_stdout=DRIFT_LISTED, cut=True)  # fmt: skip
        return described_drift([e.decode("utf-8", "replace") for e in status.entries() if e], more=status.cut)

    def written(self, admin: str) -> str | None:
        """What was written since the reset, if that can be told in a few system calls: not here."""
        return None

    async def mount_again(self, admin: str, path: str, layers: tuple[str, ...]) -> bool:
        """Nothing to mount: the slot is a directory."""
        return False

    async def tidy(self) -> None:
        """Nothing left behind: a reset removes what it removes at once."""
        return

    def own_disk(self, admin: str, path: str) -> str:
        """Where the slot's own disk use is: all of it."""
        return path

    def detach_if_unused(self, admin: str, path: str, layers: tuple[str, ...]) -> bool:
        """Whether no process works in the slot, if that can be told cheaply: not here (the
        caller scans /proc)."""
        return False

    async def unused(self, admin: str, path: str, layers: tuple[str, ...]) -> bool:
        """As ``detach_if_unused``: cannot tell."""
        return False

    async def remount(self, admin: str, path: str, layers: tuple[str, ...]) -> None:
        """Never called: ``detach_if_unused`` cannot tell, so a git slot is never detached."""
        raise AssertionError("a git slot is never detached")

    def untouched(self, admin: str, path: str) -> bool:
        """Whether the lease changed nothing, if that can be told cheaply: not here."""
        return False


#: Paths named in a drift's evidence.
DRIFT_NAMED = 10
#: The most of a drifted slot's ``git status`` read: any drift is evidence enough.
DRIFT_LISTED = 1 << 20


def described_drift(changed: list[str], *, more: bool = False) -> str | None:
    """Evidence of a drift, from ``status --porcelain`` entries (or paths), of which there were
    ``more`` not read; None for none."""
    if not changed:
        return None
    shown = ", ".join(repr(c[:200]) for c in changed[:DRIFT_NAMED])
    rest = f" and {len(changed) - DRIFT_NAMED} more" if len(changed) > DRIFT_NAMED else ""
    count = f"over {len(changed)}" if more else f"{len(changed)}"
    return f"{count} path(s) differ from the base: {shown}{rest}"


def empty_submodules(path: str, submodules: list[str]) -> None:
    """Each submodule's directory as a fresh checkout has it: there and empty. git leaves what
    an agent put there (``submodule update --init``, then edits): its index holds only the
    gitlink. Nothing there is followed; what is not a directory is replaced by one."""
    for rel in submodules:
        try:
            if slotfs.kind(path, rel) == "dir":
                for name in slotfs.list_dir(path, rel):
                    slotfs.remove(path, f"{rel}/{name}")
            else:
                slotfs.remove(path, rel)
                slotfs.ensure_dir(path, rel)
        except OSError as exc:  # a symlink on the way: git's checkout put back the real path
            raise OSError(f"cannot empty submodule directory {rel!r}: {exc}") from None


def _slot_dir(path: str) -> bool:
    """Whether the slot's own directory is a real directory (not a symlink, not gone)."""
    return slotfs.kind(os.path.dirname(path), os.path.basename(path)) == "dir"


class WorktreeSlots(GitSlots):
    name = "worktree"

    def __init__(self, mirror: Mirror, submodules: SubmoduleCheckout | None = None) -> None:
        self.mirror = mirror
        self.git: GitRunner = mirror.git
        self.submodules = submodules

    def git_dir(self, admin: str, path: str) -> Path:
        return self.mirror.path / "worktrees" / admin

    def git_dir_at(self, admin: str, path: str) -> tuple[Path, str]:
        return self.mirror.path, f"worktrees/{admin}"

    def forget(self, admin: str, path: str, keep_modules: bool = False) -> None:
        """Drop the repositories of submodules the lease initialised (``modules/``; with
        ``keep_modules``, ``slotsubmodules`` sorts them out): the rest of a worktree's
        repository is the mirror's (refs and objects)."""
        if not keep_modules:
            slotfs.remove(self.mirror.path, f"worktrees/{admin}/modules")

    def problem(self, admin: str, path: str) -> str | None:
        """Why the slot cannot be cleaned in place (it must be rebuilt), or None."""
        if not _slot_dir(path):
            return "its directory is gone"
        if slotfs.kind(path, ".git") != "file":
            return "its .git file is gone or replaced"
        if slotfs.kind(self.mirror.path, f"worktrees/{admin}/HEAD") != "file":
            return "its admin directory in the mirror is gone"
        return None

    def looks_whole(self, admin: str, path: str) -> bool:
        """The allocation path's check, in five system calls: the slot's ``.git`` is a regular
        file naming its admin directory, which has a ``HEAD``. False means: look closer
        (``problem`` and ``pointer_problem`` say what is wrong)."""
        try:
            fd = os.open(os.path.join(path, ".git"), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return False
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return False
            text = os.read(fd, 4096)
        except OSError:
            return False
        finally:
            os.close(fd)
        # Nothing followed: the mirror, ``worktrees/`` included, is writable from every slot.
        return text.strip() == os.fsencode(f"gitdir: {self.mirror.path}/worktrees/{admin}") and (
            slotfs.kind(self.mirror.path, f"worktrees/{admin}/HEAD") == "file"
        )

    def pointer_problem(self, admin: str, path: str) -> str | None:
        """Why the slot's ``.git`` file does not point at its admin directory, or None."""
        want = f"gitdir: {self.git_dir(admin, path)}"
        try:
            current = (slotfs.read_text(path, ".git") or "").strip()
        except slotfs.UnsafePath as exc:
            return f"its .git file {exc.why}"
        except OSError:
            return "its .git file cannot be read"
        if current != want:
            return f"its .git file points elsewhere ({current[:80]!r})"
        return None

    def restore(self, admin: str, path: str) -> list[str]:
        """Keep one worktree's admin directory pointing where necrod put it (what
        ``git worktree repair`` would do, without trusting anything the slot says)."""
        changed: list[str] = []
        mirror, rel = self.git_dir_at(admin, path)
        if slotfs.kind(mirror, rel) != "dir":
            return changed
        changed += [f"{rel}/{name}" for name in unsafe_files(mirror, rel)]
        expected = {"commondir": "../..\n", "gitdir": f"{path}/.git\n"}
        for name, text in expected.items():
            try:
                current = slotfs.read_bytes(mirror, f"{rel}/{name}")
            except slotfs.UnsafePath:
                current = None
            if current != text.encode():
                changed.append(f"{rel}/{name}")
                slotfs.write_atomic(mirror, f"{rel}/{name}", text)
        changed += [f"{rel}/{n}" for n in _ADMIN_FORBIDDEN if slotfs.remove(mirror, f"{rel}/{n}")]
        if slotfs.kind(path, ".git") is None:
            return changed  # a broken slot: its cleanup rebuilds it
        want = f"gitdir: {self.git_dir(admin, path)}\n"
        if slotfs.read_text_or_none(path, ".git") != want:
            changed.append(f"{path}/.git")
            slotfs.write_atomic(path, ".git", want)
        return changed

    async def add(
        self, path: Path, admin: str, commit: str, *, timeout: float, sparse: tuple[str, ...] = ()
    ) -> tuple[str, ...]:
        """``git worktree add --detach`` at ``path`` (checked out as the ``sparse`` set says);
        leftovers of an earlier attempt go first."""
        stale_admin = self.git_dir(admin, str(path))
        if path.exists() or path.is_symlink():
            await anyio.to_thread.run_sync(remove_path, path)
        if stale_admin.exists():
            await anyio.to_thread.run_sync(remove_path, stale_admin)
        path.parent.mkdir(parents=True, exist_ok=True)
        await backfill(self.mirror, commit, sparse, timeout=timeout)
        await self.git.run(["worktree", "add", "--quiet", "--detach", *(["--no-checkout"] if sparse else []),
                            "--", str(path), commit], git_dir=self.mirror.path, timeout=timeout)  # fmt: skip
        dotgit = (slotfs.read_text(path, ".git") or "").strip()
        if dotgit != f"gitdir: {stale_admin}":
            raise OSError(f"git put the worktree's admin directory at {dotgit!r}, expected {stale_admin}")
        if sparse:
            await self.checkout(admin, str(path), ["checkout", "--quiet", "--force", "--detach", commit], commit,
                                sparse, timeout=timeout)  # fmt: skip
        await self.check_out_submodules(admin, str(path), commit, timeout=timeout)
        return ()

    def owns(self, directory: Path) -> bool:
        """Whether ``directory`` is a worktree of this mirror, as necrod lays them out."""
        admin = self.mirror.path / "worktrees" / directory.name
        return (
            directory.name.isdigit()
            and (slotfs.read_text_or_none(directory, ".git") or "").strip() == f"gitdir: {admin}"
            and slotfs.kind(self.mirror.path, f"worktrees/{directory.name}") == "dir"
        )

    async def remove(self, path: Path, admin: str, *, timeout: float) -> None:
        if path.exists():
            result = await self.git.run(["worktree", "remove", "--force", "--force", "--", str(path)],
                                        git_dir=self.mirror.path, timeout=timeout, check=False)  # fmt: skip
            if result.returncode != 0:
                log.warning("worktree_remove_failed", path=str(path), error=result.err.strip())
        for leftover in (path, self.git_dir(admin, str(path))):
            if leftover.exists() or leftover.is_symlink():
                await anyio.to_thread.run_sync(remove_path, leftover)

    async def prune(self) -> None:
        await self.git.run(["worktree", "prune"], git_dir=self.mirror.path, timeout=120)

    def pin(self, admin: str, commit: str) -> None:
        """Nothing to do: git counts every worktree's HEAD as reachable."""

    def object_dirs(self, admin: str, path: str) -> list[Path]:
        """Where the slot's commits are: the mirror's objects (worktrees write there)."""
        return [self.mirror.path / "objects"]

    async def delete_branch(self, admin: str, path: str, branch: str, *, timeout: float) -> None:
        await self.git.run(["update-ref", "-d", "--end-of-options", f"refs/heads/{branch}"],
                           git_dir=self.mirror.path, timeout=timeout, check=False)  # fmt: skip


def clone_config(repo_url: str) -> str:
    return (
        "[core]\n"
        "\trepositoryformatversion = 0\n"
        "\tfilemode = true\n"
        "\tbare = false\n"
        "\tlogallrefupdates = false\n"
        '[remote "origin"]\n'
        f"\turl = {quote_config(repo_url)}\n"
        "\tfetch = +refs/heads/*:refs/remotes/origin/*\n"
    )


class CloneSlots(GitSlots):
    name = "shared-clone"

    def __init__(self, mirror: Mirror, submodules: SubmoduleCheckout | None = None) -> None:
        self.mirror = mirror
        self.git: GitRunner = mirror.git
        self.submodules = submodules

    @property
    def alternates(self) -> str:
        return f"{self.mirror.path / 'objects'}\n"

    def git_dir(self, admin: str, path: str) -> Path:
        return Path(path) / ".git"

    def git_dir_at(self, admin: str, path: str) -> tuple[Path, str]:
        return Path(path), ".git"

    def problem(self, admin: str, path: str) -> str | None:
        if not _slot_dir(path):
            return "its directory is gone"
        if slotfs.kind(path, ".git") != "dir":
            return "its .git directory is gone or replaced"
        if slotfs.kind(path, ".git/objects") != "dir":
            return "its object directory is gone or replaced"
        if slotfs.kind(path, ".git/HEAD") != "file":
            return "its HEAD is gone"
        return None

    def looks_whole(self, admin: str, path: str) -> bool:
        return slotfs.kind(path, ".git/HEAD") == "file"

    def pointer_problem(self, admin: str, path: str) -> str | None:
        current = slotfs.read_text_or_none(path, ".git/objects/info/alternates")
        if current != self.alternates:
            return f"its alternates point elsewhere ({(current or 'missing').strip()[:80]!r})"
        return None

    def restore(self, admin: str, path: str) -> list[str]:
        """The slot's config, hooks, info and alternates as necrod wrote them, its ``refs``
        there, and no symlink where git writes. A ``.git`` or ``objects`` that is not a real
        directory is left to ``problem`` (the slot is rebuilt)."""
        root = Path(path)
        removed = unsafe_files(root, ".git") if slotfs.kind(root, ".git") == "dir" else []
        if self.problem(admin, path) is not None:
            return [f"{path}/.git/{name}" for name in removed]
        removed += restore_files(
            root,
            ".git",
            clone_config(self.mirror.repo_url) + self.mirror.lfs_config(),
            _CLONE_EMPTY,
            _CLONE_FORBIDDEN,
        )
        removed += unsafe_structure(root, ".git")
        changed = [f"{path}/.git/{name}" for name in removed]
        dirs = (".git/objects/info", ".git/objects/pack", ".git/refs/heads", ".git/refs/tags")
        changed += [f"{path}/{rel}" for rel in dirs if slotfs.ensure_dir(root, rel)]
        if self.pointer_problem(admin, path) is not None:
            changed.append(f"{path}/.git/objects/info/alternates")
            slotfs.write_atomic(root, ".git/objects/info/alternates", self.alternates)
        return changed

    async def add(
        self, path: Path, admin: str, commit: str, *, timeout: float, sparse: tuple[str, ...] = ()
    ) -> tuple[str, ...]:
        """A repository of its own at ``path`` borrowing the mirror's objects, checked out
        (detached) at ``commit`` (as the ``sparse`` set says); leftovers of an earlier attempt
        go first."""
        if path.exists() or path.is_symlink():
            await anyio.to_thread.run_sync(remove_path, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        await self.git.run(["init", "--quiet", "--template=", "--", str(path)], timeout=timeout)
        self.restore(admin, str(path))
        self.pin(admin, commit)
        await self.checkout(admin, str(path), ["checkout", "--quiet", "--force", "--detach", commit], commit,
                            sparse or None, timeout=timeout)  # fmt: skip
        await self.check_out_submodules(admin, str(path), commit, timeout=timeout)
        return ()

    def owns(self, directory: Path) -> bool:
        return (
            directory.name.isdigit()
            and self.problem(directory.name, str(directory)) is None
            and self.pointer_problem(directory.name, str(directory)) is None
        )

    async def remove(self, path: Path, admin: str, *, timeout: float) -> None:
        if path.exists() or path.is_symlink():
            await anyio.to_thread.run_sync(remove_path, path)
        await self.git.run(["update-ref", "-d", "--end-of-options", PIN_PREFIX + admin],
                           git_dir=self.mirror.path, timeout=timeout, check=False)  # fmt: skip

    async def prune(self) -> None:
        """Drop the pins of slots whose directories are gone."""
        result = await self.git.run(["for-each-ref", "--format=%(refname)", PIN_PREFIX],
                                    git_dir=self.mirror.path, timeout=120)  # fmt: skip
        slots = self.mirror.path.parent / "slots"
        stale = [ref for ref in result.out.split() if not (slots / ref.removeprefix(PIN_PREFIX)).is_dir()]
        if stale:
            await self.git.run(["update-ref", "--stdin"], git_dir=self.mirror.path, timeout=120,
                               input="".join(f"delete {ref}\n" for ref in stale).encode())  # fmt: skip

    def pin(self, admin: str, commit: str) -> None:
        """``refs/necrod/slots/<admin>`` → ``commit``, as a loose ref written directly: on the
        allocation path a git process would cost more than the checkout it protects."""
        slotfs.ensure_dir(self.mirror.path, PIN_PREFIX)
        slotfs.write_atomic(self.mirror.path, PIN_PREFIX + admin, commit + "\n")

    def object_dirs(self, admin: str, path: str) -> list[Path]:
        """Where the slot's commits are: its own objects, then the mirror's it borrows."""
        return [Path(path) / ".git" / "objects", self.mirror.path / "objects"]

    async def delete_branch(self, admin: str, path: str, branch: str, *, timeout: float) -> None:
        await self.git.run(["update-ref", "-d", "--end-of-options", f"refs/heads/{branch}"],
                           git_dir=self.git_dir(admin, path), timeout=timeout, check=False)  # fmt: skip

    def forget(self, admin: str, path: str, keep_modules: bool = False) -> None:
        """Drop what leases left in the slot's own repository: refs (branches, tags, stash),
        reflogs, objects and the repositories of submodules it initialised, so the next lease inherits nothing of the last one. Run after the
        reset to a commit of the mirror, and after salvage fetched the work into the mirror:
        every object the slot needs is borrowed, so its own objects are only agents' leftovers.
        ``refs`` and ``objects`` themselves stay, so a crash half-way leaves a repository git
        still recognises (and ``restore`` makes whole again)."""
        root = Path(path)
        for name in ("logs", "packed-refs", "ORIG_HEAD", "FETCH_HEAD", "shallow", "modules"):
            if name != "modules" or not keep_modules:  # kept: ``slotsubmodules`` sorts them out
                slotfs.remove(root, f".git/{name}")
        for name in slotfs.list_dir(root, ".git/refs"):
            if name not in ("heads", "tags"):
                slotfs.remove(root, f".git/refs/{name}")
        for sub in ("heads", "tags"):
            for name in slotfs.list_dir(root, f".git/refs/{sub}"):
                slotfs.remove(root, f".git/refs/{sub}/{name}")
            slotfs.ensure_dir(root, f".git/refs/{sub}")
        for name in slotfs.list_dir(root, ".git/objects"):
            if name not in ("info", "pack"):
                slotfs.remove(root, f".git/objects/{name}")
        for name in slotfs.list_dir(root, ".git/objects/pack"):
            slotfs.remove(root, f".git/objects/pack/{name}")
        for name in slotfs.list_dir(root, ".git/objects/info"):
            if name != "alternates":
                slotfs.remove(root, f".git/objects/info/{name}")
        slotfs.ensure_dir(root, ".git/objects/pack")
