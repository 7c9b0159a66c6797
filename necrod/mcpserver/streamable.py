"""``necrod mcp --http``: the streamable HTTP transport, on a loopback address only.

Anyone on the host can open the port, and would act on the daemon as the user who started the
server: so only a loopback address is accepted, every request must carry the bearer token
(``$NECROD_MCP_TOKEN``, ``--token-file``, else one made up and printed on stderr), and the
SDK's DNS-rebinding protection (Host and Origin checked) stays on.

Resource handling: the session is the server process (the protocol's newer revisions have no
session to end): leases are kept alive while it runs and released when it stops (SIGTERM,
SIGINT, SIGHUP).
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import ipaddress
import os
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

import anyio
import structlog

from necrod.mcpserver.server import build_server
from necrod.mcpserver.session import Session

log = structlog.get_logger("necrod.mcp")

#: ASGI's three callables, as uvicorn and Starlette call them.
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


#: The loopback hosts the MCP SDK guards against DNS rebinding (it checks Host and Origin).
SDK_GUARDED = ("127.0.0.1", "::1")


def loopback(address: str) -> tuple[str, int]:
    """``HOST:PORT`` with a loopback HOST; raises ValueError saying what is wrong."""
    host, sep, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--http {address!r} is not HOST:PORT")
    if host != "localhost":
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"--http {address!r}: HOST must be a loopback IP address or localhost") from None
        if not ip.is_loopback:
            raise ValueError(
                f"--http {address!r}: only a loopback address is served (reach another host's daemon "
                "with -H ssh://, and run necrod mcp where the agent runs)"
            )
        if str(ip) not in SDK_GUARDED:
            # The SDK checks Host and Origin (DNS rebinding) on these three names only.
            raise ValueError(f"--http {address!r}: HOST must be 127.0.0.1, ::1 or localhost")
        host = str(ip)
    return host, int(port)


def require_token(app: ASGIApp, token: str) -> ASGIApp:
    """``app``, answering 401 to an HTTP request without ``Authorization: Bearer <token>``."""
    expected = f"Bearer {token}".encode()

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, expected):
                body = b'{"error": "a bearer token is required (Authorization: Bearer ...)"}'
                await send({"type": "http.response.start", "status": 401, "headers": [
                    (b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})  # fmt: skip
                await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, send)

    return guarded


def token(args: argparse.Namespace) -> str:
    if args.token_file is not None:
        lines = args.token_file.read_text().strip().splitlines()
        token = str(lines[0]).strip() if lines else ""
        if not token:
            raise ValueError(f"{args.token_file}: no token on its first line")
        return token
    if os.environ.get("NECROD_MCP_TOKEN"):
        return os.environ["NECROD_MCP_TOKEN"]
    token = secrets.token_urlsafe(32)
    print(f"necrod mcp: clients send the header: Authorization: Bearer {token}", file=sys.stderr, flush=True)
    return token


async def serve_http(session: Session, host: str, port: int, token: str) -> None:
    import uvicorn

    class Uvicorn(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # Ours, not uvicorn's: uvicorn re-raises a caught SIGTERM once it has stopped,
            # which would end the process before the leases are released.
            yield

    app = build_server(session).streamable_http_app(host=host)
    server = Uvicorn(uvicorn.Config(require_token(app, token), host=host, port=port, log_level="warning",
                                    lifespan="on"))  # fmt: skip
    try:
        async with anyio.create_task_group() as tg:

            async def on_signals() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                    async for signum in signals:
                        log.info("server_stopping", signal=signal.Signals(signum).name)
                        await session.release_all()
                        server.should_exit = True
                        return

            tg.start_soon(on_signals)
            tg.start_soon(session.keep_alive)
            print(f"necrod mcp: serving http://{host}:{port}/mcp", file=sys.stderr, flush=True)
            await server.serve()
            tg.cancel_scope.cancel()
    finally:
        await session.release_all()
