"""``overlay`` slots: copy-on-write overlays of read-only layers, reset by dropping the upper.

Each slot is an overlay (``io/overlay``) mounted at ``slots/<n>`` of the pool's layers
(``layers.py``; topmost first: the pool's ``files:``, the prepare step's output, a checkout at
the base commit) under ``uppers/<n>/upper``, the slot's own. The base layer carries a ``.git``
laid out as a shared clone's, so the slot is a repository of its own (own config, hooks, index
and refs; objects borrowed from the mirror), and container runners can use it as they use a
shared clone. Everything an agent writes, in its files or its ``.git``, lands in the upper.

- **Reset is dropping the upper**: the overlay is detached, ``uppers/<n>`` renamed into
  ``trash/`` (removed later, off the critical path: ``tidy``), a new empty upper made and the
  overlay mounted again on the pool's current layers. Its cost does not depend on the size of
  the repository or of what the agent left. Salvage has run before, on the overlay view.
- **A base move** is the same remount on the new base's layer (built once per pool).
- **Restart**: mounts outlive the daemon. One that is gone (a reboot) is mounted again on the
  slot's recorded layers and its upper as it is (``mount_again``): a held lease's upper is never
  dropped; an idle slot that is not mounted is rebuilt.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

import anyio
import structlog

from necrod.daemon.layers import BASE, OPAQUE, Layers
from necrod.daemon.mirror import Mirror, remove_path
from necrod.daemon.slotkinds import CloneSlots, described_drift
from necrod.io import overlay, slotfs
from necrod.io.gitrun import GitRunner

#: Directories of an idle slot's upper a grant looks at for what was written there.
WRITTEN_LOOK = 8
#: ``_first_written``'s answer when it stopped at its limit with directories left to look at.
_NOT_SEEN_ALL = object()

log = structlog.get_logger("necrod.slots")


class OverlaySlots:
    name = "overlay"
    resets_with_git = False

    def __init__(
        self, mirror: Mirror, layers: Layers, root: Path, top: Callable[[], tuple[str, ...]]
    ) -> None:
        self.mirror = mirror
        self.git: GitRunner = mirror.git
        self.layers = layers
        self.uppers = root / "uppers"
        self.trash = root / "trash"
        #: The layers above the base that a slot mounted now stands on (files, prepared output).
        self._top = top
        self._clone = CloneSlots(mirror)

    def git_dir(self, admin: str, path: str) -> Path:
        return Path(path) / ".git"

    def git_dir_at(self, admin: str, path: str) -> tuple[Path, str]:
        return Path(path), ".git"

    def problem(self, admin: str, path: str) -> str | None:
        if slotfs.kind(os.path.dirname(path), os.path.basename(path)) != "dir":
            return "its directory is gone"
        if not overlay.is_mounted(path):
            return "its overlay is not mounted"
        return self._clone.problem(admin, path)

    def looks_whole(self, admin: str, path: str) -> bool:
        return overlay.is_mounted(path) and self._clone.looks_whole(admin, path)

    def pointer_problem(self, admin: str, path: str) -> str | None:
        return self._clone.pointer_problem(admin, path)

    def restore(self, admin: str, path: str) -> list[str]:
        """As a shared clone's, through the overlay (what it writes lands in the upper)."""
        if not overlay.is_mounted(path):
            return []
        return self._clone.restore(admin, path)

    def owns(self, directory: Path) -> bool:
        return directory.name.isdigit() and (self.uppers / directory.name).is_dir()

    # --- mounting -------------------------------------------------------------------------------

    async def _stack(self, commit: str, timeout: float) -> tuple[str, ...]:
        base = await self.layers.base(commit, timeout=timeout)
        return (*(n for n in self._top() if self.layers.exists(n)), base)

    def _mount_fresh(self, path: str, admin: str, stack: tuple[str, ...]) -> None:
        """Detach what is mounted at ``path``, move its upper to the trash, mount ``stack``
        under a new empty upper."""
        target = Path(path)
        overlay.unmount(target)
        slot_upper = self.uppers / admin
        if slot_upper.exists():
            self.trash.mkdir(parents=True, exist_ok=True)
            os.rename(slot_upper, self.trash / f"{admin}-{secrets.token_hex(4)}")
        (slot_upper / "upper").mkdir(parents=True)
        (slot_upper / "work").mkdir()
        if target.is_symlink() or target.exists():
            # Not mounted now: what is there (an earlier kind's slot, a half-made one) goes.
            remove_path(target)
        target.mkdir(parents=True)
        overlay.mount(target, self.layers.paths(stack), slot_upper / "upper", slot_upper / "work")

    async def add(
        self, path: Path, admin: str, commit: str, *, timeout: float, sparse: tuple[str, ...] = ()
    ) -> tuple[str, ...]:
        """A fresh upper on the pool's layers (``sparse`` is refused for overlay pools)."""
        stack = await self._stack(commit, timeout)
        await anyio.to_thread.run_sync(self._mount_fresh, str(path), admin, stack)
        return stack

    async def reset(
        self, admin: str, path: str, commit: str, clean_flags: str, *, timeout: float,
        sparse: tuple[str, ...] = (),
    ) -> tuple[str, ...]:  # fmt: skip
        """A fresh upper on the pool's current layers at ``commit`` (``clean_flags`` mean
        nothing here: what the prepare step made is in a layer, not in the upper)."""
        stack = await self._stack(commit, timeout)
        await anyio.to_thread.run_sync(self._mount_fresh, path, admin, stack)
        return stack

    async def move(
        self, admin: str, path: str, commit: str, *, timeout: float, sparse: tuple[str, ...] = ()
    ) -> tuple[str, ...]:
        return await self.reset(admin, path, commit, "", timeout=timeout)

    async def mount_again(self, admin: str, path: str, layers: tuple[str, ...]) -> bool:
        """After a restart: the slot's overlay, mounted again on its recorded layers with its
        upper as it is, when it is not mounted (a reboot). A missing base layer is built again;
        a missing upper layer is left out. Whether it had to be mounted."""
        if overlay.is_mounted(path) or not layers:
            return False
        stack = list(layers)
        for name in layers:
            if name.startswith(BASE) and not self.layers.exists(name):
                await self.layers.base(name.removeprefix(BASE), timeout=3600)
        stack = [n for n in stack if self.layers.exists(n)]
        await anyio.to_thread.run_sync(self._mount_as_was, admin, path, tuple(stack))
        log.info("overlay_mounted_again", slot=path, layers=stack)
        return True

    async def remount(self, admin: str, path: str, layers: tuple[str, ...]) -> None:
        """Mount again a slot that ``detach_if_unused`` left unmounted, as it was (its work
        is to be salvaged through it)."""
        await anyio.to_thread.run_sync(self._mount_as_was, admin, path, layers)

    def _mount_as_was(self, admin: str, path: str, stack: tuple[str, ...]) -> None:
        slot_upper = self.uppers / admin
        (slot_upper / "upper").mkdir(parents=True, exist_ok=True)
        (slot_upper / "work").mkdir(exist_ok=True)
        Path(path).mkdir(parents=True, exist_ok=True)
        overlay.mount(Path(path), self.layers.paths(stack), slot_upper / "upper", slot_upper / "work")

    async def remove(self, path: Path, admin: str, *, timeout: float) -> None:
        def remove() -> None:
            overlay.unmount(path)
            if path.exists() or path.is_symlink():
                remove_path(path)
            shutil.rmtree(self.uppers / admin, ignore_errors=True)

        await anyio.to_thread.run_sync(remove)

    async def prune(self) -> None:
        """What resets left in the trash, removed."""
        await self.tidy()

    async def tidy(self) -> None:
        """Remove the uppers resets dropped (in a worker thread: their size is the agents')."""
        if self.trash.is_dir():
            await anyio.to_thread.run_sync(_empty, self.trash)

    def detach_if_unused(self, admin: str, path: str, layers: tuple[str, ...]) -> bool:
        """Whether no process works in the slot: the kernel refuses to unmount an overlay in
        use. One that is not is left unmounted (a reset mounts a fresh one; ``remount`` puts
        it back). Run in a worker thread."""
        if not layers or not all(self.layers.exists(n) for n in layers):
            return False
        return overlay.unmount_if_unused(Path(path))

    async def unused(self, admin: str, path: str, layers: tuple[str, ...]) -> bool:
        """Whether no process works in the slot (``detach_if_unused``); one that is not is
        mounted again at once, on the same layers and upper."""

        def check() -> bool:
            if not self.detach_if_unused(admin, path, layers):
                return False
            self._mount_as_was(admin, path, layers)
            return True

        return await anyio.to_thread.run_sync(check)

    def untouched(self, admin: str, path: str) -> bool:
        """Whether the lease changed nothing: its upper holds directories only (what copying a
        directory up leaves), none of them opaque. Run in a worker thread."""
        return self._first_written(admin, limit=None) is None

    async def drift(self, admin: str, path: str, commit: str, *, timeout: float) -> str | None:
        """How a just-reset slot differs from its layers: whatever its upper holds but
        directories (its layers are read-only, and the base layer is a checkout at ``commit``).
        The upper was made empty a moment ago: a few directories are looked at here, and only
        an upper with more than that is walked, in a worker thread."""
        found = self._first_written(admin, limit=WRITTEN_LOOK)
        if found is _NOT_SEEN_ALL:
            found = await anyio.to_thread.run_sync(lambda: self._first_written(admin, limit=None))
        return described_drift([found]) if isinstance(found, str) else None

    def written(self, admin: str) -> str | None:
        """What was written into an idle slot since its reset, looked for at each grant: its
        upper is empty then, so this is one directory read (a deep upper is not walked here)."""
        found = self._first_written(admin, limit=WRITTEN_LOOK)
        return described_drift([found]) if isinstance(found, str) else None

    def _first_written(self, admin: str, limit: int | None) -> str | object | None:
        """The first thing in the slot's upper that is not a plain directory (a file, a link,
        an opaque directory), relative to it; None when there is none; ``_NOT_SEEN_ALL`` when
        there is none among the first ``limit`` directories and more are left."""
        upper = self.uppers / admin / "upper"
        for n, (dirpath, dirnames, filenames) in enumerate(os.walk(upper)):
            if limit is not None and n >= limit:
                return _NOT_SEEN_ALL
            rel = os.path.relpath(dirpath, upper)
            if filenames:
                return os.path.normpath(os.path.join(rel, filenames[0]))
            link = next((d for d in dirnames if os.path.islink(os.path.join(dirpath, d))), None)
            if link is not None:
                return os.path.normpath(os.path.join(rel, link))
            try:
                if os.getxattr(dirpath, OPAQUE, follow_symlinks=False):
                    return rel + "/ (opaque)"
            except OSError:
                pass
        return None

    def own_disk(self, admin: str, path: str) -> str:
        """Where the slot's own disk use is: its upper (the layers are shared)."""
        return str(self.uppers / admin)

    # --- as a shared clone --------------------------------------------------------------------------

    def pin(self, admin: str, commit: str) -> None:
        """Nothing to do: the base layer pins its commit, and a slot's commits are in its upper."""

    def object_dirs(self, admin: str, path: str) -> list[Path]:
        return self._clone.object_dirs(admin, path)

    async def delete_branch(self, admin: str, path: str, branch: str, *, timeout: float) -> None:
        await self._clone.delete_branch(admin, path, branch, timeout=timeout)

    def forget(self, admin: str, path: str) -> None:
        """Nothing to do: what a lease made in the slot's repository was in the dropped upper."""


def _empty(directory: Path) -> None:
    for entry in os.listdir(directory):
        shutil.rmtree(directory / entry, ignore_errors=True)
