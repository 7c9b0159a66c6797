"""The tools ``necrod mcp`` offers: names, what an agent reads about each, their input schemas.

Pure data. A tool forwards every argument its schema declares to its daemon method under the
same name, except the few the server handles itself (``local``): a parameter the daemon grows
(``from_salvage`` on ``slots.allocate``, say) is one more entry in a schema here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from necrod.proto.errors import InvalidParams

#: The longest an agent may ask a tool to wait (a slot to come free, a task to finish): an MCP
#: call that blocks longer than this is better made again.
MAX_WAIT_S = 600.0
#: What ``task_logs`` returns at most in one call, and by default.
MAX_LOG_BYTES = 256 * 1024
DEFAULT_LOG_BYTES = 16 * 1024

#: Task states after which nothing changes unless someone retries.
FINISHED_STATES = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str
    properties: dict[str, dict[str, Any]]
    required: tuple[str, ...] = ()
    #: Arguments the server uses itself and does not forward to the daemon.
    local: frozenset[str] = field(default_factory=frozenset)
    read_only: bool = False
    destructive: bool = False

    def input_schema(self) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": self.properties,
            "required": list(self.required),
            "additionalProperties": False,
        }

    def check(self, arguments: dict[str, Any] | None) -> dict[str, Any]:
        """The arguments, with unknown and missing ones refused (types are the daemon's to check,
        and the server's own with ``number``)."""
        arguments = dict(arguments or {})
        unknown = sorted(set(arguments) - set(self.properties))
        if unknown:
            raise InvalidParams(
                f"{self.name} takes no argument {', '.join(unknown)} (it takes: {', '.join(self.properties)})",
                param=unknown[0],
            )
        missing = [name for name in self.required if arguments.get(name) is None]
        if missing:
            raise InvalidParams(f"{self.name} needs {', '.join(missing)}", param=missing[0])
        return {k: v for k, v in arguments.items() if v is not None}

    def forwarded(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """The daemon's params: every argument given, except the server's own."""
        return {k: v for k, v in arguments.items() if k not in self.local}


def number(arguments: dict[str, Any], name: str, default: float, *, low: float, high: float) -> float:
    """One of the server's own number arguments, checked as the daemon checks its own."""
    value = arguments.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise InvalidParams(f"{name} must be a number from {low:g} to {high:g}", param=name)
    return float(value)


def _str(description: str) -> dict[str, Any]:
    return {"type": "string", "description": description}


def _num(description: str, low: float, high: float) -> dict[str, Any]:
    return {"type": "number", "minimum": low, "maximum": high, "description": description}


def _int(description: str, low: int, high: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": low, "maximum": high, "description": description}


def _bool(description: str) -> dict[str, Any]:
    return {"type": "boolean", "description": description}


_STRINGS = {"type": "array", "items": {"type": "string"}}
_LEASE = _str("the lease id workspace_allocate returned (l-...)")
_TASK = _str("the task id task_submit returned")

TOOLS: tuple[Tool, ...] = (
    Tool(
        "workspace_allocate",
        "Lease a clean git workspace (a checkout of the pool's repository) for your work. Returns its "
        "path, the lease id, a fencing token, its commit and any TCP ports it holds. This server keeps "
        "the lease alive while the session lasts and releases it (saving your uncommitted work as a "
        "salvage ref) when the session ends; release it yourself when done.",
        {
            "pool": _str("the pool (repository) to lease from; workspace_status lists the pools"),
            "ref": _str("check out this branch, tag or commit (detached); default: the pool's base"),
            "branch": _str("create (or reset) this branch at the commit and check it out"),
            "sparse": {
                **_STRINGS,
                "description": "the workspace holds only these directories and the top-level files "
                "(git's cone mode); [] for all of it; default: the pool's sparse set",
            },
            "ttl_s": _num(
                "the lease ends this long after the last heartbeat; default: the pool's", 1, 604800
            ),
            "wait_s": _num("wait this long for a free workspace instead of failing at once", 0, MAX_WAIT_S),
            "ports": _int("TCP ports to hold with the lease (consecutive, free on the host)", 0, 64),
            "affinity": _str("prefer the workspace last released under this key (warm build caches)"),
            "metadata": {"type": "object", "description": "stored with the lease (at most 16 KiB)"},
            "from_salvage": _str(
                "a lost lease's id (salvage_list): start where it stopped, its commits and uncommitted "
                "work restored; not with ref"
            ),
        },
        ("pool",),
    ),
    Tool(
        "workspace_release",
        "Give a workspace back. Uncommitted and committed work is saved first to "
        "refs/necrod/salvage/<lease_id> in the pool's mirror (unless salvage is false); the answer "
        "names that ref once the workspace is clean (wait_s bounds the wait). The path is not yours "
        "after this.",
        {
            "lease_id": _LEASE,
            "salvage": _bool("save the work before the reset (default: the pool's setting, normally true)"),
            "wait_s": _num(
                "wait this long for the salvage to be saved, to report its ref (0: do not wait; default 30)",
                0,
                MAX_WAIT_S,
            ),
        },
        ("lease_id",),
        local=frozenset({"wait_s"}),
        destructive=True,
    ),
    Tool(
        "workspace_heartbeat",
        "Extend a lease now (this server already heartbeats the leases it allocated; use it to "
        "change the TTL, or for a lease from elsewhere).",
        {"lease_id": _LEASE, "ttl_s": _num("a new TTL from now on", 1, 604800)},
        ("lease_id",),
    ),
    Tool(
        "workspace_status",
        "One lease (with lease_id) or every lease this session holds, and each pool's free "
        "workspaces: what to check before allocating or after a long pause.",
        {"lease_id": _str("one lease; default: all this session holds")},
        read_only=True,
    ),
    Tool(
        "task_submit",
        "Queue a command to run in a fresh workspace of a pool (the daemon leases it, runs the "
        "command, salvages and releases). Returns the task id; watch it with task_status.",
        {
            "pool": _str("the pool to run in"),
            "command": {**_STRINGS, "description": "the program and its arguments (argv, no shell)"},
            "runner": _str("a runner profile of the daemon's config, instead of command"),
            "payload": {"description": "any JSON, handed to the task as NECROD_PAYLOAD"},
            "env": {
                "type": "object",
                "additionalProperties": {"type": "string"},
                "description": "environment variables for the command",
            },
            "ref": _str("check out this branch, tag or commit"),
            "branch": _str("create this branch in the workspace"),
            "sparse": {
                **_STRINGS,
                "description": "the workspace holds only these directories and the top-level files",
            },
            "labels": {**_STRINGS, "description": "labels to find the task by"},
            "priority": _int("higher runs first", -1_000_000, 1_000_000),
            "max_retries": _int("attempts after a failure", 0, 1000),
            "timeout_s": _num("stop an attempt that runs longer", 0.001, 30 * 24 * 3600.0),
            "depends_on": {**_STRINGS, "description": "task ids that must succeed first"},
            "resume": {
                "type": "string",
                "enum": ["base", "salvage"],
                "description": "where a retry starts: the base, or the failed attempt's salvage (its work)",
            },
        },
        ("pool",),
    ),
    Tool(
        "task_status",
        "A task's state (queued, blocked, running, succeeded, failed, cancelled), why it waits, and "
        "its attempts (exit code, workspace, log). With wait_s, waits for it to finish.",
        {"task_id": _TASK, "wait_s": _num("wait up to this long for the task to finish", 0, MAX_WAIT_S)},
        ("task_id",),
        local=frozenset({"wait_s"}),
        read_only=True,
    ),
    Tool(
        "task_logs",
        "The output of a task's attempt (stdout and stderr together): by default its last max_bytes; "
        "with offset, from there on (pass the returned offset again to follow).",
        {
            "task_id": _TASK,
            "attempt": _int("which attempt (default: the latest)", 1, 1_000_000),
            "offset": _int("read from this byte on instead of the tail", 0, (1 << 53) - 1),
            "max_bytes": _int(f"at most this many bytes (default {DEFAULT_LOG_BYTES})", 1, MAX_LOG_BYTES),
        },
        ("task_id",),
        local=frozenset({"max_bytes", "offset"}),
        read_only=True,
    ),
    Tool(
        "task_cancel",
        "Stop a task: a queued one never starts; a running one gets SIGTERM, then SIGKILL after a "
        "grace (at once with force); its work is salvaged and its workspace freed.",
        {"task_id": _TASK, "reason": _str("why, recorded with the task"), "force": _bool("SIGKILL at once")},
        ("task_id",),
        destructive=True,
    ),
    Tool(
        "salvage_list",
        "Saved work of ended leases (refs/necrod/salvage/<lease_id>), newest first.",
        {"pool": _str("one pool; default: all")},
        read_only=True,
    ),
    Tool(
        "salvage_show",
        "One salvage: its commit, where the lease started, the files it changed, and how to get it.",
        {"lease_id": _str("the lease whose work was saved")},
        ("lease_id",),
        read_only=True,
    ),
)

BY_NAME = {tool.name: tool for tool in TOOLS}
