"""Would the next start accept this config? The ``daemon:`` keys that only a restart applies.

A reload cannot apply ``workspaces``, ``socket_group``, ``git``, ``allowed_protocols`` or
``metrics_listen`` to the running daemon, but it writes them into the config the next start
reads: a reload that accepted a ``socket_group`` naming no group left a daemon that would not
start again. So a reload that changes one of them checks it the way the start would use it, and
refuses the whole config when the start would fail.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import anyio

from necrod.core.config import DaemonConfig
from necrod.io.gitrun import GitRunner, GitVersionError, version_problem
from necrod.io.socketaccess import AccessPolicy

#: The ``daemon:`` keys a reload records but only a restart applies.
RESTART_ONLY = ("workspaces", "socket_group", "git", "allowed_protocols", "metrics_listen")


def restart_only_changed(old: DaemonConfig, new: DaemonConfig) -> list[str]:
    return [key for key in RESTART_ONLY if getattr(old, key) != getattr(new, key)]


async def start_problems(
    old: DaemonConfig, new: DaemonConfig, *, state_dir: Path, git: GitRunner
) -> list[str]:
    """Why a start would refuse ``new``, for each restart-only key that differs from ``old``
    (an unchanged one is in use right now: its metrics port is ours, for one)."""
    changed = restart_only_changed(old, new)
    problems: list[str | None] = []
    if "socket_group" in changed:
        problems.append(socket_group_problem(new.socket_group))
    if "workspaces" in changed:
        problems.append(workspaces_problem(Path(new.workspaces or state_dir / "workspaces")))
    if "git" in changed:
        problems.append(await git_problem(GitRunner(new.git, git.env)))
    if "metrics_listen" in changed and new.metrics_listen is not None:
        problems.append(await anyio.to_thread.run_sync(metrics_listen_problem, *new.metrics_listen))
    # allowed_protocols: the parser already checked the names and every pool's repo_url.
    return [f"daemon.{p}" for p in problems if p is not None]


def socket_group_problem(group: str | None) -> str | None:
    try:
        AccessPolicy.for_group(group)
    except ValueError as exc:
        return str(exc)
    return None


def workspaces_problem(path: Path) -> str | None:
    """Whether ``path`` is a directory necrod can use, or one it can create (as the start does)."""
    existing = path
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        what = "a dangling symlink" if existing.is_symlink() else "not a directory"
        return f"workspaces: {existing} is {what}, so {path} cannot be used"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"workspaces: {existing} is not writable by necrod (uid {os.getuid()})"
    return None


async def git_problem(git: GitRunner) -> str | None:
    try:
        version = await git.version()
    except GitVersionError as exc:
        return f"git: {exc}"
    problem = version_problem(version)
    return f"git: {problem}" if problem else None


def metrics_listen_problem(host: str, port: int) -> str | None:
    """Whether ``host:port`` can be bound now, as the start's listener would bind it."""
    where = f"metrics_listen: cannot listen on {host}:{port}"
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"{where}: {exc.strerror}"
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                return f"{where}: {exc.strerror or errno.errorcode.get(exc.errno or 0, exc)}"
    return None
