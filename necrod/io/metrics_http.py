"""The HTTP endpoint on ``daemon.metrics_listen``: GET (or HEAD) of a few fixed paths, nothing else.

The daemon serves ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz`` (probes) here; this
module knows only paths and the replies their handlers give (``Reply``). A path it does not
know is 404, a method other than GET or HEAD is 405.

Resource handling: it shares the RPC server's accept loop (backoff on EMFILE, one task per
connection) and reads at most one small request per connection, with a deadline, so a scraper
— or anything else that connects — cannot hold it up. A handler that fails answers 500 and is
logged; the connection is closed after each reply.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import anyio
import structlog
from anyio.abc import SocketListener, SocketStream, TaskStatus

from necrod.io.server import accept_forever

log = structlog.get_logger("necrod.http")

MAX_REQUEST = 8192
REQUEST_DEADLINE_S = 5.0
#: What Prometheus's text format 0.0.4 is served as.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error",
            503: "Service Unavailable"}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


Handler = Callable[[], Awaitable[Reply]]


def _encode(reply: Reply, head_only: bool) -> bytes:
    head = (f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, 'Unknown')}\r\n"
            f"Content-Type: {reply.content_type}\r\nContent-Length: {len(reply.body)}\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n\r\n")  # fmt: skip
    return head.encode() + (b"" if head_only else reply.body)


async def _read_request_line(stream: SocketStream) -> list[str]:
    data = b""
    with anyio.fail_after(REQUEST_DEADLINE_S):
        while b"\r\n\r\n" not in data and b"\n\n" not in data and len(data) < MAX_REQUEST:
            data += await stream.receive(4096)
    return data.split(b"\r\n", 1)[0].split(b"\n", 1)[0].decode("latin-1").split()


async def _handle(stream: SocketStream, routes: Mapping[str, Handler]) -> None:
    async with stream:
        try:
            parts = await _read_request_line(stream)
            method, path = (parts[0], parts[1].split("?", 1)[0]) if len(parts) >= 2 else ("", "")
            handler = routes.get(path)
            if handler is None:
                reply = Reply(404, ("served here: " + " ".join(sorted(routes)) + "\n").encode())
            elif method not in ("GET", "HEAD"):
                reply = Reply(405, b"only GET and HEAD\n")
            else:
                try:
                    reply = await handler()
                except Exception:
                    log.exception("http_handler_failed", path=path)
                    reply = Reply(500, b"internal error: see the daemon's log\n")
            with anyio.fail_after(REQUEST_DEADLINE_S):
                await stream.send(_encode(reply, head_only=method == "HEAD"))
        except (TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            return
        except Exception:
            log.exception("http_request_failed")


async def serve_http(host: str, port: int, routes: Mapping[str, Handler], *,
                     task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:  # fmt: skip
    """Serve ``routes`` (path → handler) on ``host:port`` until cancelled."""
    multi = await anyio.create_tcp_listener(local_host=host, local_port=port)
    log.info("http_listening", address=f"{host}:{port}", paths=sorted(routes))

    async def handle(stream: SocketStream) -> None:
        await _handle(stream, routes)

    async with multi, anyio.create_task_group() as tg:
        for listener in multi.listeners:
            assert isinstance(listener, SocketListener)
            tg.start_soon(accept_forever, listener, tg, handle)
        task_status.started()


def metrics_route(render: Callable[[], str]) -> Handler:
    """``/metrics``: what ``render`` returns, in Prometheus's text format."""

    async def metrics() -> Reply:
        return Reply(200, render().encode(), METRICS_CONTENT_TYPE)

    return metrics
