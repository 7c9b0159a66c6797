"""Who may connect to the socket and who is an admin: the socket file made with its final mode,
the peer's credentials (``SO_PEERCRED``), and group membership."""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from necrod.proto.router import Peer


def peer_credentials(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid=pid, uid=uid, gid=gid)


def _group_id(key: str, group: str | None) -> int | None:
    if group is None:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"{key} {group!r} does not exist") from None


def in_group(peer: Peer, gid: int) -> bool:
    """Whether the peer's uid belongs to ``gid`` (its primary group or a listed member)."""
    if peer.gid == gid:
        return True
    try:
        user = pwd.getpwuid(peer.uid)
        entry = grp.getgrgid(gid)
    except KeyError:
        return False
    return user.pw_gid == gid or user.pw_name in entry.gr_mem


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """Who may connect: the daemon's uid, root, members of ``group`` and of ``admin_gid``.
    Who is an admin (admin methods, every lease and task): the daemon's uid, root, and members
    of ``admin_gid`` (``daemon.admin_group``)."""

    uid: int
    gid: int | None = None
    group_name: str | None = None
    admin_gid: int | None = None

    @classmethod
    def for_group(cls, group: str | None, admin_group: str | None = None) -> AccessPolicy:
        return cls(
            os.getuid(),
            _group_id("socket_group", group),
            group,
            _group_id("admin_group", admin_group),
        )

    def with_admin_group(self, admin_group: str | None) -> AccessPolicy:
        """This policy with another admin group (it changes on reload); ``ValueError`` if none such."""
        return dataclasses.replace(self, admin_gid=_group_id("admin_group", admin_group))

    def is_admin(self, peer: Peer) -> bool:
        if peer.uid in (0, self.uid):
            return True
        return self.admin_gid is not None and in_group(peer, self.admin_gid)

    def allows(self, peer: Peer) -> bool:
        if self.is_admin(peer):
            return True
        return self.gid is not None and in_group(peer, self.gid)


def bind_unix_socket(path: Path, policy: AccessPolicy, backlog: int = 512) -> socket.socket:
    """Bind and listen on ``path`` with its final mode from the start (no window where the
    umask's mode applies). The caller holds the socket's instance lock: any file at ``path``
    is a leftover of a dead daemon."""
    mode = 0o660 if policy.gid is not None else 0o600
    if path.is_socket():
        path.unlink()
    elif path.exists():
        raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(os.fspath(path))
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    if policy.gid is not None and os.stat(path).st_gid != policy.gid:
        # Not when it has the group already (a setgid directory): the unit filters chown.
        os.chown(path, -1, policy.gid)
    os.chmod(path, mode)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock
