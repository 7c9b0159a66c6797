"""Where necrod keeps its config, state and socket when nobody says otherwise.

Order for each: the command-line flag, then ``NECROD_CONFIG`` / ``NECROD_STATE_DIR`` /
``NECROD_SOCKET``, then systemd's ``$CONFIGURATION_DIRECTORY`` / ``$STATE_DIRECTORY`` /
``$RUNTIME_DIRECTORY``, then the XDG per-user directories. When ``$XDG_RUNTIME_DIR`` is not set
the socket goes to ``/tmp/necrod-<uid>/``, a directory necrod creates with mode 0700 and refuses
to use unless it is a real directory (not a symlink), owned by the user, mode 0700: in a shared
``/tmp`` another user may have made it first. Clients check it the same way before they use the
default socket, and check that the daemon answering there is their own uid or root.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

SOCKET_NAME = "necrod.sock"
CONFIG_NAME = "pools.yaml"
#: Where the system service (systemd/necrod.service) puts its socket.
SYSTEM_SOCKET = Path("/run/necrod") / SOCKET_NAME


def _first_dir(value: str | None) -> Path | None:
    # systemd joins several directories with ':'; the first is ours.
    if not value:
        return None
    return Path(value.split(":", 1)[0])


def _home(env: Mapping[str, str]) -> Path:
    return Path(env.get("HOME") or Path.home())


def state_dir(env: Mapping[str, str] = os.environ) -> Path:
    if env.get("NECROD_STATE_DIR"):
        return Path(env["NECROD_STATE_DIR"])
    systemd = _first_dir(env.get("STATE_DIRECTORY"))
    if systemd:
        return systemd
    base = env.get("XDG_STATE_HOME") or str(_home(env) / ".local" / "state")
    return Path(base) / "necrod"


def runtime_dir(env: Mapping[str, str] = os.environ) -> Path:
    systemd = _first_dir(env.get("RUNTIME_DIRECTORY"))
    if systemd:
        return systemd
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "necrod"
    return shared_tmp_dir()


def socket_path(env: Mapping[str, str] = os.environ) -> Path:
    """The daemon's socket: ``NECROD_SOCKET``, else ``<runtime dir>/necrod.sock``."""
    if env.get("NECROD_SOCKET"):
        return Path(env["NECROD_SOCKET"])
    return runtime_dir(env) / SOCKET_NAME


def client_socket_path(env: Mapping[str, str] = os.environ) -> Path:
    """Where a client looks: ``NECROD_SOCKET``, the per-user socket if present, else the system one."""
    if env.get("NECROD_SOCKET"):
        return Path(env["NECROD_SOCKET"])
    user = socket_path(env)
    if user.exists() or not SYSTEM_SOCKET.exists():
        return user
    return SYSTEM_SOCKET


def config_path(env: Mapping[str, str] = os.environ) -> Path | None:
    """The config file to load, or None when there is none (the embedded default applies)."""
    if env.get("NECROD_CONFIG"):
        return Path(env["NECROD_CONFIG"])
    systemd = _first_dir(env.get("CONFIGURATION_DIRECTORY"))
    if systemd:
        return systemd / CONFIG_NAME
    base = env.get("XDG_CONFIG_HOME") or str(_home(env) / ".config")
    candidate = Path(base) / "necrod" / CONFIG_NAME
    return candidate if candidate.exists() else None


def shared_tmp_dir() -> Path:
    """The per-user runtime directory of last resort, in a ``/tmp`` that every user can write:
    another user may have made it (or a symlink by its name) first."""
    return Path("/tmp") / f"necrod-{os.getuid()}"


def private_dir_problem(path: Path) -> str | None:
    """Why ``path`` is not a private directory of ours: it must be a directory itself (``lstat``:
    a symlink is refused wherever it points), owned by our uid, with no group or other bits."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return f"{path} does not exist"
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symlink (someone else may have planted it)"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid != os.getuid():
        return f"{path} belongs to uid {st.st_uid}, not to us (uid {os.getuid()})"
    if st.st_mode & 0o077:
        return f"{path} has mode {st.st_mode & 0o777:o}, not 0700"
    return None


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (mode 0700), or check that an existing one is ours and private
    (``private_dir_problem``); ``PermissionError`` says why not."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    problem = private_dir_problem(path)
    if problem is not None:
        raise PermissionError(f"refusing to use {problem}; remove it, or choose a socket with --socket")
