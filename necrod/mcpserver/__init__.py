"""``necrod mcp``: necrod's leases and tasks as Model Context Protocol tools, for agents.

A client of the daemon like ``necroctl`` (it speaks the protocol through ``necrod.client``,
locally or over ``-H ssh://``), built on the official MCP SDK (the ``mcp`` extra), which owns the
protocol and its transports. ``tools`` is the table of tools (pure data), ``session`` what one
MCP session does with the daemon (its leases kept alive, released when it ends), ``main`` the
command line and the transports.
"""
