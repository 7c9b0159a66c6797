"""The Unix-socket JSON-RPC server: accept loop, connections, peers and limits (reading whole
request lines is ``framing.py``).

Resource handling: the accept loop is our own (DESIGN.md, trap 2). Running out of file
descriptors or memory (EMFILE, ENFILE, ENOMEM, ENOBUFS) makes it back off and try again instead
of dying. Each connection runs in its own task; ``max_connections`` are served normally and a
few more (``HEADROOM``) are accepted in a restricted mode where only ``hello`` and
``daemon.status`` answer, so an operator can still look at a saturated daemon (trap 9). Past
that, a connection gets one ``resource_exhausted`` error and is closed at once.

No peer may take the server from the others (issue 16, defect 6): a uid that is not an admin
holds at most ``max_connections_per_uid`` connections; a request line must arrive whole within
``read_timeout`` of its first byte (however slowly it trickles in); and the bytes of unfinished
lines held for all connections are bounded (``BufferBudget``), a quarter of it per non-admin uid.

Error handling: one connection's failure is logged and closes that connection only. A request
line over ``MAX_LINE_BYTES`` is answered once with ``invalid_request`` and the connection is
closed (the rest of the line cannot be framed); one that would go over the buffer budget gets
``resource_exhausted`` and is closed the same way. A client that starts a line and does not
finish it by the read deadline, or stops reading our replies past the write deadline, is
disconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import SocketListener, SocketStream, TaskGroup, TaskStatus

from necrod.core.config import DaemonConfig
from necrod.io.framing import RECEIVE_BYTES, BufferBudget, BufferFull, LineReader, LineTooLong, ReadDeadline
from necrod.io.socketaccess import AccessPolicy, bind_unix_socket, peer_credentials
from necrod.proto.errors import InvalidRequest, NecrodError, PermissionDenied, ResourceExhausted
from necrod.proto.jsonrpc import MAX_LINE_BYTES, decode_request, encode_error, encode_notification
from necrod.proto.methods import DEFAULT_MAX_REQUEST_BYTES
from necrod.proto.router import CallContext, Peer, Router

log = structlog.get_logger("necrod.server")

#: Connections accepted above the cap in restricted mode (status only), for operators.
HEADROOM = 16
#: Methods that answer on a restricted connection.
OPERATOR_METHODS = frozenset({"hello", "daemon.status"})
#: Idle time after which a restricted connection is closed, so it cannot hog the headroom.
RESTRICTED_IDLE_S = 5.0
#: errnos of accept() that mean "out of resources": wait and retry.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_BACKOFF_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0)
#: Lines longer than this (only a few methods take them) are decoded one at a time, each in a
#: turn of the loop of its own: decoding costs time in proportion to the line, and a small call
#: must never queue behind more than one of them.
LARGE_LINE_BYTES = DEFAULT_MAX_REQUEST_BYTES
#: After refusing an over-long line, keep reading (and discarding) this long / this much, so
#: a client still writing it is not cut off with EPIPE before it can read why.
LINGER_S = 2.0
LINGER_BYTES = 32 << 20
#: A reply this long that does not fit the socket's buffer grows the buffer (once per connection).
LARGE_REPLY_BYTES = 256 << 10
LARGE_REPLY_SNDBUF = 4 << 20


@dataclass(frozen=True, slots=True)
class Limits:
    """What the server lets clients take; see the module docstring (``daemon.*`` keys)."""

    max_connections: int = 1024
    max_connections_per_uid: int = 256
    max_buffered_bytes: int = 64 << 20
    read_timeout: float = 30.0
    write_timeout: float = 10.0

    @classmethod
    def of(cls, d: DaemonConfig) -> Limits:
        return cls(d.max_connections, d.max_connections_per_uid, d.max_buffered_bytes, d.read_timeout_s,
                   d.write_timeout_s)  # fmt: skip


async def accept_forever(
    listener: SocketListener, tg: TaskGroup, handle: Callable[[SocketStream], Coroutine[Any, Any, None]]
) -> None:
    """Accept connections until cancelled, each handled in its own task. Running out of file
    descriptors or memory is waited out with backoff; any other accept error propagates."""
    failures = 0
    while True:
        try:
            stream = await listener.accept()
        except anyio.BrokenResourceError as exc:
            cause = exc.__cause__
            if isinstance(cause, OSError) and cause.errno in RESOURCE_ERRNOS:
                delay = ACCEPT_BACKOFF_S[min(failures, len(ACCEPT_BACKOFF_S) - 1)]
                failures += 1
                log.warning("accept_backoff", error=os.strerror(cause.errno), delay_s=delay)
                await anyio.sleep(delay)
                continue
            raise
        failures = 0
        tg.start_soon(handle, stream)


class Connection:
    """One client: serialized writes with a deadline, and a task group for its subscriptions."""

    def __init__(self, stream: SocketStream, connection_id: int, write_timeout: float) -> None:
        self.stream = stream
        self.sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        self.id = connection_id
        self._write_timeout = write_timeout
        # asyncio's lock: uncontended (nearly always: one reply at a time) it is taken without a
        # turn of the loop, like anyio's with fast_acquire, for a seventh of its cost.
        self._send_lock = asyncio.Lock()
        self.scope = anyio.CancelScope()
        self.busy = False
        self.tg: TaskGroup | None = None
        self._large_buffer = False

    async def send(self, data: bytes) -> None:
        async with self._send_lock:
            # A reply nearly always fits the socket's buffer: written at once, it needs no
            # deadline, no cancel scope and no turn of the loop (the allocation path's second
            # cost after encoding). Only the rest of a reply the client is slow to read waits.
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise anyio.BrokenResourceError from exc
            if sent == len(data):
                return
            if len(data) > LARGE_REPLY_BYTES and not self._large_buffer:
                # A reply of megabytes (tasks.list of 10,000) would otherwise go out in
                # buffer-sized pieces, a turn of the loop each (24 ms for 3 MB while tasks run);
                # the kernel caps the size at net.core.wmem_max.
                self._large_buffer = True
                with contextlib.suppress(OSError):
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LARGE_REPLY_SNDBUF)
            with anyio.fail_after(self._write_timeout):
                await self.stream.send(data[sent:])

    async def notify(self, method: str, params: dict[str, Any]) -> None:
        await self.send(encode_notification(method, params))

    def spawn(self, func: Callable[[], Coroutine[Any, Any, None]]) -> None:
        assert self.tg is not None
        self.tg.start_soon(func)

    def close(self) -> None:
        self.scope.cancel()


class RpcServer:
    """Serves a ``Router`` on a Unix socket; see the module docstring."""

    def __init__(
        self,
        path: Path,
        router: Router,
        *,
        policy: AccessPolicy,
        limits: Limits | None = None,
    ) -> None:
        self.path = path
        self.router = router
        self.policy = policy
        self.limits = limits or Limits()
        self.budget = BufferBudget(self.limits.max_buffered_bytes)
        self.connections: dict[int, Connection] = {}
        #: Open connections (served or restricted) by peer uid.
        self.by_uid: Counter[int] = Counter()
        self.restricted = 0
        self.accepted = 0
        self.refused = 0
        self._next_id = 0
        self.draining = False
        self._accept_scope: anyio.CancelScope | None = None
        self._large_lines = anyio.Lock()
        self._listener: SocketListener | None = None

    def configure(self, limits: Limits) -> None:
        self.limits = limits
        self.budget.total = limits.max_buffered_bytes

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        sock = bind_unix_socket(self.path, self.policy)
        self._listener = await SocketListener.from_socket(sock)
        try:
            async with anyio.create_task_group() as tg:
                with anyio.CancelScope() as self._accept_scope:
                    task_status.started()
                    await accept_forever(self._listener, tg, self._connection_accepted)
        finally:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            with anyio.CancelScope(shield=True):
                await self._listener.aclose()

    def stop_accepting(self) -> None:
        """Stop taking new connections and stop reading new requests; calls in flight finish."""
        self.draining = True
        if self._accept_scope is not None:
            self._accept_scope.cancel()
        for conn in list(self.connections.values()):
            if not conn.busy:
                conn.close()

    @property
    def accepting(self) -> bool:
        """Listening and not draining (whether the accept loop answers is ``probe``'s to say)."""
        return self._listener is not None and not self.draining

    @property
    def in_flight(self) -> int:
        return sum(1 for c in self.connections.values() if c.busy)

    async def wait_idle(self) -> None:
        while self.in_flight:
            await anyio.sleep(0.02)

    async def _connection_accepted(self, stream: SocketStream) -> None:
        self.accepted += 1
        await self._connection(stream)

    async def _connection(self, stream: SocketStream) -> None:
        self._next_id += 1
        conn_id = self._next_id
        restricted = False
        async with stream:
            try:
                sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
                peer = peer_credentials(sock)
            except OSError as exc:
                log.warning("peer_unknown", error=str(exc))
                return
            with structlog.contextvars.bound_contextvars(peer=peer.describe(), conn=conn_id):
                if not self.policy.allows(peer):
                    self.refused += 1
                    log.warning("peer_refused", uid=peer.uid)
                    await self._refuse(
                        stream,
                        PermissionDenied(
                            f"uid {peer.uid} may not use this daemon (allowed: its own uid, root"
                            + (f", group {self.policy.group_name}" if self.policy.group_name else "")
                            + ")"
                        ),
                    )
                    return
                admin = self.policy.is_admin(peer)
                limit = self.limits.max_connections_per_uid
                if not admin and self.by_uid[peer.uid] >= limit:
                    self.refused += 1
                    log.warning("peer_connection_limit", uid=peer.uid, limit=limit)
                    await self._refuse(
                        stream,
                        ResourceExhausted(
                            f"uid {peer.uid} has {limit} connections open, its limit; close some first",
                            limit=limit,
                        ),
                    )
                    return
                if len(self.connections) >= self.limits.max_connections:
                    if self.restricted >= HEADROOM:
                        self.refused += 1
                        await self._refuse(
                            stream,
                            ResourceExhausted(
                                f"the daemon is at its connection limit ({self.limits.max_connections}); "
                                "try again later"
                            ),
                        )
                        return
                    restricted = True
                    self.restricted += 1
                self.by_uid[peer.uid] += 1
                try:
                    await self._serve_connection(stream, conn_id, peer, restricted, admin)
                finally:
                    self.by_uid[peer.uid] -= 1
                    if not self.by_uid[peer.uid]:
                        del self.by_uid[peer.uid]
                    if restricted:
                        self.restricted -= 1

    async def _refuse(self, stream: SocketStream, error: NecrodError) -> None:
        with anyio.move_on_after(1.0):
            try:
                await stream.send(encode_error(None, error))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                return
        # Closing with the client's request unread would reset the connection before it can
        # read the refusal; read a little first.
        await self._linger(stream, seconds=0.5, limit=64 << 10)

    async def _serve_connection(
        self, stream: SocketStream, conn_id: int, peer: Peer, restricted: bool, admin: bool
    ) -> None:
        conn = Connection(stream, conn_id, self.limits.write_timeout)
        ctx = CallContext(
            peer=peer,
            connection_id=conn_id,
            admin=admin,
            notify=conn.notify,
            spawn=conn.spawn,
            close=conn.close,
            only_methods=OPERATOR_METHODS if restricted else None,
        )
        reader = LineReader(conn.sock, self.limits.read_timeout, self.budget, peer, admin=admin)
        if restricted:
            reader.idle_timeout = RESTRICTED_IDLE_S
        if not restricted:
            self.connections[conn_id] = conn
        try:
            with conn.scope:
                async with anyio.create_task_group() as conn.tg:
                    await self._request_loop(conn, ctx, reader)
                    conn.tg.cancel_scope.cancel()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError):
            log.debug("connection_lost")
        except TimeoutError:
            log.info("client_not_reading", write_timeout_s=self.limits.write_timeout)
        except Exception:
            log.exception("connection_failed")
        finally:
            reader.close()
            self.connections.pop(conn_id, None)
            for callback in ctx.on_close:
                try:
                    callback()
                except Exception:
                    log.exception("on_close_failed")

    async def _request_loop(self, conn: Connection, ctx: CallContext, reader: LineReader) -> None:
        while True:
            try:
                line = await reader.read_line()
            except LineTooLong:
                log.info("line_too_long")
                await conn.send(
                    encode_error(
                        None,
                        InvalidRequest(
                            f"request line longer than {MAX_LINE_BYTES} bytes; closing the connection"
                        ),
                    )
                )
                reader.close()
                await self._linger(conn.stream)
                return
            except BufferFull:
                log.warning("buffer_budget_exhausted", held=self.budget.held, total=self.budget.total)
                await conn.send(
                    encode_error(
                        None,
                        ResourceExhausted(
                            "the daemon holds too many unfinished requests (from you, or from everyone); "
                            "closing the connection: try again",
                            limit=self.budget.total,
                        ),
                    )
                )
                reader.close()
                await self._linger(conn.stream, seconds=0.5)
                return
            except ReadDeadline:
                log.info("read_deadline", read_timeout_s=self.limits.read_timeout)
                return
            if line is None:
                return
            if not line.strip():
                continue
            conn.busy = True
            try:
                reply = await self._handle(line, ctx)
                undo, ctx.undelivered = ctx.undelivered, []
                delivered = False
                try:
                    if reply is not None:
                        await conn.send(reply)
                        delivered = True
                finally:
                    if not delivered:
                        # The client never learns the outcome (it is gone, or asked for no
                        # reply): what the call granted it is taken back.
                        for hook in undo:
                            hook()
                hooks, ctx.after_reply = ctx.after_reply, []
                for hook in hooks:
                    hook()
            finally:
                conn.busy = False
            if self.draining:
                return

    async def _handle(self, line: bytes, ctx: CallContext) -> bytes | None:
        if len(line) <= LARGE_LINE_BYTES:
            return await self.router.handle_line(line, ctx)
        async with self._large_lines:
            # Yield first, holding the lock: calls that came meanwhile are answered before this
            # line is decoded, and the next large line waits for a turn after this one.
            await anyio.lowlevel.checkpoint()
            decoded = decode_request(line)
        return await self.router.handle_decoded(decoded, ctx)

    async def _linger(
        self, stream: SocketStream, seconds: float = LINGER_S, limit: int = LINGER_BYTES
    ) -> None:
        try:
            await stream.send_eof()
            discarded = 0
            with anyio.move_on_after(seconds):
                while discarded < limit:
                    discarded += len(await stream.receive(RECEIVE_BYTES))
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass


async def probe(path: Path, timeout: float) -> float:
    """Ask the daemon's own socket ``hello``, as a client would; return the seconds the answer
    took. Raises ``TimeoutError`` or ``OSError`` when the accept loop does not answer in time.
    Any reply line counts (a refusal at the connection cap is an answer too)."""
    started = anyio.current_time()
    request = b'{"jsonrpc":"2.0","id":1,"method":"hello","params":{"client":"necrod-self-check"}}\n'
    with anyio.fail_after(timeout):
        async with await anyio.connect_unix(path) as stream:
            await stream.send(request)
            received = b""
            while b"\n" not in received:
                try:
                    received += await stream.receive(RECEIVE_BYTES)
                except anyio.EndOfStream:
                    raise OSError(f"{path} closed the connection without answering") from None
    return anyio.current_time() - started


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one (1,024 connections need more than 1,024 fds)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):
            return soft
    return soft
