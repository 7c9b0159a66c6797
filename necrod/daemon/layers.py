"""One pool's read-only layers, under ``<pool>/layers/``, that ``overlay`` slots stand on.

- ``base-<commit>``: a checkout of the commit with a ``.git`` of its own, laid out as a
  shared clone's (config, HEAD detached at the commit, objects borrowed from the mirror) and an
  index whose stat data matches the files: through the overlay, inode numbers pass through
  (all layers are on one file system) and git does not compare devices, so a slot's first
  ``git status`` re-hashes nothing. The mirror pins the commit (``refs/necrod/layers/``).
- ``prepared-<key>``: what the pool's prepare step wrote (``prepare.py``), its untracked files
  only: changes to tracked files, deletions and anything under ``.git`` are dropped, so the
  layer can stand on a later base with the same key.
- ``files-<digest>``: the pool's ``files:``, copied from the host.

A layer is made under a temporary name and renamed into place, so one that exists is whole;
one base layer per commit is built, however many slots wait for it. Layers no slot stands on
are removed (``remove_unused``). Only the daemon writes here; agents see layers through their
slot's overlay, where every write lands in the slot's upper directory.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import stat
import time
from collections.abc import Iterable
from pathlib import Path

import anyio
import structlog

from necrod.daemon.mirror import Mirror
from necrod.daemon.partial import backfill
from necrod.daemon.slotkinds import CloneSlots
from necrod.io import slotfs

log = structlog.get_logger("necrod.layers")

LAYER_PIN = "refs/necrod/layers/"
BASE, PREPARED, FILES = "base-", "prepared-", "files-"
#: A host file of ``files:`` is at most this big (they are secrets and settings, not data).
MAX_HOST_FILE_BYTES = 16 << 20
#: Temporary layers older than this are a crash's leftovers.
STALE_TMP_S = 3600.0
#: A layer made less than this ago, that no collection has seen in use yet, is not removed:
#: whoever made it may not have recorded yet that it stands on it (the pool's layers, a slot's).
YOUNG_S = 120.0
#: The extended attribute overlayfs marks a directory with that hides the layers below it.
OPAQUE = "trusted.overlay.opaque"


#: A base layer checked out with the LFS filter (``lfs: true``) holds other files than one
#: without (pointers): its name says so, and a pool whose ``lfs:`` changed builds a new one.
LFS_SUFFIX = ".lfs"


def base_name(commit: str, lfs: bool = False) -> str:
    return BASE + commit + (LFS_SUFFIX if lfs else "")


class Layers:
    def __init__(self, root: Path, mirror: Mirror) -> None:
        self.dir = root / "layers"
        self.mirror = mirror
        self.git = mirror.git
        self._locks: dict[str, anyio.Lock] = {}
        #: host path → ((device, inode, size, mtime), content digest): files read only when changed.
        self._seen: dict[str, tuple[tuple[int, int, int, int], str]] = {}
        #: Layers made by this daemon and not yet seen in use, with when (``time.monotonic``).
        self._made: dict[str, float] = {}

    def path(self, name: str) -> Path:
        return self.dir / name

    def exists(self, name: str) -> bool:
        return (self.dir / name).is_dir()

    def paths(self, names: Iterable[str]) -> list[Path]:
        return [self.dir / n for n in names]

    def _tmp(self, name: str) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        return self.dir / f".tmp-{name}-{secrets.token_hex(4)}"

    # --- base layers ----------------------------------------------------------------------------

    def base_name(self, commit: str) -> str:
        """The name of ``commit``'s base layer as the pool's ``lfs:`` has it now."""
        return base_name(commit, self.mirror.lfs is True)

    async def base(self, commit: str, *, timeout: float) -> str:
        """The name of ``commit``'s base layer, built first if it is not there yet (once: a
        second caller waits for the first)."""
        commit = commit.removesuffix(LFS_SUFFIX)
        name = self.base_name(commit)
        if self.exists(name):  # built whole or not at all (renamed into place): no lock's loop turn
            return name
        lock = self._locks.setdefault(name, anyio.Lock())
        async with lock:
            if not self.exists(name):
                await self._build_base(commit, name, timeout)
        return name

    async def _build_base(self, commit: str, name: str, timeout: float) -> None:
        started = time.perf_counter()
        tmp = self._tmp(name)
        clone = CloneSlots(self.mirror)
        # Pinned before anything stands on it: a gc in the mirror must never take its objects.
        slotfs.ensure_dir(self.mirror.path, LAYER_PIN)
        slotfs.write_atomic(self.mirror.path, LAYER_PIN + name.removeprefix(BASE), commit + "\n")
        try:
            await self.git.run(["init", "--quiet", "--template=", "--", str(tmp)], timeout=timeout)
            clone.restore(name, str(tmp))
            await backfill(self.mirror, commit, timeout=timeout)
            git_dir = tmp / ".git"
            await self.git.run(["checkout", "--quiet", "--force", "--detach", commit], git_dir=git_dir,
                               work_tree=tmp, cwd=tmp, timeout=timeout)  # fmt: skip
            # git (built without nanosecond timestamps) takes a file changed in the same second
            # as its index was written for "racily clean", hashes it again at every status and
            # rewrites the index: in a slot, into its upper, for every lease. So those files are
            # dated two seconds back and git hashes them once, here, into an index written after.
            await anyio.to_thread.run_sync(_date_back_racy, tmp)
            await self.git.run(["update-index", "-q", "--refresh", "--force-write-index"], git_dir=git_dir,
                               work_tree=tmp, cwd=tmp, timeout=timeout)  # fmt: skip
            os.rename(tmp, self.dir / name)
            self._made[name] = time.monotonic()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(shutil.rmtree, tmp, True)
            raise
        log.info("layer_built", layer=name, s=round(time.perf_counter() - started, 3))

    # --- prepared layers ------------------------------------------------------------------------

    def keep_prepared(self, key: str, upper: Path, tracked: set[str]) -> str:
        """Make the prepare step's upper directory the layer ``prepared-<key>`` (see the module
        docstring for what is dropped); run in a worker thread."""
        name = PREPARED + key
        _untracked_only(upper, tracked)
        os.rename(upper, self.dir / name)
        self._made[name] = time.monotonic()
        return name

    # --- files ----------------------------------------------------------------------------------

    def files(self, files: tuple[tuple[str, str], ...]) -> str | None:
        """The name of the layer holding the pool's ``files:`` as the host has them now (built
        when they changed); run in a worker thread. None when there are none."""
        if not files:
            return None
        digest = hashlib.sha256()
        for slot_path, host in files:
            digest.update(slot_path.encode() + b"\0" + self._digest(host).encode() + b"\0")
        name = FILES + digest.hexdigest()[:24]
        if self.exists(name):
            return name
        tmp = self._tmp(name)
        tmp.mkdir()
        try:
            for slot_path, host in files:
                data, mode = read_host_file(host)
                if os.path.dirname(slot_path):
                    slotfs.ensure_dir(tmp, os.path.dirname(slot_path))
                slotfs.write_atomic(tmp, slot_path, data, mode)
            os.rename(tmp, self.dir / name)
            self._made[name] = time.monotonic()
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return name

    def _digest(self, host: str) -> str:
        st = os.stat(host)
        sig = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        seen = self._seen.get(host)
        if seen is not None and seen[0] == sig:
            return seen[1]
        digest = hashlib.sha256(read_host_file(host)[0]).hexdigest()
        self._seen[host] = (sig, digest)
        return digest

    # --- removal --------------------------------------------------------------------------------

    def remove_unused(self, keep: set[str]) -> list[str]:
        """Remove every layer not in ``keep`` (and the pins of base layers that go), but one just
        made that was never in use (see ``YOUNG_S``); run in a worker thread. Returns the names
        removed."""
        gone: list[str] = []
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return gone
        now = time.time()
        for name in names:
            path = self.dir / name
            if name.startswith(".tmp-"):
                try:
                    if now - path.lstat().st_mtime > STALE_TMP_S:
                        shutil.rmtree(path, ignore_errors=True)
                except OSError:
                    pass
                continue
            if name in keep:
                self._made.pop(name, None)  # in use: from now on it goes when it is not
                continue
            if name.startswith(".probe-"):
                continue
            made = self._made.get(name)
            if made is not None and time.monotonic() - made < YOUNG_S:
                continue
            shutil.rmtree(path, ignore_errors=True)
            if name.startswith(BASE):
                slotfs.remove(self.mirror.path, LAYER_PIN + name.removeprefix(BASE))
            gone.append(name)
        return gone

    def pinned_but_gone(self) -> list[str]:
        """Commits pinned for a base layer that is no longer on disk (after a crash)."""
        return [c for c in slotfs.list_dir(self.mirror.path, LAYER_PIN) if not self.exists(base_name(c))]


def _date_back_racy(root: Path) -> None:
    """Date the files of a fresh checkout that are as new as its index (to the second) two
    seconds before it: the only ones git would take for racily clean."""
    racy_from = int(os.stat(root / ".git" / "index").st_mtime)
    when = racy_from - 2
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath == str(root):
            dirnames[:] = [d for d in dirnames if d != ".git"]
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.lstat(path).st_mtime >= racy_from:
                os.utime(path, (when, when), follow_symlinks=False)


def read_host_file(host: str) -> tuple[bytes, int]:
    fd = os.open(host, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{host} is not a regular file")
        if st.st_size > MAX_HOST_FILE_BYTES:
            raise OSError(f"{host} is {st.st_size} bytes; a file of files: is at most {MAX_HOST_FILE_BYTES}")
        data = os.read(fd, MAX_HOST_FILE_BYTES + 1)
    finally:
        os.close(fd)
    return data, stat.S_IMODE(st.st_mode) & 0o755


def _untracked_only(upper: Path, tracked: set[str]) -> None:
    """Drop from an overlay upper what would not stand on another base: ``.git``, whiteouts
    (deletions), tracked files, and the opacity of directories (which would hide a later
    base's files)."""
    shutil.rmtree(upper / ".git", ignore_errors=True)
    for dirpath, dirnames, filenames in os.walk(upper):
        rel_dir = os.path.relpath(dirpath, upper)
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        try:
            os.removexattr(dirpath, OPAQUE, follow_symlinks=False)
        except OSError:
            pass
        for name in list(dirnames):
            full = os.path.join(dirpath, name)
            if os.path.islink(full):  # os.walk lists a symlink to a directory among them
                dirnames.remove(name)
                filenames.append(name)
        for name in filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            whiteout = stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
            if whiteout or rel_dir + name in tracked:
                os.unlink(full)
