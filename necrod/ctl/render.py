"""Readable output for necroctl: tables a person reads at a glance, times and sizes humanized."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def ago(ts: float | None, now: float | None = None) -> str:
    if not ts:
        return "-"
    delta = (now or time.time()) - ts
    return ("in " + duration(-delta)) if delta < 0 else duration(delta) + " ago"


def until(ts: float | None, now: float | None = None) -> str:
    if not ts:
        return "-"
    delta = ts - (now or time.time())
    return "expired" if delta < 0 else "in " + duration(delta)


def duration(seconds: float) -> str:
    """``42s``, ``1m05s``, ``3h07m``, ``2d04h``: rounded to the second first, so that 59.6 s is
    ``1m00s`` and never ``60s``, nor 119.9 s ``1m60s``; the larger units then drop the rest."""
    s = round(abs(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{n}B"


def iso(ts: float | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts else "-"


def short(commit: str | None) -> str:
    return commit[:12] if commit else "-"
