"""A pool's progress while it comes up: git's progress lines read into (phase, percent, done,
total), and how often one is worth an event. Pure: the caller passes the time.
"""

from __future__ import annotations

import re

#: ``Receiving objects:  45% (450/1000), 1.2 MiB | 3 MiB/s``, ``Enumerating objects: 5, done.``,
#: with ``remote: `` in front when the server says it.
_PERCENT = re.compile(r"^(?:remote: )?([A-Za-z][A-Za-z ]{2,40}):\s+(\d{1,3})% \((\d+)/(\d+)\)")
_COUNT = re.compile(r"^(?:remote: )?([A-Za-z][A-Za-z ]{2,40}):\s+(\d+)(?:,|$)")


def parse_progress(line: str) -> tuple[str, int | None, int, int | None] | None:
    """(phase, percent, done, total) of one git progress line, or None for any other line."""
    text = line.strip()
    m = _PERCENT.match(text)
    if m:
        return m.group(1).strip().lower(), min(int(m.group(2)), 100), int(m.group(3)), int(m.group(4))
    m = _COUNT.match(text)
    if m:
        return m.group(1).strip().lower(), None, int(m.group(2)), None
    return None


class ProgressThrottle:
    """Whether a progress update is worth an event: at most one per ``interval_s`` in a phase,
    a new phase once ``phase_interval_s`` passed, and a phase's 100% always (once)."""

    def __init__(self, interval_s: float = 0.5, phase_interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.phase_interval_s = phase_interval_s
        self._last_at: float | None = None
        self._last: tuple[str, int | None] | None = None

    def due(self, now: float, phase: str, percent: int | None) -> bool:
        last_at, last = self._last_at, self._last
        if last == (phase, percent):
            return False
        ends = percent == 100
        if (
            last_at is None
            or ends
            or now - last_at >= self.interval_s
            or (last is not None and last[0] != phase and now - last_at >= self.phase_interval_s)
        ):
            pass
        else:
            return False
        self._last_at, self._last = now, (phase, percent)
        return True
