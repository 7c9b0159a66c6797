"""The MCP server of one session: its tool list, and each call run on the ``Session`` with its
result (or the daemon's error) as MCP tool content.

Error handling: a tool's failure is a tool result with ``isError`` and the daemon's stable
error ``kind`` in ``structuredContent.error``, never a traceback; a bug in the server is logged
(stderr) and reported as ``internal``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import structlog

from necrod import __version__
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
