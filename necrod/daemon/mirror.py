"""One pool's bare mirror: cloned once, fetched in the background, kept canonical.

Layout under ``<workspaces>/<pool>/``::

    mirror.git/          bare repository; refs/remotes/origin/*, refs/tags/*, refs/necrod/salvage/*,
                         refs/necrod/slots/<n> (the commit each shared-clone slot stands on);
                         lfs/objects/ (with ``lfs: true``: the LFS store every slot smudges from)
    slots/<n>/           the slots (see ``slotkinds``)
    salvage-tmp/         scratch for salvage indexes

Every worktree shares the mirror's ``config``, ``info/`` and ``hooks/``: an agent in any slot can
write them (DESIGN.md, trap 7). necrod wrote them, remembers what they hold, and checks before
running git for the pool; a difference is restored and reported as tamper. Shared-clone slots
only borrow the mirror's objects: mounted read-only into a container, it is out of their reach.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
from collections.abc import Callable, Mapping
from pathlib import Path

import anyio
import structlog

from necrod.core.config import local_repo_path
from necrod.core.lfs import LfsMode, repo_config
from necrod.core.refs import parse_for_each_ref, parse_symref
from necrod.core.retention import SalvageRef
from necrod.io import slotfs
from necrod.io.gitrun import GitError, GitRunner

log = structlog.get_logger("necrod.mirror")

#: Where salvage refs live (``salvage.py`` writes them).
REF_PREFIX = "refs/necrod/salvage/"
#: Directories whose whole content necrod owns (kept empty).
_EMPTY_DIRS = ("hooks", "info")
#: Files that must not exist in the mirror: an alternate would let objects come from elsewhere.
_FORBIDDEN = ("objects/info/alternates", "objects/info/http-alternates", "commondir", "shallow")


def quote_config(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def canonical_config(repo_url: str, partial: str | None = None) -> str:
    """The mirror's config; with ``partial`` (a ``filter:``), a partial clone whose origin is
    the promisor remote: fetches take that filter, missing blobs are fetched from origin."""
    promisor = f"\tpromisor = true\n\tpartialclonefilter = {partial}\n" if partial else ""
    return (
        "[core]\n"
        f"\trepositoryformatversion = {1 if partial else 0}\n"
        "\tfilemode = true\n"
        "\tbare = true\n"
        "\tlogallrefupdates = false\n"
        '[remote "origin"]\n'
        f"\turl = {quote_config(repo_url)}\n"
        "\tfetch = +refs/heads/*:refs/remotes/origin/*\n"
        "\tfetch = +refs/tags/*:refs/tags/*\n"
        "\ttagOpt = --no-tags\n"
        f"{promisor}" + ("[extensions]\n\tpartialClone = origin\n" if partial else "")
    )


def _hard_linkable(origin: str, into: Path) -> bool:
    """Whether a local origin's objects can be hard-linked into a mirror at ``into``: the same
    file system, and none borrowed from elsewhere (an alternate would not come along)."""
    try:
        if os.stat(origin).st_dev != os.stat(into).st_dev:
            return False
    except OSError:
        return False
    return not any(os.path.exists(os.path.join(origin, d, "objects/info/alternates")) for d in ("", ".git"))


def remove_path(path: Path) -> None:
    """Remove a whole slot or mirror (a directory necrod made), never following a symlink in it."""
    slotfs.remove(path.parent, path.name)


def restore_files(
    root: Path, git_dir: str, config_text: str, empty_dirs: tuple[str, ...], forbidden: tuple[str, ...]
) -> list[str]:
    """Make ``git_dir/config`` (relative to the trusted ``root``) hold ``config_text``, the
    ``empty_dirs`` empty and the ``forbidden`` files absent; return what had to change. Nothing
    in ``git_dir`` is followed, blocked on or read past a small cap (see ``slotfs``)."""
    changed: list[str] = []
    config = f"{git_dir}/config"
    try:
        current = slotfs.read_bytes(root, config)
    except slotfs.UnsafePath:
        current = None
    if current != config_text.encode():
        changed.append("config")
        slotfs.write_atomic(root, config, config_text)
    for name in empty_dirs:
        rel = f"{git_dir}/{name}"
        if slotfs.ensure_dir(root, rel):
            changed.append(name)
        for entry in slotfs.list_dir(root, rel):
            changed.append(f"{name}/{entry}")
            slotfs.remove(root, f"{rel}/{entry}")
    changed += [name for name in forbidden if slotfs.remove(root, f"{git_dir}/{name}")]
    return changed


#: Directories of a repository that git writes into: a symlink among them (or below ``refs``
#: and ``logs``) would take git's writes, and ours, outside the repository.
_TREES = ("refs", "logs")


#: Files git reads in a repository (or a worktree's admin directory) that an agent may have
#: made a FIFO, a device or a huge sparse file: git would block on them or read for minutes.
GIT_FILES = ("HEAD", "index", "ORIG_HEAD", "FETCH_HEAD", "packed-refs", "commondir", "gitdir")
#: An index larger than this is not one a checkout of ours made: it goes (git rebuilds it), and
#: salvage does not copy it (200,000 entries take about 20 MB).
MAX_INDEX_BYTES = 256 << 20


def unsafe_files(root: Path, git_dir: str, names: tuple[str, ...] = GIT_FILES) -> list[str]:
    """Remove each of ``names`` in ``git_dir`` that is there but is not a regular file (or is an
    index too large to be ours); return what was removed. A repository left without its HEAD
    this way is broken, and is rebuilt by its cleanup."""
    removed = []
    for name in names:
        st = slotfs.lstat(root, f"{git_dir}/{name}")
        if st is None:
            continue
        if not stat.S_ISREG(st.st_mode) or (name == "index" and st.st_size > MAX_INDEX_BYTES):
            slotfs.remove(root, f"{git_dir}/{name}")
            removed.append(name)
    return removed


def unsafe_structure(root: Path, git_dir: str) -> list[str]:
    """Remove what stands where a repository's own directories should be: a symlink (or any
    non-directory) as ``objects`` or one of its subdirectories, and any symlink or special file
    under ``refs`` or ``logs``; return what was removed. Walks ``refs`` and ``logs`` (bounded):
    call it from a worker thread."""
    removed: list[str] = []
    objects = f"{git_dir}/objects"
    if slotfs.kind(root, objects) not in (None, "dir"):
        slotfs.remove(root, objects)
        removed.append("objects")
    for name, kind in slotfs.entries(root, objects):
        if kind not in ("dir", "file"):
            slotfs.remove(root, f"{objects}/{name}")
            removed.append(f"objects/{name}")
    for tree in _TREES:
        for found in slotfs.symlinks_below(root, f"{git_dir}/{tree}"):
            slotfs.remove(root, found)
            removed.append(found.removeprefix(f"{git_dir}/").removeprefix("./"))
    return removed


#: Submodules shown of one salvage (a salvage keeps at most 32).
MAX_SHOWN_SUBMODULES = 32
#: Commits whose submodule paths are remembered (a pool's base and the few before it).
GITLINKS_REMEMBERED = 8
#: How git says a lock file is in its way.
_LOCK_EXISTS = re.compile(r"Unable to create '([^']+\.lock)': File exists")


class Mirror:
    """See the module docstring."""

    def __init__(
        self, path: Path, repo_url: str, git: GitRunner, lfs: LfsMode = False, partial: str | None = None
    ) -> None:
        self.path = path
        self.repo_url = repo_url
        self.git = git
        #: The pool's ``lfs:``, and the commit whose LFS objects were last fetched (``daemon.lfs``).
        self.lfs: LfsMode = lfs
        self.lfs_fetched: str | None = None
        #: The pool's ``filter:`` (a partial clone), or None.
        self.partial = partial
        self._config_text = self._canonical()
        self._gitlinks: dict[str, list[str]] = {}
        #: (commit, sparse set) whose blobs are known to be here (``partial.backfill``).
        self.backfilled: set[tuple[str, tuple[str, ...]]] = set()

    def _canonical(self) -> str:
        return canonical_config(self.repo_url, self.partial) + repo_config(
            self.lfs, str(self.path), self.repo_url, own_repository=False
        )

    def lfs_config(self) -> str:
        """The LFS lines of a repository of the pool's own (a shared clone, a layer, a salvage
        scratch repository): the worktrees' are in the mirror's config."""
        return repo_config(self.lfs, str(self.path), self.repo_url, own_repository=True)

    @property
    def exists(self) -> bool:
        return (self.path / "HEAD").is_file() and (self.path / "objects").is_dir()

    def set_url(self, repo_url: str, lfs: LfsMode, partial: str | None) -> None:
        if lfs != self.lfs or repo_url != self.repo_url:
            self.lfs_fetched = None
        self.repo_url, self.lfs, self.partial = repo_url, lfs, partial
        self._config_text = self._canonical()
        if self.exists:
            slotfs.write_atomic(self.path, "config", self._config_text)

    def fetch_options(self) -> list[str]:
        """A partial mirror of a local origin: the origin's ``upload-pack`` reads only the
        origin's own config (git clears ours for it), so it is told on its command line to
        serve filters and single objects, as hosting services do."""
        if self.partial is None or local_repo_path(self.repo_url) is None:
            return []
        return [f"--upload-pack={shlex.quote(self.git.git)} -c uploadpack.allowFilter=true "
                "-c uploadpack.allowAnySHA1InWant=true upload-pack"]  # fmt: skip

    # --- tamper ---------------------------------------------------------------------------------

    def restore_canonical(self) -> list[str]:
        """Put config, info/, hooks/ back as necrod wrote them, and remove symlinks planted
        where git writes (an agent in a worktree slot can write the whole mirror); return what
        had changed."""
        changed = restore_files(self.path, ".", self._config_text, _EMPTY_DIRS, _FORBIDDEN)
        changed += unsafe_structure(self.path, ".")
        if "HEAD" in unsafe_files(self.path, ".", ("HEAD", "packed-refs", "FETCH_HEAD")):
            slotfs.write_atomic(self.path, "HEAD", "ref: refs/heads/main\n")
            changed.append("HEAD")
        return changed

    # --- creation, fetching, refs ---------------------------------------------------------------

    async def create(self, *, timeout: float, on_progress: Callable[[str], None]) -> None:
        """Clone the origin into a fresh bare mirror (into a temporary name, renamed at the end,
        so a crash never leaves a half mirror under the real name)."""
        tmp = self.path.with_name(self.path.name + ".new")
        if tmp.exists():
            await anyio.to_thread.run_sync(shutil.rmtree, tmp)
        local = local_repo_path(self.repo_url)
        if local is not None and self.partial is None and _hard_linkable(local, self.path.parent):
            # A local origin on this file system: its objects are hard-linked, not packed and
            # copied (symfony, 391 MB: 2.9 s instead of 50 s). Its branches go; the fetch below
            # makes the mirror's own refs, as for any origin.
            await self.git.run(["clone", "--quiet", "--bare", "--local", "--template=", "--", local, str(tmp)],
                               timeout=timeout)  # fmt: skip
            heads = await self.git.run(["for-each-ref", "--format=delete %(refname)", "refs/heads/"],
                                       git_dir=tmp, timeout=60)  # fmt: skip
            await self.git.run(["update-ref", "--stdin"], git_dir=tmp, timeout=60, input=heads.stdout)
        else:
            await self.git.run(["init", "--quiet", "--bare", "--template=", "--", str(tmp)], timeout=60)
        # What init (or clone) wrote is replaced by our own canonical files.
        keep = Mirror(tmp, self.repo_url, self.git, self.lfs, self.partial)
        keep._config_text = self._config_text  # the LFS lines name the mirror's final path
        keep.restore_canonical()
        (tmp / "description").unlink(missing_ok=True)
        await self.git.run(
            ["fetch", "--progress", "--prune", *self.fetch_options(), "origin"],
            git_dir=tmp,
            timeout=timeout,
            network=True,
            on_stderr_line=on_progress,
        )
        os.replace(tmp, self.path)

    async def fetch(self, *, timeout: float, refspecs: list[str] | None = None) -> None:
        """Fetch the origin (callers hold the pool's fetch lock: one fetch at a time). A fetch
        killed part-way leaves lock files on the refs it was updating; the next one would fail
        on them for ever, so a lock where only our fetch writes is removed and the fetch tried
        again, once."""
        args = ["fetch", "--quiet", "--prune", *self.fetch_options(), "origin"]
        if refspecs:
            args = ["fetch", "--quiet", *self.fetch_options(), "origin", "--end-of-options", *refspecs]
        try:
            await self.git.run(args, git_dir=self.path, timeout=timeout, network=True)
        except GitError as exc:
            lock = self._stale_fetch_lock(exc.stderr)
            if lock is None:
                raise
            log.warning("stale_fetch_lock_removed", mirror=str(self.path), lock=lock)
            slotfs.remove(self.path, lock)
            await self.git.run(args, git_dir=self.path, timeout=timeout, network=True)

    def _stale_fetch_lock(self, stderr: str) -> str | None:
        """The lock (relative to the mirror) a failed fetch names, if only a fetch writes there."""
        m = _LOCK_EXISTS.search(stderr)
        if m is None:
            return None
        rel = os.path.relpath(m.group(1), self.path)
        fetch_only = rel in ("FETCH_HEAD.lock", "packed-refs.lock") or rel.startswith(
            ("refs/remotes/", "refs/tags/")
        )
        return rel if fetch_only and not rel.startswith("..") else None

    async def connectivity_problem(self, *, timeout: float) -> str | None:
        """What ``git fsck --connectivity-only`` says is missing, or None when nothing is."""
        result = await self.git.run(["fsck", "--connectivity-only", "--no-dangling", "--no-progress"],
                                    git_dir=self.path, timeout=timeout, check=False)  # fmt: skip
        if result.returncode == 0:
            return None
        lines = [line for line in (result.err + result.out).splitlines() if line.strip()]
        return "; ".join(lines[:3]) or f"git fsck exited {result.returncode}"

    async def drop_lost_salvage(self, *, timeout: float) -> list[str]:
        """Delete the salvage refs whose objects are gone (an agent in a worktree slot can remove
        the mirror's objects): nothing can fetch them again, and a ref to a missing object keeps
        the mirror broken for every fetch after. The refs deleted."""
        listed = await self.git.run(["for-each-ref", "--format=%(objectname) %(refname)", REF_PREFIX],
                                    git_dir=self.path, timeout=60)  # fmt: skip
        lost = []
        for line in listed.lines():
            sha, _, ref = line.partition(" ")
            whole = await self.git.run(["rev-list", "--objects", "--quiet", "--end-of-options", sha, "--"],
                                       git_dir=self.path, timeout=timeout, check=False)  # fmt: skip
            if whole.returncode != 0:
                lost.append(ref)
        if lost:
            await self.git.run(["update-ref", "--stdin"], git_dir=self.path, timeout=60,
                               input="".join(f"delete {ref}\n" for ref in lost).encode())  # fmt: skip
        return lost

    async def refetch(self, *, timeout: float) -> None:
        """Fetch every object again (heals a mirror that lost objects)."""
        await self.git.run(["fetch", "--quiet", "--refetch", "--prune", *self.fetch_options(), "origin"],
                           git_dir=self.path, timeout=timeout, network=True)  # fmt: skip
        self.backfilled.clear()

    async def remote_head(self, *, timeout: float) -> str | None:
        """The origin's default branch (what its HEAD points at)."""
        result = await self.git.run(
            ["ls-remote", "--symref", "origin", "HEAD"], git_dir=self.path, timeout=timeout, network=True
        )
        return parse_symref(result.out)

    async def local_tags(self, origin: Mapping[str, str]) -> dict[str, str]:
        """Tags the mirror has that ``origin`` (its refs as last fetched, tags peeled) does not:
        an agent in a worktree slot made them. Full name → the object the tag names."""
        result = await self.git.run(["for-each-ref", "--format=%(objectname) %(*objectname) %(refname)",
                                     "refs/tags/"], git_dir=self.path, timeout=120)  # fmt: skip
        out = {}
        for line in result.lines():
            obj, peeled, name = ([*line.split(" ", 2), "", ""])[:3]
            if name and origin.get(name) != (peeled or obj):
                out[name] = obj
        return out

    async def put_back_tags(self, tags: Mapping[str, str]) -> None:
        """Tags a fetch pruned (origin never had them) made again, so an agent's tag lives until
        its lease is salvaged, not until the next fetch."""
        if tags:
            lines = "".join(f"update {name} {obj}\n" for name, obj in tags.items())
            await self.git.run(
                ["update-ref", "--stdin"], git_dir=self.path, timeout=120, input=lines.encode()
            )

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

    async def gitlinks(self, commit: str) -> list[str]:
        """The paths of the submodules (gitlinks) in ``commit``'s tree, read once per commit:
        every cleanup at a base asks, and most repositories have none."""
        found = self._gitlinks.get(commit)
        if found is None:
            found = [path for mode, _, path in await self.tree(commit) if mode == "160000"]
            if len(self._gitlinks) >= GITLINKS_REMEMBERED:
                self._gitlinks.pop(next(iter(self._gitlinks)))
            self._gitlinks[commit] = found
        return found

    async def tree(self, commit: str) -> list[tuple[str, str, str]]:
        """Every entry of ``commit``'s tree, recursively: (mode, object, path)."""
        listed = await self.git.run(["ls-tree", "-r", "-z", "--full-tree", "--end-of-options", commit],
                                    git_dir=self.path, timeout=120)  # fmt: skip
        out = []
        for entry in listed.stdout.split(b"\0"):
            meta, tab, path = entry.partition(b"\t")
            fields = meta.split()
            if tab and len(fields) == 3:
                out.append((fields[0].decode(), fields[2].decode(), path.decode("utf-8", "surrogateescape")))
        return out

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

    async def salvage_refs(self) -> list[SalvageRef]:
        # One trailers atom for both keys: git 2.39 mixes the options of two in one format.
        fmt = (
            "%(refname)%00%(objectname)%00%(committerdate:unix)%00%(contents:subject)%00"
            "%(trailers:key=Necrod-Bytes,key=Necrod-Uid,separator=%x01)"
        )
        result = await self.git.run(["for-each-ref", "--sort=-committerdate", f"--format={fmt}",
                                     "refs/necrod/salvage/"], git_dir=self.path, timeout=60)  # fmt: skip
        out = []
        for line in result.lines():
            parts = line.split("\0")
            if len(parts) == 5:
                ref, commit, date, subject, trailers = parts
                found = dict(t.partition(": ")[::2] for t in trailers.split("\x01"))
                out.append(SalvageRef(ref, ref.rsplit("/", 1)[-1], commit, int(date or 0), subject,
                                      _number(found.get("Necrod-Bytes", "")) or 0,
                                      _number(found.get("Necrod-Uid", ""))))  # fmt: skip
        return out

    async def prune_salvage(self, refs: list[str], *, timeout: float) -> None:
        """Delete these salvage refs, then let git drop what only they kept (objects younger
        than an hour stay: an agent in a worktree slot may be writing some right now)."""
        if not refs:
            return
        deletes = "".join(f"delete {ref}\n" for ref in refs if ref.startswith("refs/necrod/salvage/"))
        await self.git.run(
            ["update-ref", "--stdin"], git_dir=self.path, timeout=timeout, input=deletes.encode()
        )
        await self.git.run(["gc", "--quiet", "--prune=1.hour.ago"], git_dir=self.path, timeout=timeout)

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
            [
                "log",
                "-1",
                "--format=%s%x00%ct%x00%P%x00%(trailers:key=Necrod-Start,valueonly)%x00"
                "%(trailers:key=Necrod-Uid,valueonly,separator=)%x00"
                "%(trailers:key=Necrod-Submodule,valueonly)",
                commit,
                "--",
            ],
            git_dir=self.path,
            timeout=30,
        )
        subject, date, parents, start, uid, subs = ([*info.out.split("\x00"), "", "", "", "", "", ""])[:6]
        start = start.strip() or (parents.split()[0] if parents.split() else "")
        files = await self._changed_files(start, commit) if start else []
        submodules = []
        for line in subs.split("\n")[:MAX_SHOWN_SUBMODULES]:
            sub, _, path = line.strip().partition(" ")
            if sub and path:
                files_there = await self._changed_files(f"{sub}^", sub)
                submodules.append({"path": path, "commit": sub, "files": files_there})
        return {
            "ref": ref,
            "commit": commit,
            "start": start or None,
            "subject": subject,
            "date": int(date or 0),
            "files": files,
            "submodules": submodules,
            "fetch": f"git fetch {self.path} {ref}",
            "uid": _number(uid),
        }

    async def _changed_files(self, before: str, after: str) -> list[dict[str, str]]:
        diff = await self.git.run(["diff-tree", "--no-commit-id", "-r", "--name-status", "--no-renames", "-z",
                                   "--end-of-options", before, after, "--"], git_dir=self.path, timeout=60)  # fmt: skip
        fields = [f for f in diff.out.split("\0") if f]
        return [{"status": fields[i], "path": fields[i + 1]} for i in range(0, len(fields) - 1, 2)]


def _number(text: str) -> int | None:
    return int(text) if text.strip().isdigit() else None
