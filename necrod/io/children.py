"""Processes the daemon starts with ``subprocess.Popen`` and watches from its event loop: their
end awaited on a pidfd, their pipes read and written by the loop's own readiness callbacks.

asyncio's subprocess machinery (a transport and a protocol per pipe, a child watcher, anyio's
stream wrappers and a task per pipe) cost more per git process than the fork itself; this is
the little of it that a short-lived child needs. A runner is started the same way, for another
reason: asyncio's transports kill their processes when the event loop closes.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Callable

import anyio

#: How often a process is looked at where the kernel has no pidfds.
POLL_S = 0.25


async def wait_exit(pid: int) -> None:
    """Wait until process ``pid`` ends (or seems to: callers look again): on a pidfd where the
    kernel has them, else a short sleep."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        await anyio.sleep(POLL_S)
        return
    try:
        await anyio.wait_readable(fd)
    finally:
        os.close(fd)


async def exited(process: subprocess.Popen[bytes]) -> int:
    """``process``'s exit status (negative: the signal that ended it), once it has ended; it is
    reaped."""
    while (code := process.poll()) is None:
        await wait_exit(process.pid)
    return code


#: How much of a child's stderr is kept: its end, where the reason for a failure is.
STDERR_KEPT = 64 << 10
#: The longest stderr line handed on whole; a longer one is cut to its end.
LINE_KEPT = 8 << 10


class Pipes:
    """A child's stdout and stderr read to the end, and ``input`` written to its stdin (then
    closed), from the event loop; ``on_stderr_line`` gets each line of stderr as it comes (if
    it raises, ``read_all`` does). Use as a context manager: leaving it stops watching and
    closes the pipes, whatever happened.

    Nothing is read unbounded: stdout stops at ``stdout_limit`` bytes (``cut`` is then set,
    ``read_all`` returns and the caller stops the child), and of stderr only the last
    ``STDERR_KEPT`` bytes are kept."""

    def __init__(
        self, process: subprocess.Popen[bytes], input: bytes | None = None,
        on_stderr_line: Callable[[str], None] | None = None, *, stdout_limit: int,
    ) -> None:  # fmt: skip
        self.loop = asyncio.get_running_loop()
        self.process = process
        self.stdout = bytearray()
        self.stderr = bytearray()
        #: stdout reached ``stdout_limit``: ``stdout`` holds its first bytes, the child is not done.
        self.cut = False
        self._stdout_limit = stdout_limit
        self._on_line = on_stderr_line
        self._pending = b""
        self._input = memoryview(input) if input is not None else memoryview(b"")
        self._readers: list[int] = []
        self._writer: int | None = None
        self._done = self.loop.create_future()

    def __enter__(self) -> Pipes:
        for stream, sink in ((self.process.stdout, self.stdout), (self.process.stderr, self.stderr)):
            if stream is not None:
                fd = stream.fileno()
                os.set_blocking(fd, False)
                self.loop.add_reader(fd, self._read, fd, sink)
                self._readers.append(fd)
        if self.process.stdin is not None:
            fd = self.process.stdin.fileno()
            os.set_blocking(fd, False)
            self.loop.add_writer(fd, self._write, fd)
            self._writer = fd
        self._check_done()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop_reading()
        self._stop_writing()
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        if not self._done.done():
            self._done.cancel()

    async def read_all(self) -> None:
        """Until both outputs are at their end (or stdout at its limit) and the input is written."""
        await self._done

    def _read(self, fd: int, sink: bytearray) -> None:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.loop.remove_reader(fd)
            self._readers.remove(fd)
            self._check_done()
        elif sink is self.stdout:
            room = self._stdout_limit - len(sink)
            sink += chunk[:room]
            if len(chunk) > room:
                self.cut = True
                self._stop_reading()
                self._stop_writing()
                self._check_done()
        else:
            sink += chunk
            if len(sink) > STDERR_KEPT:
                del sink[: len(sink) - STDERR_KEPT]
            if self._on_line is not None:
                try:
                    self._hand_on_lines(chunk)
                except Exception as exc:  # the caller's: it fails the read, not the loop
                    self._stop_reading()
                    self._stop_writing()
                    if not self._done.done():
                        self._done.set_exception(exc)

    def _hand_on_lines(self, chunk: bytes) -> None:
        assert self._on_line is not None
        *lines, pending = (self._pending + chunk).replace(b"\r", b"\n").split(b"\n")
        self._pending = pending[-LINE_KEPT:]
        for line in lines:
            if line:
                self._on_line(line[-LINE_KEPT:].decode("utf-8", "replace"))

    def _write(self, fd: int) -> None:
        try:
            sent = os.write(fd, self._input[:65536])
        except BlockingIOError:
            return
        except OSError:  # the child closed its stdin (it exited, or reads no more): the rest goes
            sent = len(self._input)
        self._input = self._input[sent:]
        if not self._input:
            self._stop_writing()
            self._check_done()

    def _stop_reading(self) -> None:
        for fd in self._readers:
            self.loop.remove_reader(fd)
        self._readers.clear()

    def _stop_writing(self) -> None:
        if self._writer is not None:
            self.loop.remove_writer(self._writer)
            self._writer = None
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()

    def _check_done(self) -> None:
        if not self._readers and self._writer is None and not self._done.done():
            self._done.set_result(None)
