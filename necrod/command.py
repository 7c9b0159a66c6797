"""``necrod``: the daemon, or with ``mcp`` first, the MCP server for agents (``necrod mcp``).

The daemon's command line has options only; ``mcp`` is told apart before it is parsed, so that
neither imports the other (the MCP server is a client of the daemon, in ``necrod.mcpserver``).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["mcp"]:
        from necrod.mcpserver.main import main as mcp_main

        return mcp_main(argv[1:])
    from necrod.daemon.main import main as daemon_main

    return daemon_main(argv)


if __name__ == "__main__":
    sys.exit(main())
