"""An attempt's log where the daemon writes it (a container's or a pod's output, followed from
the engine or the cluster): never more than ``MAX_LOG_BYTES``. Such a runner is anyone's (a
peer that is not an admin may have its tasks run there), and the logs are on the state
directory's disk, beside the database every lease and task is recorded in."""

from __future__ import annotations

from typing import BinaryIO

#: The most of a runner's output an attempt's log keeps, with a line saying where it was cut.
MAX_LOG_BYTES = 256 << 20


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
        self.out.write(
            f"\n[necrod: this log was cut at {self.limit} bytes; the runner's output after it was not kept]\n".encode()
        )
        self.left = 0
        return False
