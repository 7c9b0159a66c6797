"""What a typical task leaves in its checkout: modified tracked files, untracked files, and an
ignored build directory of thousands of files. The same debris, byte for byte, is made in a
necrod slot and in the hand-cleaned checkout the slot is compared with."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.gitrepo import GIT_ENV

#: Directory names tried, in order, for the ignored build output (the generated repo ignores build/).
IGNORED_CANDIDATES = ("build", "target", "dist", "node_modules", "out", "__pycache__")


@dataclass(frozen=True)
class Debris:
    modified: int = 50
    untracked: int = 100
    ignored: int = 3000


def tracked_files(checkout: Path, count: int) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=checkout, env=GIT_ENV, capture_output=True, check=True
    ).stdout
    files = [f for f in out.decode(errors="replace").split("\0") if f]
    step = max(1, len(files) // max(count, 1))
    return files[::step][:count]


def ignored_dir(checkout: Path) -> tuple[str, bool]:
    """A directory name the repository ignores (and whether one was found at all)."""
    for name in IGNORED_CANDIDATES:
        probe = subprocess.run(
            ["git", "check-ignore", "-q", "--no-index", f"{name}/x.o"], cwd=checkout, env=GIT_ENV
        )
        if probe.returncode == 0:
            return name, True
    return "build", False


def make(checkout: Path, debris: Debris, files: list[str], build: str) -> None:
    for name in files:
        path = checkout / name
        if path.is_file() and not path.is_symlink():
            with open(path, "a") as f:
                f.write("\n# edited by the task\n")
    notes = checkout / "task-notes"
    notes.mkdir(exist_ok=True)
    for i in range(debris.untracked):
        (notes / f"note{i}.txt").write_text(f"untracked file {i} written by the task\n")
    blob = b"\x7fELF" + bytes(508)
    for i in range(debris.ignored):
        d = checkout / build / f"obj{i // 100}"
        if i % 100 == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"unit{i}.o").write_bytes(blob)
