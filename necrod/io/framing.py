"""Reading whole request lines from one connection: the length limit enforced by counting
(DESIGN.md, trap 1), a deadline for each whole line however slowly it trickles in, and a budget
of the bytes of unfinished lines held across all connections (issue 16, defect 6).

Error handling: ``read_line`` raises ``LineTooLong``, ``BufferFull`` or ``ReadDeadline``; the
server answers and closes the connection (``server.py``).
"""

from __future__ import annotations

from collections import Counter

import anyio
from anyio.abc import SocketStream

from necrod.proto.jsonrpc import MAX_LINE_BYTES
from necrod.proto.router import Peer

RECEIVE_BYTES = 65536


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
    deadline for each whole line, and the server's buffer budget for what it holds."""

    def __init__(
        self, stream: SocketStream, read_timeout: float, budget: BufferBudget, peer: Peer, *, admin: bool
    ) -> None:
        self._stream = stream
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

    async def read_line(self) -> bytes | None:
        """The next line without its newline; None at a clean end of stream."""
        # The start of a pipelined line that came with the last one counts from now: the
        # client could not send more while we handled the call before it.
        self._line_started = anyio.current_time()
        while True:
            nl = self._buf.find(b"\n", self._scanned)
            if nl >= 0:
                if nl > MAX_LINE_BYTES:
                    raise LineTooLong
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                self._scanned = 0
                self._give_back()
                return line
            self._scanned = len(self._buf)
            if len(self._buf) > MAX_LINE_BYTES:
                raise LineTooLong
            try:
                chunk = await self._receive()
            except TimeoutError:
                raise ReadDeadline from None
            except anyio.EndOfStream:
                if self._buf.strip():
                    # A last request without its newline: answer it, then end.
                    line = bytes(self._buf)
                    self._buf.clear()
                    self._give_back()
                    return line
                return None
            if not self._budget.take(self._uid, len(chunk), admin=self._admin):
                raise BufferFull
            self._held += len(chunk)
            if not self._buf:
                self._line_started = anyio.current_time()
            self._buf += chunk

    async def _receive(self) -> bytes:
        if not self._buf:
            if self.idle_timeout is None:
                return await self._stream.receive(RECEIVE_BYTES)
            with anyio.fail_after(self.idle_timeout):
                return await self._stream.receive(RECEIVE_BYTES)
        # The deadline is for the whole line, not each receive: a byte every few seconds
        # (slowloris) must not hold a connection and its buffer forever.
        left = self._line_started + self._read_timeout - anyio.current_time()
        if left <= 0:
            raise TimeoutError
        with anyio.fail_after(left):
            return await self._stream.receive(RECEIVE_BYTES)

    def _give_back(self) -> None:
        self._budget.give(self._uid, self._held - len(self._buf))
        self._held = len(self._buf)

    def close(self) -> None:
        """Return everything held to the budget (the connection is over)."""
        self._buf.clear()
        self._give_back()
