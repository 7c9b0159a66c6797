"""Item 2: the same workspace had the other ways, per task, timed by hand with git.

- clone per task: ``git clone --no-local`` (a full copy: objects and checkout);
- worktree add per task: ``git worktree add --detach`` from one shared bare clone;
- clean-on-allocate, what the old NecroCode seed did before handing a slot out:
  ``git fetch`` + ``git reset --hard`` + ``git clean -ffdx`` in a kept clone, once with the slot
  already clean and once with the debris a task leaves (item 3's).
"""

from __future__ import annotations

from pathlib import Path

from bench import debris
from bench.gitrepo import git
from bench.report import Row
from bench.scratch import Scratch, rmtree
from bench.stats import median, percentile, timed_git

#: The allocation is compared with what each way costs: ``(what, target ratio or None)``.
CLONE, WORKTREE, CLEAN, CLEAN_DIRTY = "clone", "worktree", "clean", "clean-dirty"
_TARGETS = {CLONE: 100.0, WORKTREE: 20.0}
_LABELS = {
    CLONE: "clone per task (git clone --no-local)",
    WORKTREE: "worktree add per task (shared repository)",
    CLEAN: "clean-on-allocate, slot already clean",
    CLEAN_DIRTY: "clean-on-allocate, after a task's debris",
}


def hand_clone(scratch: Scratch, origin: str, name: str) -> Path:
    path = scratch.path(name)
    git("clone", "--quiet", "--no-local", origin, str(path))
    return path


def _clone_per_task(scratch: Scratch, origin: str, runs: int) -> list[float]:
    times = []
    for i in range(runs):
        dst = scratch.path("per-task", f"clone{i}")
        times.append(timed_git(["clone", "--quiet", "--no-local", origin, str(dst)]))
        rmtree(dst)
    return times


def _worktree_per_task(scratch: Scratch, origin: str, runs: int) -> list[float]:
    shared = scratch.path("shared.git")
    git("clone", "--quiet", "--bare", "--no-local", origin, str(shared))
    times = []
    for i in range(runs):
        dst = scratch.path("per-task", f"wt{i}")
        times.append(
            timed_git(["-C", str(shared), "worktree", "add", "--quiet", "--detach", str(dst), "HEAD"])
        )
        git("-C", str(shared), "worktree", "remove", "--force", str(dst))
    rmtree(shared)
    return times


def clean_on_allocate(checkout: Path) -> float:
    return timed_git(
        ["fetch", "--quiet", "origin"],
        ["reset", "--quiet", "--hard", "@{upstream}"],
        ["clean", "--quiet", "-ffdx"],
        cwd=str(checkout),
    )


def _clean_per_task(checkout: Path, runs: int, dirt: debris.Debris | None) -> list[float]:
    files = debris.tracked_files(checkout, dirt.modified) if dirt else []
    build, _ = debris.ignored_dir(checkout)
    times = []
    for _ in range(runs):
        if dirt is not None:
            debris.make(checkout, dirt, files, build)
        times.append(clean_on_allocate(checkout))
    return times


def measure(
    scratch: Scratch, origin: str, hand: Path, runs: int, dirt: debris.Debris, necrod_ms: float
) -> list[Row]:
    """``hand`` is a kept clone (left clean); ``necrod_ms`` the allocation p50 at one client."""
    samples = {
        CLONE: _clone_per_task(scratch, origin, runs),
        WORKTREE: _worktree_per_task(scratch, origin, runs),
        CLEAN: _clean_per_task(hand, runs, None),
        CLEAN_DIRTY: _clean_per_task(hand, runs, dirt),
    }
    rows = []
    for key, seconds in samples.items():
        ms = [s * 1000 for s in seconds]
        row = Row("2", _LABELS[key], "ms", median(ms), percentile(ms, 99), len(ms))
        row.ratio, row.ratio_to = median(ms) / necrod_ms, "necrod allocate (1 client)"
        target = _TARGETS.get(key)
        if target is not None:
            row.target, row.met = f">= {target:g}x necrod", row.ratio >= target
        rows.append(row)
    return rows
