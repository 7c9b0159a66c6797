"""One daemon per socket and per state directory, enforced with ``flock`` (DESIGN.md, trap 5).

``create_unix_listener`` would silently replace a live daemon's socket; taking an exclusive lock
on a file beside it first makes a second daemon fail loudly, naming the running one's pid.
The lock lives as long as the process: the kernel drops it when the process dies, even by
SIGKILL, so a crashed daemon never blocks the next start.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class AlreadyRunning(Exception):
    """Another necrod holds the lock."""

    def __init__(self, path: Path, pid: int | None) -> None:
        self.path = path
        self.pid = pid
        who = f"necrod (pid {pid})" if pid else "another necrod"
        super().__init__(f"{who} is already running with {path}")


class InstanceLock:
    """An exclusive ``flock`` on ``path``, holding the owner's pid as its content."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            content = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise AlreadyRunning(self.path, int(content) if content.isdigit() else None) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
