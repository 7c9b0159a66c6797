"""A minimal HTTP endpoint for Prometheus (``daemon.metrics_listen``): GET /metrics, nothing else.

It shares the RPC server's accept loop (backoff on EMFILE, one task per connection) and reads
at most one small request per connection, with a deadline, so a scraper — or anything else
that connects — cannot hold it up.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import structlog
from anyio.abc import SocketListener, SocketStream, TaskStatus

from necrod.io.server import accept_forever

log = structlog.get_logger("necrod.metrics")

MAX_REQUEST = 8192
REQUEST_DEADLINE_S = 5.0


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n")  # fmt: skip
    return head.encode() + body


async def _handle(stream: SocketStream, render: Callable[[], str]) -> None:
    async with stream:
        try:
            data = b""
            with anyio.fail_after(REQUEST_DEADLINE_S):
                while b"\r\n\r\n" not in data and b"\n\n" not in data and len(data) < MAX_REQUEST:
                    data += await stream.receive(4096)
            request_line = data.split(b"\r\n", 1)[0].split(b"\n", 1)[0].decode("latin-1")
            parts = request_line.split()
            if len(parts) >= 2 and parts[0] in ("GET", "HEAD") and parts[1].split("?", 1)[0] == "/metrics":
                body = render().encode()
                reply = _response("200 OK", b"" if parts[0] == "HEAD" else body,
                                  "text/plain; version=0.0.4; charset=utf-8")  # fmt: skip
            else:
                reply = _response("404 Not Found", b"only GET /metrics is served here\n")
            with anyio.fail_after(REQUEST_DEADLINE_S):
                await stream.send(reply)
        except (TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            return
        except Exception:
            log.exception("metrics_request_failed")


async def serve_metrics(host: str, port: int, render: Callable[[], str], *,
                        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:  # fmt: skip
    multi = await anyio.create_tcp_listener(local_host=host, local_port=port)
    log.info("metrics_listening", address=f"{host}:{port}")

    async def handle(stream: SocketStream) -> None:
        await _handle(stream, render)

    async with multi, anyio.create_task_group() as tg:
        for listener in multi.listeners:
            assert isinstance(listener, SocketListener)
            tg.start_soon(accept_forever, listener, tg, handle)
        task_status.started()
