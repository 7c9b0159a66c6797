"""``necrod mcp``: serve the tools over stdio (what MCP clients start) for one session.

Resource handling: the session lives as long as the transport does. It ends when the client
closes stdin (or goes away), or on SIGTERM, SIGINT or SIGHUP; then every lease it still holds is
released (the daemon salvages each first) before the process exits. A kill -9 leaves that to the
daemon's lease TTL.

Error handling: a tool's failure is a tool result with ``isError`` and the daemon's stable
error ``kind``, never a traceback; a bug in the server is logged (stderr) and reported as
``internal``. Nothing is printed on stdout but the protocol.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from necrod import __version__
from necrod.ctl import cli
from necrod.io import logs
from necrod.mcpserver.daemon import Daemon
from necrod.mcpserver.session import Session
from necrod.mcpserver.tools import TOOLS
from necrod.proto.errors import NecrodError

if TYPE_CHECKING:
    import mcp.types as mt
    from mcp.server import Server, ServerRequestContext

log = structlog.get_logger("necrod.mcp")

INSTRUCTIONS = (
    "necrod leases clean git workspaces of its pools and runs tasks in them. Take a workspace with "
    "workspace_allocate, work in its path, and release it with workspace_release when done: your "
    "work is saved as a salvage ref before the workspace is reset. This server keeps your leases "
    "alive and releases them when the session ends. Errors carry a stable kind (not_found, "
    "resource_exhausted, ...) in structuredContent.error.kind."
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="necrod mcp",
        allow_abbrev=False,
        parents=[cli.reach_options()],
        description="Serve necrod's workspaces and tasks as Model Context Protocol tools on stdin/stdout, "
        "for the agent (or harness) that starts it. Leases it allocates are kept alive while the "
        "session lasts and released, their work salvaged, when it ends.",
    )
    p.add_argument(
        "--holder",
        help="the holder recorded with every lease (default: necrod-mcp@HOST:PID)",
    )
    p.add_argument(
        "--log-format", choices=logs.FORMATS, default="json", help="the log on stderr (default json)"
    )
    p.add_argument("--log-level", default=os.environ.get("NECROD_LOG_LEVEL", "warning"),
                   choices=("debug", "info", "warning", "error"))  # fmt: skip
    return p


def _answer(structured: dict[str, Any], text: str, *, error: bool = False) -> mt.CallToolResult:
    import mcp.types as mt

    # Both: the structured result for clients that read it, and its JSON as text for those that
    # do not (what the specification asks of a tool that returns structured content).
    blocks = [mt.TextContent(text=text), mt.TextContent(text=json.dumps(structured, default=str))]
    return mt.CallToolResult(content=list(blocks), structured_content=structured, is_error=error)


def build_server(session: Session) -> Server[Any]:
    """The MCP server of one session: its tool list and calls, on ``session``."""
    import mcp.types as mt
    from mcp.server import Server

    tools = [
        mt.Tool(
            name=t.name,
            description=t.description,
            input_schema=t.input_schema(),
            annotations=mt.ToolAnnotations(
                read_only_hint=t.read_only, destructive_hint=t.destructive, open_world_hint=False
            ),
        )
        for t in TOOLS
    ]

    async def list_tools(
        ctx: ServerRequestContext[Any], params: mt.PaginatedRequestParams | None
    ) -> mt.ListToolsResult:
        return mt.ListToolsResult(tools=tools)

    async def call_tool(
        ctx: ServerRequestContext[Any], params: mt.CallToolRequestParams
    ) -> mt.CallToolResult:
        try:
            structured, text = await session.call(params.name, params.arguments)
        except NecrodError as exc:
            error = {"kind": exc.kind, "message": exc.message, **exc.data}
            return _answer({"error": error}, f"{exc.kind}: {exc.message}", error=True)
        except Exception:
            log.exception("tool_failed", tool=params.name)
            error = {"kind": "internal", "message": f"necrod mcp failed running {params.name}; see its log"}
            return _answer({"error": error}, f"internal: {error['message']}", error=True)
        return _answer(structured, text)

    return Server(
        "necrod",
        version=__version__,
        instructions=INSTRUCTIONS,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )


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
        anyio.run(serve_stdio, session)
    except KeyboardInterrupt:
        return 130
    return 0
