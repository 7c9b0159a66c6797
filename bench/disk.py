"""Item 5: disk used by a pool of 10 slots against 10 independent clones.

Every figure is one ``du -s -B1`` invocation (allocated blocks, not apparent sizes), so a file
reachable twice is counted once; ``git clone --no-local`` copies objects instead of
hard-linking them, so the clones share nothing and are summed as they are.

- necrod: ``du`` of the pool's directory: the mirror (with its per-worktree admin directories
  and indexes) and the 10 slots;
- floor ("one mirror plus 10 checkouts"): the mirror without ``worktrees/``, plus 10 times the
  work tree of a plain clone without its ``.git``;
- clones: ``du`` of the 10 clone directories together.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from bench.baselines import hand_clone
from bench.daemon import Daemon
from bench.report import Row
from bench.scratch import Scratch, rmtree

SLOTS = 10
TARGET = 1.05


def du(*paths: Path, exclude: str | None = None, one_file_system: bool = False) -> int:
    """Bytes allocated under ``paths`` (``one_file_system``: not into what is mounted there)."""
    argv = ["du", "-s", "-B1", "--total", *([f"--exclude={exclude}"] if exclude else [])]
    argv += [*(["-x"] if one_file_system else []), *map(str, paths)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1].split()[0])


def measure(daemon: Daemon, pool: str, scratch: Scratch, origin: str) -> list[Row]:
    ws = daemon.workspace(pool)
    necrod = du(ws)
    mirror = du(ws / "mirror.git", exclude="worktrees")
    clones = [hand_clone(scratch, origin, f"disk/clone{i}") for i in range(SLOTS)]
    try:
        checkout = du(clones[0], exclude=".git")
        together = du(*clones)
    finally:
        for clone in clones:
            rmtree(clone)
    floor = mirror + SLOTS * checkout
    return [
        Row("5", "one mirror (objects, refs; no worktree admin)", "MB", mirror),
        Row("5", "one checkout (work tree of a clone, no .git)", "MB", checkout),
        Row(
            "5",
            f"necrod pool of {SLOTS} slots (mirror + worktrees)",
            "MB",
            necrod,
            ratio=necrod / floor,
            ratio_to=f"mirror + {SLOTS} checkouts",
            target=f"<= {TARGET}x",
            met=necrod / floor <= TARGET,
        ),
        Row(
            "5",
            f"{SLOTS} clones (--no-local)",
            "MB",
            together,
            ratio=together / necrod,
            ratio_to="necrod pool",
        ),
    ]
