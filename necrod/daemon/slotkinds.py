"""How a pool's slots stand on its mirror: git worktrees (the default) or shared clones.

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
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Protocol

import anyio
import structlog

from necrod.daemon.mirror import Mirror, quote_config, remove_path, restore_files, write_atomic
from necrod.io.gitrun import GitRunner

log = structlog.get_logger("necrod.slots")

KINDS = ("worktree", "shared-clone")
PIN_PREFIX = "refs/necrod/slots/"

#: In a worktree's admin directory: files that must not be there.
_ADMIN_FORBIDDEN = ("config.worktree",)
#: In a shared clone's ``.git``: directories kept empty, and files that must not exist.
_CLONE_EMPTY = ("hooks", "info")
_CLONE_FORBIDDEN = ("commondir", "config.worktree", "objects/info/http-alternates", "shallow")


class SlotKind(Protocol):
    name: str
    mirror: Mirror

    def git_dir(self, admin: str, path: str) -> Path: ...
    def problem(self, admin: str, path: str) -> str | None: ...
    def looks_whole(self, admin: str, path: str) -> bool: ...
    def pointer_problem(self, admin: str, path: str) -> str | None: ...
    def restore(self, admin: str, path: str) -> list[str]: ...
    def owns(self, directory: Path) -> bool: ...
    async def add(self, path: Path, admin: str, commit: str, *, timeout: float) -> None: ...
    async def remove(self, path: Path, admin: str, *, timeout: float) -> None: ...
    async def prune(self) -> None: ...
    def pin(self, admin: str, commit: str) -> None: ...
    async def keep(self, admin: str, path: str, ref: str, commit: str, *, timeout: float) -> None: ...
    async def delete_branch(self, admin: str, path: str, branch: str, *, timeout: float) -> None: ...
    def forget(self, admin: str, path: str) -> None: ...


def slot_kind(name: str, mirror: Mirror) -> SlotKind:
    if name == "shared-clone":
        return CloneSlots(mirror)
    return WorktreeSlots(mirror)


def _real_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace") if not path.is_symlink() else None
    except OSError:
        return None


class WorktreeSlots:
    name = "worktree"

    def __init__(self, mirror: Mirror) -> None:
        self.mirror = mirror
        self.git: GitRunner = mirror.git

    def git_dir(self, admin: str, path: str) -> Path:
        return self.mirror.path / "worktrees" / admin

    def forget(self, admin: str, path: str) -> None:
        """Nothing of a worktree's repository is its own (refs and objects are the mirror's)."""

    def problem(self, admin: str, path: str) -> str | None:
        """Why the slot cannot be cleaned in place (it must be rebuilt), or None."""
        if not os.path.isdir(path):
            return "its directory is gone"
        if not os.path.isfile(os.path.join(path, ".git")):
            return "its .git file is gone"
        if not (self.git_dir(admin, path) / "HEAD").is_file():
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
        admin_dir = f"{self.mirror.path}/worktrees/{admin}"
        return text.strip() == os.fsencode(f"gitdir: {admin_dir}") and os.path.isfile(f"{admin_dir}/HEAD")

    def pointer_problem(self, admin: str, path: str) -> str | None:
        """Why the slot's ``.git`` file does not point at its admin directory, or None."""
        dotgit = Path(path) / ".git"
        want = f"gitdir: {self.git_dir(admin, path)}"
        try:
            current = dotgit.read_text(errors="replace").strip() if not dotgit.is_symlink() else None
        except OSError:
            return "its .git file cannot be read"
        if current != want:
            return f"its .git file points elsewhere ({(current or 'a symlink')[:80]})"
        return None

    def restore(self, admin: str, path: str) -> list[str]:
        """Keep one worktree's admin directory pointing where necrod put it (what
        ``git worktree repair`` would do, without trusting anything the slot says)."""
        changed: list[str] = []
        d = self.git_dir(admin, path)
        if not d.is_dir():
            return changed
        expected = {"commondir": "../..\n", "gitdir": f"{path}/.git\n"}
        for name, text in expected.items():
            p = d / name
            try:
                current = p.read_text(errors="replace")
            except FileNotFoundError:
                current = None
            if current != text:
                changed.append(f"worktrees/{admin}/{name}")
                write_atomic(p, text)
        for name in _ADMIN_FORBIDDEN:
            p = d / name
            if p.exists() or p.is_symlink():
                changed.append(f"worktrees/{admin}/{name}")
                remove_path(p)
        dotgit = Path(path) / ".git"
        want = f"gitdir: {d}\n"
        if not os.path.lexists(dotgit):
            return changed  # a broken slot: its cleanup rebuilds it
        current = _read(dotgit) if dotgit.is_file() else None
        if current != want:
            changed.append(f"{path}/.git")
            remove_path(dotgit)
            dotgit.write_text(want)
        return changed

    async def add(self, path: Path, admin: str, commit: str, *, timeout: float) -> None:
        """``git worktree add --detach`` at ``path``; leftovers of an earlier attempt go first."""
        stale_admin = self.git_dir(admin, str(path))
        if path.exists() or path.is_symlink():
            await anyio.to_thread.run_sync(remove_path, path)
        if stale_admin.exists():
            await anyio.to_thread.run_sync(remove_path, stale_admin)
        path.parent.mkdir(parents=True, exist_ok=True)
        await self.git.run(["worktree", "add", "--quiet", "--detach", "--", str(path), commit],
                           git_dir=self.mirror.path, timeout=timeout)  # fmt: skip
        dotgit = (path / ".git").read_text().strip()
        if dotgit != f"gitdir: {stale_admin}":
            raise OSError(f"git put the worktree's admin directory at {dotgit!r}, expected {stale_admin}")

    def owns(self, directory: Path) -> bool:
        """Whether ``directory`` is a worktree of this mirror, as necrod lays them out."""
        admin = self.mirror.path / "worktrees" / directory.name
        return (
            directory.name.isdigit()
            and (_read(directory / ".git") or "").strip() == f"gitdir: {admin}"
            and admin.is_dir()
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

    async def keep(self, admin: str, path: str, ref: str, commit: str, *, timeout: float) -> None:
        """The salvage commit is already in the mirror's object store: name it there."""
        await self.git.run(["update-ref", "--end-of-options", ref, commit], git_dir=self.mirror.path,
                           timeout=timeout)  # fmt: skip

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


class CloneSlots:
    name = "shared-clone"

    def __init__(self, mirror: Mirror) -> None:
        self.mirror = mirror
        self.git: GitRunner = mirror.git

    @property
    def alternates(self) -> str:
        return f"{self.mirror.path / 'objects'}\n"

    def git_dir(self, admin: str, path: str) -> Path:
        return Path(path) / ".git"

    def problem(self, admin: str, path: str) -> str | None:
        if not os.path.isdir(path):
            return "its directory is gone"
        dotgit = os.path.join(path, ".git")
        if not _real_dir(dotgit):
            return "its .git directory is gone or replaced"
        if not _real_dir(os.path.join(dotgit, "objects")):
            return "its object directory is gone or replaced"
        if not os.path.isfile(os.path.join(dotgit, "HEAD")):
            return "its HEAD is gone"
        return None

    def looks_whole(self, admin: str, path: str) -> bool:
        dotgit = os.path.join(path, ".git")
        return _real_dir(dotgit) and os.path.isfile(os.path.join(dotgit, "HEAD"))

    def pointer_problem(self, admin: str, path: str) -> str | None:
        current = _read(Path(path) / ".git" / "objects" / "info" / "alternates")
        if current != self.alternates:
            return f"its alternates point elsewhere ({(current or 'missing').strip()[:80]})"
        return None

    def restore(self, admin: str, path: str) -> list[str]:
        """The slot's config, hooks, info and alternates as necrod wrote them. A ``.git`` or
        ``objects`` that is not a real directory is left to ``problem`` (the slot is rebuilt)."""
        d = self.git_dir(admin, path)
        if self.problem(admin, path) is not None:
            return []
        changed = [f"{path}/.git/{name}" for name in
                   restore_files(d, clone_config(self.mirror.repo_url), _CLONE_EMPTY, _CLONE_FORBIDDEN)]  # fmt: skip
        info = d / "objects" / "info"
        if info.is_symlink() or (info.exists() and not info.is_dir()):
            remove_path(info)
        info.mkdir(exist_ok=True)
        if self.pointer_problem(admin, path) is not None:
            changed.append(f"{path}/.git/objects/info/alternates")
            remove_path(info / "alternates")
            write_atomic(info / "alternates", self.alternates)
        return changed

    async def add(self, path: Path, admin: str, commit: str, *, timeout: float) -> None:
        """A repository of its own at ``path`` borrowing the mirror's objects, checked out
        (detached) at ``commit``; leftovers of an earlier attempt go first."""
        if path.exists() or path.is_symlink():
            await anyio.to_thread.run_sync(remove_path, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        await self.git.run(["init", "--quiet", "--template=", "--", str(path)], timeout=timeout)
        self.restore(admin, str(path))
        self.pin(admin, commit)
        await self.git.run(["checkout", "--quiet", "--force", "--detach", commit], git_dir=path / ".git",
                           work_tree=path, cwd=path, timeout=timeout)  # fmt: skip

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
        ref = self.mirror.path / PIN_PREFIX / admin
        ref.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(ref, commit + "\n")

    async def keep(self, admin: str, path: str, ref: str, commit: str, *, timeout: float) -> None:
        """Name the salvage commit in the slot, fetch it into the mirror, drop the slot's name."""
        git_dir = self.git_dir(admin, path)
        await self.git.run(["update-ref", "--end-of-options", ref, commit], git_dir=git_dir, timeout=timeout)
        # The slot is a local repository: the file transport, whatever the pool's origin allows.
        await self.git.run(["fetch", "--quiet", "--no-write-fetch-head", "--no-tags", str(git_dir),
                            f"+{ref}:{ref}"], git_dir=self.mirror.path, timeout=timeout,
                           env={"GIT_ALLOW_PROTOCOL": "file"})  # fmt: skip
        await self.git.run(["update-ref", "-d", "--end-of-options", ref], git_dir=git_dir, timeout=timeout)

    async def delete_branch(self, admin: str, path: str, branch: str, *, timeout: float) -> None:
        await self.git.run(["update-ref", "-d", "--end-of-options", f"refs/heads/{branch}"],
                           git_dir=self.git_dir(admin, path), timeout=timeout, check=False)  # fmt: skip

    def forget(self, admin: str, path: str) -> None:
        """Drop what leases left in the slot's own repository: refs (branches, tags), reflogs
        and objects, so the next lease inherits nothing of the last one. Run after the reset
        to a commit of the mirror, and after salvage fetched the work into the mirror: every
        object the slot needs is borrowed, so its own objects are only agents' leftovers."""
        d = Path(path) / ".git"
        for name in ("refs", "logs", "packed-refs", "ORIG_HEAD", "FETCH_HEAD", "shallow"):
            remove_path(d / name)
        for name in ("refs/heads", "refs/tags"):
            (d / name).mkdir(parents=True, exist_ok=True)
        objects = d / "objects"
        for entry in os.scandir(objects):
            if entry.name != "info":
                remove_path(objects / entry.name)
        (objects / "pack").mkdir(exist_ok=True)
        for entry in os.scandir(objects / "info"):
            if entry.name != "alternates":
                remove_path(objects / "info" / entry.name)
