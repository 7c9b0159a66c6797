"""Which of a slot's changed paths a salvage takes, within the pool's limits, and which it leaves
out (and why): pure decisions over ``git status`` output, each path looked at with one ``lstat``
that follows no link."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field

from necrod.core.config import SalvageLimits
from necrod.io import slotfs
from necrod.io.gitrun import GitResult


@dataclass(slots=True)
class Plan:
    """What of the changed paths goes in, and what is left out."""

    take: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes: int = 0


#: The most of a ``git status`` listing a salvage reads: some hundreds of thousands of paths,
#: far past any ``salvage_max_files``. An agent decides how long it is.
MAX_STATUS_BYTES = 64 << 20


def changed_paths(status: GitResult) -> list[tuple[str, str]]:
    """``(xy, path)`` from ``git status --porcelain=v1 -z --no-renames``."""
    return [(e[:2].decode(), os.fsdecode(e[3:])) for e in status.entries() if len(e) > 3]


#: What a salvage whose ``git status`` listing was cut says it left out.
STATUS_CUT = f"the paths past the first {MAX_STATUS_BYTES >> 20} MiB of git status (not looked at)"


def plan(root: str, changed: list[tuple[str, str]], limits: SalvageLimits) -> Plan:
    """Which changed paths fit the limits, in path order; run in a worker thread (one
    ``lstat`` per path, none following a link)."""
    p = Plan()
    for xy, path in sorted(changed, key=lambda c: c[1]):
        rel = path.rstrip("/")
        if "D" in xy and xy != "??":
            p.take.append(rel)  # a deletion costs nothing
            continue
        try:
            st = slotfs.lstat(root, rel)
        except OSError:
            p.skipped.append(f"{json.dumps(rel)} (beyond a symlink)")
            continue
        if st is None:
            p.take.append(rel)
            continue
        if stat.S_ISDIR(st.st_mode):  # a nested repository: staged as a gitlink
            p.take.append(rel)
            continue
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            p.skipped.append(f"{json.dumps(rel)} (not a regular file)")
            continue
        size = st.st_size
        if size > limits.max_file_bytes:
            p.skipped.append(f"{json.dumps(rel)} ({size} bytes, over max_file_bytes)")
        elif len(p.take) >= limits.max_files:
            p.skipped.append(f"{json.dumps(rel)} (past max_files)")
        elif p.bytes + size > limits.max_bytes:
            p.skipped.append(f"{json.dumps(rel)} ({size} bytes, past max_bytes)")
        else:
            p.take.append(rel)
            p.bytes += size
    return p


def plan_files(root: str, changed: list[tuple[str, str]], limits: SalvageLimits) -> Plan:
    """``plan``, for a submodule's files: a repository nested in it is left out, not staged."""
    p = plan(root, changed, limits)
    for rel in [rel for rel in p.take if _is_dir(root, rel)]:
        p.take.remove(rel)
        p.skipped.append(f"{json.dumps(rel)} (a repository nested in a submodule)")
    return p


def _is_dir(root: str, rel: str) -> bool:
    try:
        st = slotfs.lstat(root, rel)
    except OSError:
        return False
    return st is not None and stat.S_ISDIR(st.st_mode)


def safe_line(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)[:200]
