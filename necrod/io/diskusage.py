"""Disk use of a directory tree, as du counts it: allocated blocks, each inode once.

``du`` runs as a process of its own: walking a large checkout in Python would hold the
interpreter for tens of milliseconds, and every request waits behind it.
"""

from __future__ import annotations

import subprocess

import anyio


async def disk_usage(root: str) -> int | None:
    """Bytes allocated under ``root`` (not following symlinks), or None if it cannot be measured."""
    try:
        result = await anyio.run_process(["du", "-sk", "--", root], check=False, stderr=subprocess.DEVNULL)
    except OSError:
        return None
    field = result.stdout.split(b"\t", 1)[0].strip()
    return int(field) * 1024 if field.isdigit() else None
