"""Which processes work inside a directory, read from /proc (Linux)."""

from __future__ import annotations

import os


def processes_in(directory: str) -> list[int]:
    """Pids whose working directory is ``directory`` or below it."""
    prefix = directory.rstrip("/") + "/"
    found: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if cwd == directory or cwd.startswith(prefix):
            found.append(int(entry))
    return found
