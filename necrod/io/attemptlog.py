"""An attempt's log: never more than ``MAX_LOG_BYTES``. The runner's output is an agent's (and a
container or pod runner may be any peer's), and the logs are on the state directory's disk,
beside the database every lease and task is recorded in: a runaway ``yes`` must not fill it.
``CappedLog`` is where the daemon writes the log (a container's or a pod's output, followed
from the engine or the cluster); a process runner's wrapper (``runshim --log-limit``) and a
tmux runner's ``pipe-pane`` copy keep the same limit and write the same line."""

from __future__ import annotations

from typing import BinaryIO

#: The most of a runner's output an attempt's log keeps, with a line saying where it was cut.
MAX_LOG_BYTES = 256 << 20


def cut_line(limit: int) -> bytes:
    """What ends a log cut at ``limit`` bytes (runshim.py and runshim.pl write the same)."""
    return (
        f"\n[necrod: this log was cut at {limit} bytes; the runner's output after it was not kept]\n".encode()
    )


class CappedLog:
    """Appends to ``out`` (a file opened for appending) up to ``limit`` bytes in all, what the
    file held already counted; then once a line saying the rest was not kept."""

    def __init__(self, out: BinaryIO, limit: int = MAX_LOG_BYTES) -> None:
        self.out = out
        self.limit = limit
        self.left = limit - out.tell()

    @property
    def full(self) -> bool:
        return self.left <= 0

    def write(self, data: bytes) -> bool:
        """Append ``data`` (what fits of it); False once the log is full: stop following."""
        if self.full:
            return False
        self.out.write(data[: self.left])
        if len(data) < self.left:
            self.left -= len(data)
            return True
        self.out.write(cut_line(self.limit))
        self.left = 0
        return False
