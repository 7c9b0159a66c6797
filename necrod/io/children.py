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


class Pipes:
    """A child's stdout and stderr read to the end, and ``input`` written to its stdin (then
    closed), from the event loop; ``on_stderr_line`` gets each line of stderr as it comes. Use
    as a context manager: leaving it stops watching and closes the pipes, whatever happened."""

    def __init__(
        self, process: subprocess.Popen[bytes], input: bytes | None = None,
        on_stderr_line: Callable[[str], None] | None = None,
    ) -> None:  # fmt: skip
        self.loop = asyncio.get_running_loop()
        self.process = process
        self.stdout = bytearray()
        self.stderr = bytearray()
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
        for fd in self._readers:
            self.loop.remove_reader(fd)
        self._readers.clear()
        self._stop_writing()
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        if not self._done.done():
            self._done.cancel()

    async def read_all(self) -> None:
        """Until both outputs are at their end and the input is written."""
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
            return
        sink += chunk
        if self._on_line is not None and sink is self.stderr:
            *lines, self._pending = (self._pending + chunk).replace(b"\r", b"\n").split(b"\n")
            for line in lines:
                if line:
                    self._on_line(line.decode("utf-8", "replace"))

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

    def _stop_writing(self) -> None:
        if self._writer is not None:
            self.loop.remove_writer(self._writer)
            self._writer = None
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()

    def _check_done(self) -> None:
        if not self._readers and self._writer is None and not self._done.done():
            self._done.set_result(None)
