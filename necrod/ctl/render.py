"""Readable output for necroctl: tables a person reads at a glance, times and sizes humanized."""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from typing import Any, TextIO


def printable(text: str) -> str:
    """``text`` safe to show on a terminal: what is not printable (an escape sequence, a carriage
    return that overwrites the line, a bidi override, a line separator) written as Python
    escapes it; newlines and tabs kept. What the daemon relays (holders, labels, paths, commit
    subjects, messages) is an agent's to choose."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


class Terminal(io.TextIOBase):
    """A terminal's stream that writes everything through ``printable``: nothing an agent put
    in a name can move the cursor, retitle the window, write the clipboard or hide a line."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(printable(text))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]  # the terminal's, read-only here
        return self._stream.encoding


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    cells = [[str(h) for h in headers]] + [
        ["-" if c is None else printable(str(c)) for c in row] for row in rows
    ]
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
