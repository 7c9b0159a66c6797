"""Reading whole request lines from one connection: the length limit enforced by counting
(DESIGN.md, trap 1), a deadline for each whole line however slowly it trickles in, and a budget
of the bytes of unfinished lines held across all connections (issue 16, defect 6).

Error handling: ``read_line`` raises ``LineTooLong``, ``BufferFull`` or ``ReadDeadline``; the
server answers and closes the connection (``server.py``).
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter

import anyio

from necrod.proto.jsonrpc import MAX_LINE_BYTES
from necrod.proto.router import Peer

RECEIVE_BYTES = 65536
#: Lines a client sent ahead that are handed out before the connection gives up its turn of the
#: loop (the calls may all answer without waiting: ``hello``, ``slots.list``).
FAIR_LINES = 16


class LineTooLong(Exception):
    """A request line exceeded MAX_LINE_BYTES."""


class BufferFull(Exception):
    """Holding more of a request line would go over the server's buffer budget."""


class ReadDeadline(Exception):
    """A client started a line and did not finish it in time."""


class BufferBudget:
    """Bytes of unfinished request lines held, across connections: at most ``total`` in all,
    and a quarter of that for one uid that is not an admin (so a few peers cannot starve the
    rest: 600 half-sent 1 MiB lines once cost 693 MB)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.held = 0
        self.by_uid: Counter[int] = Counter()

    def take(self, uid: int, n: int, *, admin: bool) -> bool:
        if self.held + n > self.total:
            return False
        if not admin and self.by_uid[uid] + n > self.total // 4:
            return False
        self.held += n
        self.by_uid[uid] += n
        return True

    def give(self, uid: int, n: int) -> None:
        self.held -= n
        self.by_uid[uid] -= n
        if self.by_uid[uid] <= 0:
            del self.by_uid[uid]


class LineReader:
    """Reads newline-terminated lines, enforcing the length limit by counting (trap 1), a
    deadline for each whole line, and the server's buffer budget for what it holds.

    It reads the socket itself rather than through anyio's stream: the socket is watched for
    the whole connection and read as soon as it is readable, so a request costs one ``recv``
    and one wake-up. (The stream's ``receive`` takes a turn of the loop first and adds the socket
    to epoll and removes it again for every request: a quarter of an allocation's CPU at 32
    clients, BENCHMARKS.md.) While the connection's call is being handled nothing more is read:
    a client that sends ahead has at most one receive's worth read for it."""

    def __init__(
        self, sock: socket.socket, read_timeout: float, budget: BufferBudget, peer: Peer, *, admin: bool
    ) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._loop = asyncio.get_running_loop()
        self._buf = bytearray()
        self._scanned = 0
        self._read_timeout = read_timeout
        self._budget = budget
        self._uid = peer.uid
        self._admin = admin
        #: Bytes of ``_buf`` taken from the budget.
        self._held = 0
        #: When the first byte of the line being read arrived (loop clock).
        self._line_started = 0.0
        self.idle_timeout: float | None = None
        self._watching = False
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._failure: Exception | None = None
        #: Lines handed out since the last wait (see ``FAIR_LINES``).
        self._served = 0
        self._watch()

    async def read_line(self) -> bytes | None:
        """The next line without its newline; None at a clean end of stream."""
        # The start of a pipelined line that came with the last one counts from now: the
        # client could not send more while we handled the call before it.
        self._line_started = self._loop.time()
        while True:
            nl = self._buf.find(b"\n", self._scanned)
            if nl >= 0:
                if nl > MAX_LINE_BYTES:
                    raise LineTooLong
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                self._scanned = 0
                self._give_back()
                self._served += 1
                if self._served >= FAIR_LINES:
                    self._served = 0
                    await anyio.lowlevel.checkpoint()
                return line
            self._scanned = len(self._buf)
            if len(self._buf) > MAX_LINE_BYTES:
                raise LineTooLong
            if self._failure is not None:
                raise self._failure
            if self._eof:
                if self._buf.strip():
                    # A last request without its newline: answer it, then end.
                    line = bytes(self._buf)
                    self._buf.clear()
                    self._give_back()
                    return line
                return None
            await self._wait()

    async def _wait(self) -> None:
        if not self._buf:
            timeout = self.idle_timeout
        else:
            # The deadline is for the whole line, not each receive: a byte every few seconds
            # (slowloris) must not hold a connection and its buffer forever.
            timeout = self._line_started + self._read_timeout - self._loop.time()
            if timeout <= 0:
                raise ReadDeadline
        self._served = 0
        self._watch()
        self._waiter = waiter = self._loop.create_future()
        try:
            if timeout is None:
                await waiter
            else:
                with anyio.fail_after(timeout):
                    await waiter
        except TimeoutError:
            raise ReadDeadline from None
        finally:
            self._waiter = None

    def _readable(self) -> None:
        try:
            chunk = self._sock.recv(RECEIVE_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            failure = anyio.BrokenResourceError(str(exc))
            failure.__cause__ = exc
            self._stop(failure=failure)
            return
        if not chunk:
            self._stop(eof=True)
            return
        if not self._budget.take(self._uid, len(chunk), admin=self._admin):
            self._stop(failure=BufferFull())
            return
        self._held += len(chunk)
        if not self._buf:
            self._line_started = self._loop.time()
        self._buf += chunk
        if self._waiter is None:
            self._unwatch()  # the call in hand comes first; read on when the next line is asked for
        elif not self._waiter.done():
            self._waiter.set_result(None)

    def _stop(self, *, eof: bool = False, failure: Exception | None = None) -> None:
        self._unwatch()
        self._eof = self._eof or eof
        self._failure = self._failure or failure
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _watch(self) -> None:
        if not self._watching and not self._eof and self._failure is None:
            self._loop.add_reader(self._fd, self._readable)
            self._watching = True

    def _unwatch(self) -> None:
        if self._watching:
            self._loop.remove_reader(self._fd)
            self._watching = False

    def _give_back(self) -> None:
        self._budget.give(self._uid, self._held - len(self._buf))
        self._held = len(self._buf)

    def close(self) -> None:
        """Stop watching the socket (before anything else reads it, and before it is closed)
        and return everything held to the budget."""
        self._unwatch()
        self._buf.clear()
        self._give_back()
