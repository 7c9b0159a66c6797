"""A pool's progress while it comes up for the first time, where a person looks: the latest in
``pools.list`` (and so ``necroctl pools`` and ``status``), and ``pool.progress`` events.

Three stages: ``mirror`` (the first clone: git's own phases, read from ``--progress``), ``blobs``
(a partial mirror fetching the blobs of the base: the first slot's checkout needs them) and
``slots`` (the pool's first slots made, n of N). git prints hundreds of progress lines a second;
the events are throttled (``core.progress``), the latest is always kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog

from necrod.core.progress import ProgressThrottle, parse_progress
from necrod.io.store import Event

log = structlog.get_logger("necrod.mirror")

#: Seconds between two clone_progress log lines (the events are more frequent).
LOG_EVERY_S = 2.0


class PoolProgress:
    """See the module docstring. ``publish`` records an event (in the background)."""

    def __init__(self, pool: str, publish: Callable[[Event], None]) -> None:
        self.pool = pool
        self.publish = publish
        self.stage = "mirror"
        #: The latest progress: stage, phase, percent (None when git gives none), done, total.
        self.latest: dict[str, Any] | None = None
        self._throttle = ProgressThrottle()
        self._logged_at = 0.0

    def git_line(self, line: str) -> None:
        """One line of git's stderr (``--progress``)."""
        parsed = parse_progress(line)
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_S or "done" in line:
            self._logged_at = now
            log.info("clone_progress", pool=self.pool, stage=self.stage, progress=line.strip())
        if parsed is not None:
            self.report(*parsed)

    def report(self, phase: str, percent: int | None, done: int, total: int | None) -> None:
        self.latest = {"stage": self.stage, "phase": phase, "percent": percent, "done": done, "total": total}
        if self._throttle.due(time.monotonic(), f"{self.stage}:{phase}", percent):
            self.publish(Event("pools", "pool.progress", {"pool": self.pool, **self.latest}))

    def slots(self, ready: int, total: int) -> None:
        """``ready`` of the pool's first ``total`` slots are made."""
        self.stage = "slots"
        self.report("creating slots", 100 * ready // total if total else 100, ready, total)
