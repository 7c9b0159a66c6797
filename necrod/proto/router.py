"""Routing decoded requests to handlers and turning every outcome into a reply line.

No sockets here: ``Router.handle_line`` takes the bytes of one request line and returns the
bytes of the reply (or ``None`` for a notification), so framing and dispatch are tested alone.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from necrod.proto.errors import Internal, MethodNotFound, NecrodError, PermissionDenied, ResourceExhausted
from necrod.proto.jsonrpc import BadRequest, Request, decode_request, encode_error, encode_result
from necrod.proto.methods import ADMIN_METHODS, METHODS, Param, check_params

log = structlog.get_logger("necrod.rpc")


@dataclass(slots=True)
class Peer:
    """Who is on the other end of a connection (from ``SO_PEERCRED``)."""

    pid: int
    uid: int
    gid: int

    def describe(self) -> str:
        return f"pid={self.pid} uid={self.uid}"


@dataclass(slots=True)
class CallContext:
    """What a handler may know about, and do with, the connection a call came on."""

    peer: Peer
    connection_id: int
    #: Root, the daemon's own uid or a member of ``daemon.admin_group`` (docs/operations.md):
    #: may call admin methods and act on every lease and task.
    admin: bool = False
    #: Sends a notification on this connection (``events.subscribe`` uses it).
    notify: Callable[[str, dict[str, Any]], Awaitable[None]] | None = None
    #: Starts a task that lives as long as the connection.
    spawn: Callable[[Callable[[], Coroutine[Any, Any, None]]], None] | None = None
    #: Closes the connection (after the current reply).
    close: Callable[[], None] | None = None
    #: Set on connections accepted above the connection cap: only these methods answer.
    only_methods: frozenset[str] | None = None
    #: Run once the reply to the current call has been written (subscriptions start here,
    #: so no notification can overtake the reply that announces them).
    after_reply: list[Callable[[], None]] = field(default_factory=list)
    #: Run instead when the reply could not be delivered: what the call granted is taken back.
    undelivered: list[Callable[[], None]] = field(default_factory=list)
    #: Called when the connection ends, for whatever a handler tied to its life.
    on_close: list[Callable[[], None]] = field(default_factory=list)
    client: str | None = None

    @property
    def viewer(self) -> int | None:
        """Whose leases and tasks this peer sees in full: None for an admin (everyone's)."""
        return None if self.admin else self.peer.uid

    def may_act_for(self, uid: int | None) -> bool:
        """Whether this peer may act on something owned by ``uid`` (None: no recorded owner)."""
        return self.admin or (uid is not None and uid == self.peer.uid)


Handler = Callable[[dict[str, Any], CallContext], Awaitable[Any]]


class Router:
    """Maps method names to handlers; every request line gets a reply line or, for a
    notification, nothing.

    Error handling: a ``NecrodError`` raised by a handler becomes its error object; any other
    exception is logged with its traceback and answered with ``internal``, so one bad call never
    takes the connection down, let alone the server.
    """

    def __init__(self, table: Mapping[str, Mapping[str, Param]] = METHODS) -> None:
        self._table = table
        self._handlers: dict[str, Handler] = {}

    def register(self, method: str, handler: Handler) -> None:
        if method not in self._table:
            raise ValueError(f"{method!r} is not in the method table")
        self._handlers[method] = handler

    @property
    def methods(self) -> frozenset[str]:
        return frozenset(self._handlers)

    async def handle_line(self, line: bytes, ctx: CallContext) -> bytes | None:
        return await self.handle_decoded(decode_request(line), ctx)

    async def handle_decoded(self, decoded: Request | BadRequest, ctx: CallContext) -> bytes | None:
        """``handle_line`` for a line decoded by the caller (the server decodes large ones itself)."""
        if isinstance(decoded, BadRequest):
            log.info("bad_request", kind=decoded.error.kind, error=decoded.error.message)
            return encode_error(decoded.id, decoded.error)
        return await self.handle(decoded, ctx)

    async def handle(self, request: Request, ctx: CallContext) -> bytes | None:
        # The method and id are named in these few log lines rather than bound as context for
        # every call: binding costs more than the call itself on the allocation path.
        started = time.perf_counter()
        try:
            result = await self._call(request, ctx)
        except NecrodError as exc:
            if not isinstance(exc, MethodNotFound | ResourceExhausted):
                log.info(
                    "call_failed",
                    method=request.method,
                    request_id=request.id,
                    kind=exc.kind,
                    error=exc.message,
                )
            reply = encode_error(request.id, exc)
        except Exception as exc:
            log.exception("call_crashed", method=request.method, request_id=request.id)
            reply = encode_error(request.id, Internal(f"internal error: {type(exc).__name__}: {exc}"))
        else:
            reply = encode_result(request.id, result)
        elapsed_ms = round((time.perf_counter() - started) * 1000, 3)
        log.debug("call", method=request.method, request_id=request.id, ms=elapsed_ms)
        return None if request.notification else reply

    async def _call(self, request: Request, ctx: CallContext) -> Any:
        handler = self._handlers.get(request.method)
        if handler is None:
            raise MethodNotFound(f"no method {request.method!r}", method=request.method)
        if ctx.only_methods is not None and request.method not in ctx.only_methods:
            raise ResourceExhausted(
                "the daemon is at its connection limit; this connection may only call "
                + ", ".join(sorted(ctx.only_methods))
            )
        if request.method in ADMIN_METHODS and not ctx.admin:
            raise PermissionDenied(
                f"{request.method} is for admins (root, the daemon's uid or daemon.admin_group); "
                f"uid {ctx.peer.uid} is not one",
                method=request.method,
            )
        params = check_params(request.method, request.params, self._table)
        return await handler(params, ctx)
