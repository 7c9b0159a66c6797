"""What one MCP session does with the daemon: each tool's call, the leases it allocated kept
alive, and those leases released when the session ends.

Resource handling: every lease ``workspace_allocate`` took is in ``held`` until the agent
releases it or the daemon says it is gone. ``keep_alive`` heartbeats each at a third of its TTL;
``release_all`` (the session's end: stdin closed, SIGTERM, the HTTP session gone) releases them,
and the daemon salvages each before it resets the slot. A server killed with -9 releases
nothing: its leases run out their TTL and the daemon's reaper salvages and reclaims them.

Error handling: a tool's failure is the daemon's ``NecrodError`` (its stable ``kind``),
raised to the caller, which turns it into a tool error; nothing else is caught here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import structlog

from necrod.mcpserver.daemon import Daemon
from necrod.mcpserver.tools import (
    BY_NAME,
    DEFAULT_LOG_BYTES,
    FINISHED_STATES,
    MAX_LOG_BYTES,
    MAX_WAIT_S,
    Tool,
    number,
)
from necrod.proto.errors import FailedPrecondition, NecrodError, NotFound

log = structlog.get_logger("necrod.mcp")

#: A heartbeat that could not reach the daemon is tried again this soon (a restarting daemon
#: gives every lease a fresh TTL, so a short gap costs nothing).
RETRY_S = 1.0
#: How often a wait for a slot's cleanup or a task's end looks again.
POLL_S = 0.2
#: The longest the session's end may spend releasing its leases.
RELEASE_ALL_S = 10.0

#: What a tool returns: the structured result, and one line for a person or a model.
Answer = tuple[dict[str, Any], str]


@dataclass(slots=True)
class Held:
    """A lease this session allocated and keeps alive."""

    lease_id: str
    slot_id: str
    pool: str
    ttl_s: float
    due: float  # monotonic time of the next heartbeat


class Session:
    def __init__(self, daemon: Daemon, holder: str) -> None:
        self.daemon = daemon
        self.holder = holder
        self.held: dict[str, Held] = {}
        #: Leases the daemon ended behind this session's back, with why (workspace_status says so).
        self.lost: dict[str, str] = {}
        self._changed = anyio.Event()
        self._handlers: dict[str, Callable[[Tool, dict[str, Any]], Awaitable[Answer]]] = {
            "workspace_allocate": self.allocate,
            "workspace_release": self.release,
            "workspace_heartbeat": self.heartbeat,
            "workspace_status": self.status,
            "task_submit": self.submit,
            "task_status": self.task_status,
            "task_logs": self.task_logs,
            "task_cancel": self.cancel,
            "salvage_list": self.salvage_list,
            "salvage_show": self.salvage_show,
        }
        assert set(self._handlers) == set(BY_NAME)

    async def call(self, name: str, arguments: dict[str, Any] | None) -> Answer:
        """Run tool ``name``; raises ``NotFound`` for an unknown tool, else the daemon's errors."""
        tool = BY_NAME.get(name)
        if tool is None:
            raise NotFound(f"no tool {name!r}")
        return await self._handlers[name](tool, tool.check(arguments))

    # --- workspaces ------------------------------------------------------------------------------

    async def allocate(self, tool: Tool, args: dict[str, Any]) -> Answer:
        params = {"holder": self.holder, **tool.forwarded(args)}
        wait_s = number(args, "wait_s", 0.0, low=0, high=MAX_WAIT_S)
        lease = await self.daemon.call("slots.allocate", params, wait_s=wait_s)
        self._hold(lease)
        ports = f", ports {','.join(map(str, lease['ports']))}" if lease.get("ports") else ""
        return lease, (
            f"leased {lease['slot_id']} at {lease['path']} (lease {lease['lease_id']}, commit "
            f"{str(lease['commit'])[:12]}{', branch ' + lease['branch'] if lease.get('branch') else ''}{ports}); "
            f"kept alive by this session until released"
        )

    def _hold(self, lease: dict[str, Any]) -> None:
        ttl = float(lease["ttl_s"])
        self.held[lease["lease_id"]] = Held(
            lease["lease_id"], lease["slot_id"], lease["pool"], ttl, time.monotonic() + ttl / 3
        )
        self._changed.set()

    async def release(self, tool: Tool, args: dict[str, Any]) -> Answer:
        wait_s = number(args, "wait_s", 30.0, low=0, high=MAX_WAIT_S)
        lease_id = args["lease_id"]
        held = self.held.get(lease_id)
        result = await self.daemon.call("slots.release", tool.forwarded(args))
        self.held.pop(lease_id, None)
        answer = {**result, "lease_id": lease_id, "salvage_ref": None, "salvage_commit": None}
        if not result.get("salvage"):
            return answer, f"released {result['slot_id']} without salvage"
        pool = held.pool if held else result["slot_id"].rpartition("/")[0]
        settled, shown = await self._salvage_after_cleanup(lease_id, pool, result["slot_id"], wait_s)
        if shown is not None:
            answer.update(salvage_ref=shown["ref"], salvage_commit=shown["commit"], salvaged=shown)
            return answer, f"released {result['slot_id']}; the work is saved at {shown['ref']}"
        answer["salvage_pending"] = not settled
        if settled:
            return answer, f"released {result['slot_id']}; nothing to salvage"
        return answer, (
            f"released {result['slot_id']}; still cleaning: salvage_show {lease_id} later for its salvage"
        )

    async def _salvage_after_cleanup(
        self, lease_id: str, pool: str, slot_id: str, wait_s: float
    ) -> tuple[bool, dict[str, Any] | None]:
        """Whether the slot was cleaned within ``wait_s`` (the daemon salvages before it resets),
        and then the lease's salvage, or None when there was nothing worth saving."""
        with anyio.move_on_after(wait_s):
            while True:
                slots = (await self.daemon.call("slots.list", {"pool": pool}))["slots"]
                slot = next((s for s in slots if s["slot_id"] == slot_id), None)
                if slot is None or slot["state"] != "cleaning":
                    break
                await anyio.sleep(POLL_S)
            try:
                shown: dict[str, Any] = await self.daemon.call("salvage.show", {"lease_id": lease_id})
            except NotFound:
                return True, None
            return True, shown
        return False, None

    async def heartbeat(self, tool: Tool, args: dict[str, Any]) -> Answer:
        result = await self._beat(tool.forwarded(args))
        return result, f"lease {result['lease_id']} extended: expires in {result['ttl_s']:g}s"

    async def _beat(self, params: dict[str, Any]) -> dict[str, Any]:
        lease_id = params["lease_id"]
        try:
            result: dict[str, Any] = await self.daemon.call("slots.heartbeat", params)
        except (NotFound, FailedPrecondition) as exc:
            if self.held.pop(lease_id, None) is not None:
                self.lost[lease_id] = f"{exc.kind}: {exc.message}"
            raise
        held = self.held.get(lease_id)
        if held is not None:
            held.ttl_s = float(result["ttl_s"])
            held.due = time.monotonic() + held.ttl_s / 3
            self._changed.set()
        return result

    async def status(self, tool: Tool, args: dict[str, Any]) -> Answer:
        wanted = args.get("lease_id")
        if wanted is not None and wanted in self.lost:
            raise FailedPrecondition(f"lease {wanted} is gone: {self.lost[wanted]}", lease_id=wanted)
        pools = (await self.daemon.call("pools.list", {}))["pools"]
        slots = (await self.daemon.call("slots.list", {}))["slots"]
        by_lease = {s["lease_id"]: s for s in slots if s.get("lease_id")}
        if wanted is not None:
            if wanted not in by_lease:
                raise NotFound(f"no live lease {wanted}", lease_id=wanted)
            leases = [by_lease[wanted]]
        else:
            leases = [by_lease[i] for i in self.held if i in by_lease]
        for view in leases:
            view["kept_alive"] = view["lease_id"] in self.held
        summary = [
            {
                "name": p["name"],
                "state": p["state"],
                "available": p["slots"].get("available", 0),
                "allocated": p["slots"].get("allocated", 0),
                "cleaning": p["slots"].get("cleaning", 0),
                "waiting": p.get("waiting", 0),
                "max_slots": p["size"]["max_slots"],
            }
            for p in pools
        ]
        lost = [{"lease_id": k, "why": v} for k, v in self.lost.items()] if wanted is None else []
        text = (
            f"{len(leases)} lease(s) held; "
            + "; ".join(f"{p['name']}: {p['available']} free of {p['max_slots']}" for p in summary)
            + (f"; {len(lost)} lease(s) lost" if lost else "")
        )
        return {"leases": leases, "pools": summary, "lost": lost}, text

    # --- tasks -----------------------------------------------------------------------------------

    async def submit(self, tool: Tool, args: dict[str, Any]) -> Answer:
        result = await self.daemon.call("tasks.submit", tool.forwarded(args))
        return result, f"task {result['task_id']} {result['state']}"

    async def task_status(self, tool: Tool, args: dict[str, Any]) -> Answer:
        wait_s = number(args, "wait_s", 0.0, low=0, high=MAX_WAIT_S)
        params = tool.forwarded(args)
        task: dict[str, Any] = await self.daemon.call("tasks.get", params)
        with anyio.move_on_after(wait_s):
            while task["state"] not in FINISHED_STATES:
                await anyio.sleep(POLL_S)
                task = await self.daemon.call("tasks.get", params)
        attempts = task.get("attempts") or []
        last = attempts[-1] if attempts else {}
        exit_code = f", exit code {last['exit_code']}" if last.get("exit_code") is not None else ""
        waits = f", waiting on {task['waiting_on']}" if task.get("waiting_on") else ""
        return (
            task,
            f"task {task['task_id']} {task['state']} after {len(attempts)} attempt(s){exit_code}{waits}",
        )

    async def task_logs(self, tool: Tool, args: dict[str, Any]) -> Answer:
        limit = int(number(args, "max_bytes", DEFAULT_LOG_BYTES, low=1, high=MAX_LOG_BYTES))
        params = tool.forwarded(args)
        if "offset" in args:
            start = int(number(args, "offset", 0, low=0, high=(1 << 53) - 1))
        else:
            start = max(0, await self._log_size(params) - limit)
        chunk = await self.daemon.call("tasks.logs", {**params, "offset": start, "limit": limit})
        eof = chunk["eof"]
        if not eof and chunk["attempt"] is not None:
            # A read of exactly ``limit`` bytes that reached the end is not told it did.
            after = {**params, "attempt": chunk["attempt"], "offset": chunk["offset"], "limit": 1}
            rest = await self.daemon.call("tasks.logs", after)
            eof = rest["eof"] and not rest["data"]
        result = {
            "task_id": chunk["task_id"],
            "attempt": chunk["attempt"],
            "start": start,
            "offset": chunk["offset"],
            "eof": eof,
            "truncated": start > 0,
            "data": chunk["data"],
        }
        return result, chunk["data"] or "(no output)"

    async def _log_size(self, params: dict[str, Any]) -> int:
        """The log's length: the daemon's ``size``, or from a daemon that reports none, found
        with one-byte reads: doubling, then bisecting, some 2·log2(size) round trips."""
        first = await self.daemon.call("tasks.logs", {**params, "offset": 0, "limit": 1})
        if isinstance(first.get("size"), int):
            return int(first["size"])

        async def has(offset: int) -> bool:
            chunk = await self.daemon.call("tasks.logs", {**params, "offset": offset, "limit": 1})
            return bool(chunk["data"]) or chunk["offset"] > offset

        if not first["data"]:
            return 0
        low, high = 0, 1  # a byte at low; beyond high unknown
        while await has(high):
            low, high = high, high * 2
        while high - low > 1:  # a byte at low, none at high
            mid = (low + high) // 2
            low, high = (mid, high) if await has(mid) else (low, mid)
        return low + 1

    async def cancel(self, tool: Tool, args: dict[str, Any]) -> Answer:
        result = await self.daemon.call("tasks.cancel", tool.forwarded(args))
        return result, f"task {args['task_id']} {result.get('state', 'cancelled')}"

    # --- salvage ---------------------------------------------------------------------------------

    async def salvage_list(self, tool: Tool, args: dict[str, Any]) -> Answer:
        result = await self.daemon.call("salvage.list", tool.forwarded(args))
        return result, f"{len(result['salvage'])} salvage ref(s)"

    async def salvage_show(self, tool: Tool, args: dict[str, Any]) -> Answer:
        result = await self.daemon.call("salvage.show", tool.forwarded(args))
        files = result.get("files") or []
        return result, f"salvage of {args['lease_id']} at {result.get('ref')}: {len(files)} file(s) changed"

    # --- the session's own work ------------------------------------------------------------------

    async def keep_alive(self) -> None:
        """Heartbeat every held lease at a third of its TTL, for as long as the session lives."""
        while True:
            now = time.monotonic()
            for held in [h for h in self.held.values() if h.due <= now]:
                try:
                    await self._beat({"lease_id": held.lease_id})
                except (NotFound, FailedPrecondition) as exc:
                    log.warning("lease_lost", lease_id=held.lease_id, kind=exc.kind, error=exc.message)
                except NecrodError as exc:
                    # Unreachable, no reply, not saved (unavailable): the lease stands, try soon.
                    held.due = time.monotonic() + min(RETRY_S, held.ttl_s / 3)
                    log.warning("heartbeat_failed", lease_id=held.lease_id, kind=exc.kind, error=str(exc))
            self._changed = anyio.Event()
            next_due = min((h.due for h in self.held.values()), default=math.inf)
            with anyio.move_on_after(max(0.0, next_due - time.monotonic())):
                await self._changed.wait()

    async def release_all(self) -> None:
        """Release every lease still held (the daemon salvages each first). Shielded and bounded:
        it runs while the session is being torn down."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(RELEASE_ALL_S):
            for lease_id in list(self.held):
                try:
                    await self.daemon.call("slots.release", {"lease_id": lease_id})
                    log.info("lease_released_at_session_end", lease_id=lease_id)
                except (NotFound, FailedPrecondition):
                    pass  # gone already
                except NecrodError as exc:
                    # Left to the lease's TTL, which salvages as a release does.
                    log.warning("release_failed", lease_id=lease_id, kind=exc.kind, error=str(exc))
                self.held.pop(lease_id, None)
            await self.daemon.aclose()
