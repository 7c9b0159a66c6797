"""What the contained launchers (``container``, ``kubernetes``) share: the packages they need
(extras of their own: a plain pool needs neither), where the daemon's socket is seen inside,
and handing a slot's files to the runner's uid and back."""

from __future__ import annotations

import importlib.util
import os

#: launcher → (the extra that installs what it needs, the modules it imports).
EXTRAS = {
    "container": ("containers", ("aiodocker", "aiohttp")),
    "kubernetes": ("kubernetes", ("kubernetes_asyncio", "aiohttp")),
}


class MissingExtra(OSError):
    """A launcher's packages are not installed; the message names the extra to install."""


def missing_extra(launcher: str) -> str | None:
    """Why ``launcher`` cannot run here (a package it needs is not installed), or None. Looks the
    modules up without importing them (their import costs ~70 MB and half a second)."""
    extra, modules = EXTRAS.get(launcher, ("", ()))
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    if not absent:
        return None
    return (
        f"launcher {launcher} needs the package{'s' if len(absent) > 1 else ''} {', '.join(absent)}, "
        f"which {'are' if len(absent) > 1 else 'is'} not installed: pip install 'necrod[{extra}]'"
    )


#: The socket's directory, not the socket file, is mounted: a restarted daemon binds a new
#: socket there, which a mount of the old file would never see.
SOCKET_DIR_INSIDE = "/run/necrod"


def hand_over(root: str, uid: int, gid: int) -> int:
    """Give every file under ``root`` to ``uid:gid`` (symlinks themselves, never their targets);
    return how many changed hands."""
    changed = 0
    for directory, dirs, files in os.walk(root):
        for name in (directory, *(os.path.join(directory, n) for n in (*dirs, *files))):
            try:
                st = os.lstat(name)
                if st.st_uid != uid or st.st_gid != gid:
                    os.lchown(name, uid, gid)
                    changed += 1
            except FileNotFoundError:
                continue
    return changed


def socket_inside(socket: str) -> str:
    """The daemon's socket as a contained runner sees it (its directory mounted at /run/necrod)."""
    return f"{SOCKET_DIR_INSIDE}/{os.path.basename(socket)}"
