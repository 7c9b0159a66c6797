"""Overlay mounts (overlayfs) for copy-on-write slots: mount, unmount, and whether a path is one.

A slot of an ``overlay`` pool is an overlay of read-only layers (the lowest first: a checkout at
the base commit, the prepare step's output, the pool's ``files:``) under an upper directory of
its own. Mounted ``nosuid,nodev`` (an agent's setuid file or device node means nothing there)
and ``volatile`` (no sync of the upper at unmount: a reset drops it anyway; after a machine
crash, not a daemon crash, the kernel refuses the old upper until its ``incompat`` marker goes,
see ``mount``).

Every call here blocks in the kernel: callers run them in a worker thread. Needs
``CAP_SYS_ADMIN`` (root, or the capability alone: the shipped systemd unit gives it to the
``necrod`` user as an ambient capability); ``probe`` says what is missing. That capability is
necrod's alone: ``keep_capabilities_to_ourselves`` keeps what necrod starts from inheriting it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

MS_NOSUID = 0x2
MS_NODEV = 0x4
MNT_DETACH = 0x2
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
#: Characters overlayfs gives a meaning in its options (layer separators, option separators).
_SPECIAL = (",", ":", "\\", "=")


class MountError(OSError):
    """An overlay could not be mounted (or unmounted); ``errno`` says why."""


def _option_path(path: Path) -> str:
    text = str(path)
    if any(c in text for c in _SPECIAL):
        raise MountError(errno.EINVAL, f"an overlay layer path may not contain , : \\ or =: {text}")
    return text


def keep_capabilities_to_ourselves() -> None:
    """Clear this process's ambient capabilities, so that nothing necrod starts (git, tmux,
    runners and whatever they start) inherits them; necrod keeps its own (its permitted and
    effective sets do not change). The systemd unit gives the ``necrod`` user ``CAP_SYS_ADMIN``
    as an ambient capability for overlay mounts, and a runner holding it could mount over
    anything on the host. Capabilities are per thread: this is called before any thread is
    started, and threads started later inherit the cleared set. A kernel without ambient
    capabilities (before 4.3) has nothing to clear: its error is ignored."""
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)


def mount(target: Path, lower: Sequence[Path], upper: Path, work: Path) -> None:
    """Mount an overlay of ``lower`` (topmost first) under ``upper`` at ``target``.

    Error handling: a ``work`` directory left by a machine crash holds ``work/incompat/volatile``,
    and the kernel refuses it until it is removed: it is removed and the mount tried once more
    (the upper's content may be incomplete; it is salvaged all the same)."""
    options = (
        f"lowerdir={':'.join(_option_path(p) for p in lower)},upperdir={_option_path(upper)},"
        f"workdir={_option_path(work)},volatile"
    )
    for attempt in (1, 2):
        if (
            _libc.mount(b"overlay", os.fsencode(target), b"overlay", MS_NOSUID | MS_NODEV, options.encode())
            == 0
        ):
            return
        err = ctypes.get_errno()
        stale = work / "work" / "incompat" / "volatile"
        if attempt == 1 and err == errno.EINVAL and stale.exists():
            shutil.rmtree(work / "work", ignore_errors=True)
            continue
        raise MountError(err, f"cannot mount an overlay on {target}: {os.strerror(err)}")


def unmount(target: Path) -> bool:
    """Detach the overlay at ``target`` (lazily: nothing of ours works in it by now); whether
    one was mounted there."""
    if _libc.umount2(os.fsencode(target), MNT_DETACH) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return False  # not a mount point (any more), or gone
    raise MountError(err, f"cannot unmount {target}: {os.strerror(err)}")


def unmount_if_unused(target: Path) -> bool:
    """Unmount the overlay at ``target`` only if nothing uses it (no process has a file open
    there, its working directory or root there, or a file of it mapped): whether it did.
    The kernel answers in one call what a scan of /proc takes tens of milliseconds to tell."""
    if _libc.umount2(os.fsencode(target), 0) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EBUSY, errno.EINVAL, errno.ENOENT):
        return False  # in use, not mounted, or gone: the caller looks the long way
    raise MountError(err, f"cannot unmount {target}: {os.strerror(err)}")


def is_mounted(target: str | os.PathLike[str]) -> bool:
    """Whether ``target`` is a mount point (its device differs from its parent's); nothing
    is followed, so a symlink planted there is not one."""
    path = os.fspath(target)
    try:
        here = os.lstat(path)
        parent = os.lstat(os.path.dirname(path.rstrip("/")) or "/")
    except OSError:
        return False
    return here.st_dev != parent.st_dev and not os.path.islink(path)


def probe(directory: Path) -> str | None:
    """Mount and unmount a small overlay under ``directory``: None when that works, else what
    is missing, in words an operator can act on."""
    directory.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".probe-", dir=directory))
    try:
        parts = {name: scratch / name for name in ("lower", "upper", "work", "mnt")}
        for p in parts.values():
            p.mkdir()
        try:
            mount(parts["mnt"], [parts["lower"]], parts["upper"], parts["work"])
        except MountError as exc:
            return _why(exc.errno, directory)
        unmount(parts["mnt"])
        return None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _why(err: int | None, directory: Path) -> str:
    if err in (errno.EPERM, errno.EACCES):
        return (
            "mounting an overlay needs CAP_SYS_ADMIN: run necrod as root or with that capability (the "
            "shipped systemd unit gives it), or in a user namespace that may mount (kernel 5.11 or later)"
        )
    if err == errno.ENODEV:
        return "the kernel has no overlay file system (load the overlay module: modprobe overlay)"
    if err == errno.EINVAL:
        return f"the file system of {directory} cannot hold an overlay's upper directory"
    return f"mounting an overlay failed: {os.strerror(err or 0)}"
