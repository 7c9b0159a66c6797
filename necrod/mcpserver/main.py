"""``necrod mcp``: the command line, and the stdio transport (what MCP clients start) for one
session; ``--http`` serves ``streamable`` instead.

Resource handling: on stdio the session lives as long as the transport does. It ends when the
client closes stdin (or goes away), or on SIGTERM, SIGINT or SIGHUP; then every lease it still
holds is released (the daemon salvages each first) before the process exits. A kill -9 leaves
that to the daemon's lease TTL. Nothing is printed on stdout but the protocol; the log goes to
stderr.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from pathlib import Path

import anyio
import structlog

from necrod.ctl import cli
from necrod.io import logs
from necrod.mcpserver import streamable
from necrod.mcpserver.daemon import Daemon
from necrod.mcpserver.server import build_server
from necrod.mcpserver.session import Session

log = structlog.get_logger("necrod.mcp")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="necrod mcp",
        allow_abbrev=False,
        parents=[cli.reach_options()],
        description="Serve necrod's workspaces and tasks as Model Context Protocol tools on stdin/stdout "
        "(or, with --http, on a loopback port) for the agent (or harness) that starts it. Leases it allocates are kept alive while the "
        "session lasts and released, their work salvaged, when it ends.",
    )
    p.add_argument(
        "--holder",
        help="the holder recorded with every lease (default: necrod-mcp@HOST:PID)",
    )
    p.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="serve the streamable HTTP transport at http://HOST:PORT/mcp instead of stdio; HOST must be "
        "a loopback address (127.0.0.1, ::1 as [::1], localhost)",
    )
    p.add_argument(
        "--token-file",
        type=Path,
        help="with --http: the bearer token clients must send, on the file's first line "
        "(default: $NECROD_MCP_TOKEN, else a new one, printed on stderr)",
    )
    p.add_argument(
        "--log-format", choices=logs.FORMATS, default="json", help="the log on stderr (default json)"
    )
    p.add_argument("--log-level", default=os.environ.get("NECROD_LOG_LEVEL", "warning"),
                   choices=("debug", "info", "warning", "error"))  # fmt: skip
    return p


async def serve_stdio(session: Session) -> None:
    from mcp.server.stdio import stdio_server

    server = build_server(session)
    try:
        async with anyio.create_task_group() as tg:

            async def on_signals() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                    async for signum in signals:
                        log.info("session_ending", signal=signal.Signals(signum).name)
                        await session.release_all()
                        # The SDK reads stdin in a worker thread that no cancellation stops
                        # while the client keeps the pipe open: with the leases released,
                        # nothing is left to tidy, so leave at once.
                        os._exit(128 + signum)

            tg.start_soon(on_signals)
            tg.start_soon(session.keep_alive)
            async with stdio_server() as (read, write):
                await server.run(read, write, server.create_initialization_options())
            tg.cancel_scope.cancel()  # stdin closed: the client is gone
    finally:
        await session.release_all()


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    logs.configure(args.log_format, args.log_level)
    try:
        import mcp.server  # noqa: F401  (the SDK is an extra: say so before anything starts)
    except ImportError:
        print("necrod mcp: the MCP SDK is not installed: pip install 'necrod[mcp]'", file=sys.stderr)
        return 1
    opts = cli.options(args)
    where, ssh_options = cli.reach(opts)
    holder = args.holder or f"necrod-mcp@{socket.gethostname()}:{os.getpid()}"
    session = Session(Daemon(where, ssh_options, timeout=opts["timeout"]), holder)
    try:
        if args.http is None:
            anyio.run(serve_stdio, session)
        else:
            host, port = streamable.loopback(args.http)
            anyio.run(streamable.serve_http, session, host, port, streamable.token(args))
    except (ValueError, OSError) as exc:
        print(f"necrod mcp: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    except KeyboardInterrupt:
        return 130
    return 0
