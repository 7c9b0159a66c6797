"""Percentiles and timing of subprocesses: the only arithmetic the bench does on samples."""

from __future__ import annotations

import math
import subprocess
import time
from collections.abc import Sequence

from bench.gitrepo import GIT_ENV


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); ``q`` in 0..100."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def timed_git(*commands: list[str], cwd: str | None = None) -> float:
    """Seconds to run these git commands one after the other (each must succeed)."""
    started = time.perf_counter()
    for args in commands:
        result = subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, capture_output=True)
        if result.returncode != 0:
            raise RuntimeError(f"git {' '.join(args)} failed: {result.stderr.decode(errors='replace')}")
    return time.perf_counter() - started
