"""One pool's bare mirror: cloned once, fetched in the background, kept canonical.

Layout under ``<workspaces>/<pool>/``::

    mirror.git/          bare repository; refs/remotes/origin/*, refs/tags/*, refs/necrod/salvage/*
    slots/<n>/           the worktrees
    salvage-tmp/         scratch for salvage indexes

Every worktree shares the mirror's ``config``, ``info/`` and ``hooks/``: an agent in any slot can
write them (DESIGN.md, trap 7). necrod wrote them, remembers what they hold, and checks before
running git for the pool; a difference is restored and reported as tamper.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import structlog

from necrod.core.refs import parse_for_each_ref, parse_symref
from necrod.io.gitrun import GitRunner

log = structlog.get_logger("necrod.mirror")

#: Directories whose whole content necrod owns (kept empty).
_EMPTY_DIRS = ("hooks", "info")
#: Files that must not exist in the mirror: an alternate would let objects come from elsewhere.
_FORBIDDEN = ("objects/info/alternates", "objects/info/http-alternates", "commondir", "shallow")
#: Files in a worktree's admin directory that necrod writes, and ones that must not be there.
_ADMIN_FORBIDDEN = ("config.worktree",)


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def canonical_config(repo_url: str) -> str:
    return (
        "[core]\n"
        "\trepositoryformatversion = 0\n"
        "\tfilemode = true\n"
        "\tbare = true\n"
        "\tlogallrefupdates = false\n"
        '[remote "origin"]\n'
        f"\turl = {_quote(repo_url)}\n"
        "\tfetch = +refs/heads/*:refs/remotes/origin/*\n"
        "\tfetch = +refs/tags/*:refs/tags/*\n"
        "\ttagOpt = --no-tags\n"
    )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".necrod-tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class Mirror:
    """See the module docstring."""

    def __init__(self, path: Path, repo_url: str, git: GitRunner) -> None:
        self.path = path
        self.repo_url = repo_url
        self.git = git
        self._config_text = canonical_config(repo_url)

    @property
    def exists(self) -> bool:
        return (self.path / "HEAD").is_file() and (self.path / "objects").is_dir()

    def set_url(self, repo_url: str) -> None:
        self.repo_url = repo_url
        self._config_text = canonical_config(repo_url)
        if self.exists:
            _write_atomic(self.path / "config", self._config_text)

    # --- tamper ---------------------------------------------------------------------------------

    def restore_canonical(self) -> list[str]:
        """Put config, info/, hooks/ back as necrod wrote them; return what had changed."""
        changed: list[str] = []
        config = self.path / "config"
        try:
            current = config.read_text(errors="replace")
        except FileNotFoundError:
            current = None
        if current != self._config_text:
            changed.append("config")
            _write_atomic(config, self._config_text)
        for name in _EMPTY_DIRS:
            d = self.path / name
            if d.is_symlink() or (d.exists() and not d.is_dir()):
                changed.append(name)
                d.unlink()
            try:
                entries = list(d.iterdir())
            except FileNotFoundError:
                entries = []
            for entry in entries:
                changed.append(f"{name}/{entry.name}")
                _remove(entry)
            d.mkdir(exist_ok=True)
        for name in _FORBIDDEN:
            p = self.path / name
            if p.exists() or p.is_symlink():
                changed.append(name)
                _remove(p)
        return changed

    def slot_looks_whole(self, admin: str, slot_path: str) -> bool:
        """The allocation path's check, in five system calls: the slot's ``.git`` is a regular
        file naming its admin directory, which has a ``HEAD``. False means: look closer
        (``SlotGit.healthy`` and ``dotgit_problem`` say what is wrong)."""
        try:
            fd = os.open(os.path.join(slot_path, ".git"), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
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
        admin_dir = f"{self.path}/worktrees/{admin}"
        return text.strip() == os.fsencode(f"gitdir: {admin_dir}") and os.path.isfile(f"{admin_dir}/HEAD")

    def dotgit_problem(self, admin: str, slot_path: str) -> str | None:
        """Why the slot's ``.git`` file does not point at its admin directory, or None."""
        dotgit = Path(slot_path) / ".git"
        want = f"gitdir: {self.path / 'worktrees' / admin}"
        try:
            current = dotgit.read_text(errors="replace").strip() if not dotgit.is_symlink() else None
        except OSError:
            return "its .git file cannot be read"
        if current != want:
            return f"its .git file points elsewhere ({(current or 'a symlink')[:80]})"
        return None

    def restore_admin(self, admin: str, slot_path: str) -> list[str]:
        """Keep one worktree's admin directory pointing where necrod put it."""
        changed: list[str] = []
        d = self.path / "worktrees" / admin
        if not d.is_dir():
            return changed
        expected = {"commondir": "../..\n", "gitdir": f"{slot_path}/.git\n"}
        for name, text in expected.items():
            p = d / name
            try:
                current = p.read_text(errors="replace")
            except FileNotFoundError:
                current = None
            if current != text:
                changed.append(f"worktrees/{admin}/{name}")
                _write_atomic(p, text)
        for name in _ADMIN_FORBIDDEN:
            p = d / name
            if p.exists() or p.is_symlink():
                changed.append(f"worktrees/{admin}/{name}")
                _remove(p)
        dotgit = Path(slot_path) / ".git"
        want = f"gitdir: {d}\n"
        if not os.path.lexists(dotgit):
            return changed  # a broken slot: its cleanup rebuilds it
        try:
            current = (
                dotgit.read_text(errors="replace") if dotgit.is_file() and not dotgit.is_symlink() else None
            )
        except OSError:
            current = None
        if current != want:
            changed.append(f"{slot_path}/.git")
            _remove(dotgit)
            dotgit.write_text(want)
        return changed

    def fingerprint(self) -> str:
        """A cheap digest of everything ``restore_canonical`` guards, to skip it when unchanged."""
        h = hashlib.sha256()
        try:
            h.update((self.path / "config").read_bytes())
        except OSError:
            h.update(b"\0missing")
        for name in _EMPTY_DIRS:
            try:
                h.update(repr(sorted(os.listdir(self.path / name))).encode())
            except OSError:
                h.update(b"\0nodir")
        for name in _FORBIDDEN:
            h.update(b"1" if os.path.lexists(self.path / name) else b"0")
        return h.hexdigest()

    # --- creation, fetching, refs ---------------------------------------------------------------

    async def create(self, *, timeout: float, on_progress: Callable[[str], None]) -> None:
        """Clone the origin into a fresh bare mirror (into a temporary name, renamed at the end,
        so a crash never leaves a half mirror under the real name)."""
        tmp = self.path.with_name(self.path.name + ".new")
        if tmp.exists():
            await anyio.to_thread.run_sync(shutil.rmtree, tmp)
        await self.git.run(["init", "--quiet", "--bare", "--template=", "--", str(tmp)], timeout=60)
        # What init wrote is replaced by our own canonical files.
        keep = Mirror(tmp, self.repo_url, self.git)
        keep.restore_canonical()
        (tmp / "description").unlink(missing_ok=True)
        await self.git.run(
            ["fetch", "--progress", "--prune", "origin"],
            git_dir=tmp,
            timeout=timeout,
            network=True,
            on_stderr_line=on_progress,
        )
        os.replace(tmp, self.path)

    async def fetch(self, *, timeout: float, refspecs: list[str] | None = None) -> None:
        args = ["fetch", "--quiet", "--prune", "origin"]
        if refspecs:
            args = ["fetch", "--quiet", "origin", "--end-of-options", *refspecs]
        await self.git.run(args, git_dir=self.path, timeout=timeout, network=True)

    async def connectivity_problem(self, *, timeout: float) -> str | None:
        """What ``git fsck --connectivity-only`` says is missing, or None when nothing is."""
        result = await self.git.run(["fsck", "--connectivity-only", "--no-dangling", "--no-progress"],
                                    git_dir=self.path, timeout=timeout, check=False)  # fmt: skip
        if result.returncode == 0:
            return None
        lines = [line for line in (result.err + result.out).splitlines() if line.strip()]
        return "; ".join(lines[:3]) or f"git fsck exited {result.returncode}"

    async def refetch(self, *, timeout: float) -> None:
        """Fetch every object again (heals a mirror that lost objects)."""
        await self.git.run(["fetch", "--quiet", "--refetch", "--prune", "origin"], git_dir=self.path,
                           timeout=timeout, network=True)  # fmt: skip

    async def remote_head(self, *, timeout: float) -> str | None:
        """The origin's default branch (what its HEAD points at)."""
        result = await self.git.run(
            ["ls-remote", "--symref", "origin", "HEAD"], git_dir=self.path, timeout=timeout, network=True
        )
        return parse_symref(result.out)

    async def read_refs(self) -> dict[str, str]:
        result = await self.git.run(
            [
                "for-each-ref",
                "--format=%(objectname) %(*objectname) %(refname)",
                "refs/remotes/origin/",
                "refs/tags/",
            ],
            git_dir=self.path,
            timeout=120,
        )
        return parse_for_each_ref(result.out)

    async def has_commit(self, sha: str) -> str | None:
        """The full id of commit ``sha`` (abbreviations allowed) if the mirror has it."""
        result = await self.git.run(
            ["rev-parse", "--verify", "--quiet", "--end-of-options", f"{sha}^{{commit}}"],
            git_dir=self.path,
            timeout=30,
            check=False,
        )
        out = result.out.strip()
        return out if result.returncode == 0 and out else None

    async def salvage_refs(self) -> list[dict[str, str | int]]:
        result = await self.git.run(
            [
                "for-each-ref",
                "--sort=-committerdate",
                "--format=%(refname)%00%(objectname)%00%(committerdate:unix)%00%(contents:subject)",
                "refs/necrod/salvage/",
            ],
            git_dir=self.path,
            timeout=60,
        )
        out: list[dict[str, str | int]] = []
        for line in result.out.splitlines():
            parts = line.split("\0")
            if len(parts) == 4:
                ref, commit, date, subject = parts
                out.append(
                    {
                        "ref": ref,
                        "lease_id": ref.rsplit("/", 1)[-1],
                        "commit": commit,
                        "date": int(date or 0),
                        "subject": subject,
                    }
                )
        return out

    async def show_salvage(self, lease_id: str) -> dict[str, object] | None:
        """One salvage commit: what it holds and how to get it, or None if there is none."""
        ref = f"refs/necrod/salvage/{lease_id}"
        found = await self.git.run(
            ["rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}"],
            git_dir=self.path,
            timeout=30,
            check=False,
        )
        if found.returncode != 0:
            return None
        commit = found.out.strip()
        info = await self.git.run(
            ["log", "-1", "--format=%s%x00%ct%x00%P%x00%(trailers:key=Necrod-Start,valueonly)", commit, "--"],
            git_dir=self.path,
            timeout=30,
        )
        subject, date, parents, start = ([*info.out.split("\x00"), "", "", "", ""])[:4]
        start = start.strip() or (parents.split()[0] if parents.split() else "")
        files: list[dict[str, str]] = []
        if start:
            diff = await self.git.run(
                [
                    "diff-tree",
                    "--no-commit-id",
                    "-r",
                    "--name-status",
                    "--no-renames",
                    "-z",
                    start,
                    commit,
                    "--",
                ],
                git_dir=self.path,
                timeout=60,
            )
            fields = [f for f in diff.out.split("\0") if f]
            files = [{"status": fields[i], "path": fields[i + 1]} for i in range(0, len(fields) - 1, 2)]
        return {
            "ref": ref,
            "commit": commit,
            "start": start or None,
            "subject": subject,
            "date": int(date or 0),
            "files": files,
            "fetch": f"git fetch {self.path} {ref}",
        }

    # --- worktrees ------------------------------------------------------------------------------

    async def add_worktree(self, path: Path, admin: str, commit: str, *, timeout: float) -> None:
        """``git worktree add --detach`` at ``path``; leftovers of an earlier attempt go first."""
        stale_admin = self.path / "worktrees" / admin
        if path.exists() or path.is_symlink():
            await anyio.to_thread.run_sync(_remove, path)
        if stale_admin.exists():
            await anyio.to_thread.run_sync(_remove, stale_admin)
        path.parent.mkdir(parents=True, exist_ok=True)
        await self.git.run(
            ["worktree", "add", "--quiet", "--detach", "--", str(path), commit],
            git_dir=self.path,
            timeout=timeout,
        )
        dotgit = (path / ".git").read_text().strip()
        if dotgit != f"gitdir: {stale_admin}":
            raise OSError(f"git put the worktree's admin directory at {dotgit!r}, expected {stale_admin}")

    def owns_worktree(self, directory: Path) -> bool:
        """Whether ``directory`` is a worktree of this mirror, as necrod lays them out."""
        admin = self.path / "worktrees" / directory.name
        try:
            return (
                directory.name.isdigit()
                and (directory / ".git").read_text().strip() == f"gitdir: {admin}"
                and admin.is_dir()
            )
        except OSError:
            return False

    async def remove_worktree(self, path: Path, admin: str, *, timeout: float) -> None:
        if path.exists():
            result = await self.git.run(
                ["worktree", "remove", "--force", "--force", "--", str(path)],
                git_dir=self.path,
                timeout=timeout,
                check=False,
            )
            if result.returncode != 0:
                log.warning("worktree_remove_failed", path=str(path), error=result.err.strip())
        for leftover in (path, self.path / "worktrees" / admin):
            if leftover.exists() or leftover.is_symlink():
                await anyio.to_thread.run_sync(_remove, leftover)

    async def prune_worktrees(self) -> None:
        await self.git.run(["worktree", "prune"], git_dir=self.path, timeout=120)


class ProgressLog:
    """Turns git's progress lines into a log line every few seconds, not hundreds a second."""

    def __init__(self, pool: str, every_s: float = 2.0) -> None:
        self.pool = pool
        self.every_s = every_s
        self._last = 0.0

    def __call__(self, line: str) -> None:
        now = time.monotonic()
        done = "done" in line
        if done or now - self._last >= self.every_s:
            self._last = now
            log.info("clone_progress", pool=self.pool, progress=line.strip())
