"""Scratch space and child processes of one bench run, all removed at the end, even on Ctrl-C.

``Scratch`` owns a short directory under /tmp (Unix socket paths must stay under 108 bytes) and
every subprocess started through it; ``close`` runs the clean-ups registered with ``at_close``
(what lives outside the directory: containers, images), stops the processes (SIGTERM, then
SIGKILL), detaches every mount under the directory (the overlay slots a daemon mounted: they
outlive it) and deletes the directory. Children also get ``PR_SET_PDEATHSIG``, so a bench killed
with SIGKILL does not leave a daemon behind (its mounts, though, stay: ``umount -l`` them).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class Scratch:
    def __init__(self, keep: bool = False) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="nb-", dir="/tmp"))
        self.keep = keep
        self.procs: list[subprocess.Popen[bytes]] = []
        self.cleanups: list[Callable[[], None]] = []

    def path(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def spawn(
        self, argv: list[str], *, log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=out, env=env, cwd=cwd, preexec_fn=_die_with_parent,
                start_new_session=True,
            )  # fmt: skip
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if proc in self.procs:
            self.procs.remove(proc)

    def at_close(self, cleanup: Callable[[], None]) -> None:
        """Run ``cleanup`` at ``close`` (last registered first, before the processes stop)."""
        self.cleanups.append(cleanup)

    def close(self) -> None:
        while self.cleanups:
            with contextlib.suppress(Exception):
                self.cleanups.pop()()
        for proc in list(self.procs):
            with contextlib.suppress(Exception):
                self.stop(proc, timeout=10)
        # Even with --keep: a mount left behind would outlive the bench.
        unmount_under(self.root)
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)


def raise_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt, so the same cleanup runs for both."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def mounts_under(root: Path) -> list[str]:
    """The mount points at or under ``root`` in /proc/self/mounts, deepest first."""
    top = os.path.realpath(root)
    found = []
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                # The kernel writes space, tab, newline and backslash in a path as octal escapes.
                target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
                if target == top or target.startswith(top + "/"):
                    found.append(target)
    except OSError:
        return []
    return sorted(found, key=lambda t: t.count("/"), reverse=True)


def unmount_under(root: Path) -> None:
    """``umount -l`` every mount at or under ``root`` (a daemon's overlays outlive it)."""
    for target in mounts_under(root):
        subprocess.run(["umount", "-l", target], capture_output=True)


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def env_without_socket() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NECROD_SOCKET", None)
    return env
