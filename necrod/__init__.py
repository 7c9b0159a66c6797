"""necrod: clean, isolated git worktrees in milliseconds for fleets of agents and CI jobs."""

__version__ = "0.1.0"

#: The JSON-RPC protocol version this package speaks (``hello``'s ``protocol``).
PROTOCOL_VERSION = 1

__all__ = ["PROTOCOL_VERSION", "__version__"]
