"""What the contained launchers (``container``, ``kubernetes``) share: where the daemon's socket
is seen inside, and handing a slot's files to the runner's uid and back."""

from __future__ import annotations

import os

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
