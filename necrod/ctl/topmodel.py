"""What ``necroctl top`` knows of a daemon: a picture loaded once, then kept current by events.

``Picture`` is plain data and pure functions of it: ``load`` takes the first look (the
``events.subscribe`` snapshot, ``tasks.list``, ``hosts.list``), ``apply`` one event, and the
``resync_*`` methods what the daemon publishes no event for (a heartbeat moving a lease's
expiry, a fetch that changed nothing, a queued task's reason, a remote host's state).
``panels`` turns it into the tables the dashboard draws, filtered by pool, at a given time, so
that ages and durations move with the clock and not with the daemon.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from necrod.ctl import render

SLOT_STATES = ("available", "allocated", "cleaning", "creating", "error", "removing")
#: Events kept for the "last events" panel.
EVENT_MEMORY = 200
#: Finished tasks kept for the "recent failures" part of the tasks panel.
FAILURES_SHOWN = 5


@dataclass
class Panel:
    """One table of the dashboard: a title, column headers, rows of text, and how many rows
    were left out (``more``) because the screen had no room for them."""

    title: str
    headers: tuple[str, ...]
    rows: list[tuple[str, ...]] = field(default_factory=list)
    more: int = 0


@dataclass
class Picture:
    pools: dict[str, dict[str, Any]] = field(default_factory=dict)
    slots: dict[str, dict[str, Any]] = field(default_factory=dict)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    hosts: list[dict[str, Any]] = field(default_factory=list)
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=EVENT_MEMORY))
    #: The last event applied (the snapshot's ``seq`` at first).
    seq: int = 0
    #: Set by a ``daemon.stopping`` event.
    stopping: bool = False

    # --- loading --------------------------------------------------------------------------------

    def load(
        self, subscribed: dict[str, Any], tasks: list[dict[str, Any]], hosts: list[dict[str, Any]]
    ) -> None:
        snapshot = subscribed.get("snapshot") or {}
        self.resync_pools(snapshot.get("pools", []))
        self.resync_slots(snapshot.get("slots", []))
        self.resync_tasks(tasks)
        self.hosts = hosts
        self.seq = int(subscribed.get("seq") or 0)

    def resync_pools(self, pools: list[dict[str, Any]]) -> None:
        self.pools = {p["name"]: dict(p) for p in pools}

    def resync_slots(self, slots: list[dict[str, Any]]) -> None:
        self.slots = {s["slot_id"]: dict(s) for s in slots}

    def resync_tasks(self, tasks: list[dict[str, Any]]) -> None:
        self.tasks = {t["task_id"]: dict(t) for t in tasks}

    def resync_hosts(self, hosts: list[dict[str, Any]]) -> None:
        self.hosts = hosts

    # --- events ---------------------------------------------------------------------------------

    def apply(self, event: dict[str, Any]) -> None:
        """Fold one event into the picture (an event of a kind it does not know is only listed)."""
        self.events.append(event)
        self.seq = max(self.seq, int(event.get("seq") or 0))
        kind = str(event.get("type", ""))
        handler = _HANDLERS.get(kind) or _HANDLERS.get(kind.split(".", 1)[0] + ".*")
        if handler is not None:
            handler(self, event)

    def _lease_granted(self, e: dict[str, Any]) -> None:
        slot = self.slots.setdefault(e["slot_id"], {"slot_id": e["slot_id"], "pool": e.get("pool")})
        slot.update(state="allocated", holder=e.get("holder"), task_id=e.get("task_id"),
                    lease_id=e.get("lease_id"), granted_at=e.get("granted_at") or e.get("ts"),
                    expires_at=e.get("expires_at"))  # fmt: skip

    def _lease_ended(self, e: dict[str, Any]) -> None:
        slot = self.slots.get(e.get("slot_id", ""))
        if slot is not None and slot.get("lease_id") in (e.get("lease_id"), None):
            slot.update(holder=None, task_id=None, lease_id=None, granted_at=None, expires_at=None)

    def _slot_state(self, e: dict[str, Any]) -> None:
        slot = self.slots.setdefault(e["slot_id"], {"slot_id": e["slot_id"], "pool": e.get("pool")})
        slot["state"] = e.get("state")
        if "commit" in e:
            slot["commit"] = e["commit"]
        slot["error"] = e.get("error")
        if e.get("state") != "allocated":
            slot.update(holder=None, task_id=None, lease_id=None, granted_at=None, expires_at=None)

    def _slot_removed(self, e: dict[str, Any]) -> None:
        self.slots.pop(e.get("slot_id", ""), None)

    def _pool(self, e: dict[str, Any]) -> dict[str, Any]:
        name = e["pool"]
        return self.pools.setdefault(name, {"name": name, "state": "starting", "fetch": {}, "prepare": None})

    def _pool_state(self, e: dict[str, Any]) -> None:
        pool = self._pool(e)
        pool["state"] = e.get("state")
        pool["error"] = e.get("error")
        if e.get("base_commit"):
            pool["base_commit"] = e["base_commit"]

    def _pool_base(self, e: dict[str, Any]) -> None:
        pool = self._pool(e)
        pool["base_commit"] = e.get("commit")
        # A new base is only found by a fetch that just succeeded.
        pool.setdefault("fetch", {})["last_ok_at"] = e.get("ts")

    def _pool_fetch(self, e: dict[str, Any]) -> None:
        fetch = self._pool(e).setdefault("fetch", {})
        if e.get("ok"):
            fetch.update(state="ok", failing_since=None, last_error=None, last_ok_at=e.get("ts"))
        else:
            fetch.update(state="failing", failing_since=e.get("failing_since") or e.get("ts"),
                         last_error=e.get("error"))  # fmt: skip

    def _pool_prepare(self, e: dict[str, Any]) -> None:
        pool = self._pool(e)
        prepare = dict(pool.get("prepare") or {})
        prepare.update(state=e.get("state"), key=e.get("key"), error=e.get("error"),
                       last_duration_s=e.get("duration_s", prepare.get("last_duration_s")))  # fmt: skip
        prepare["started_at"] = e.get("ts") if e.get("state") == "running" else None
        if e.get("state") == "ready":
            prepare["ready"] = e.get("key")
        pool["prepare"] = prepare

    def _pool_lifecycle(self, e: dict[str, Any]) -> None:
        kind = e.get("type")
        if kind == "pool.removed":
            self.pools.pop(e["pool"], None)
            for slot_id in [k for k, s in self.slots.items() if s.get("pool") == e["pool"]]:
                del self.slots[slot_id]
        else:
            self._pool(e)["state"] = "starting" if kind == "pool.added" else "draining"

    def _task(self, e: dict[str, Any]) -> None:
        task = self.tasks.setdefault(e["task_id"], {"task_id": e["task_id"], "submitted_at": e.get("ts"),
                                                    "attempts": 0, "runner": None})  # fmt: skip
        kind = str(e.get("type"))
        task.update(state=e.get("state"), pool=e.get("pool", task.get("pool")))
        if kind == "task.started":
            task.update(started_at=e.get("ts"), attempts=e.get("attempt") or task.get("attempts", 0) + 1,
                        runner=e.get("runner") or task.get("runner"), slot_id=e.get("slot_id"),
                        waiting_on=None)  # fmt: skip
        if e.get("state") in ("succeeded", "failed", "cancelled"):
            task["finished_at"] = e.get("ts")
        if e.get("detail") or e.get("reason"):
            task["reason"] = e.get("detail") or e.get("reason")
        if kind in ("task.queued", "task.retried", "task.submitted"):
            # Why it waits now is for the scheduler to say: the next resync tells.
            task["waiting_on"] = None

    def _daemon(self, e: dict[str, Any]) -> None:
        if e.get("type") == "daemon.stopping":
            self.stopping = True
        elif e.get("type") == "daemon.started":
            self.stopping = False

    # --- questions ------------------------------------------------------------------------------

    def pool_names(self) -> list[str]:
        return sorted(self.pools)

    def overdue_leases(self, now: float) -> bool:
        """Whether a lease shown should have expired by now and no event said so: it was
        heartbeated (heartbeats publish no event), and its expiry must be read again."""
        return any(s.get("expires_at") and s["expires_at"] < now - 1 for s in self.slots.values()
                   if s.get("holder"))  # fmt: skip

    def as_json(self, pool: str | None) -> dict[str, Any]:
        def mine(item: dict[str, Any]) -> bool:
            return pool is None or item.get("pool") == pool or item.get("name") == pool

        return {
            "seq": self.seq,
            "pool_filter": pool,
            "pools": [p for p in self.pools.values() if mine(p)],
            "leases": [s for s in self.slots.values() if s.get("holder") and mine(s)],
            "tasks": [t for t in self.tasks.values() if mine(t)],
            "hosts": self.hosts,
            "events": [e for e in list(self.events)[-20:] if mine(e)],
        }

    # --- the tables -----------------------------------------------------------------------------

    def panels(self, now: float, pool: str | None = None, room: dict[str, int] | None = None) -> list[Panel]:
        """The dashboard's tables at wall time ``now``; ``room`` caps each one's rows."""
        room = room or {}
        out = [self._pools_panel(now, pool), self._leases_panel(now, pool), self._tasks_panel(now, pool),
               self._hosts_panel(now), self._events_panel(pool)]  # fmt: skip
        for panel in out:
            cap = room.get(panel.title)
            if cap is not None and len(panel.rows) > cap:
                panel.more = len(panel.rows) - max(cap - 1, 0)
                panel.rows = panel.rows[: max(cap - 1, 0)]
        return out

    def _pools_panel(self, now: float, pool: str | None) -> Panel:
        panel = Panel(
            "pools", ("POOL", "STATE", "AVAIL", "ALLOC", "BUSY", "ERR", "BASE", "FETCHED", "PREPARE")
        )
        for name in self.pool_names():
            if pool is not None and name != pool:
                continue
            p = self.pools[name]
            counts = dict.fromkeys(SLOT_STATES, 0)
            for s in self.slots.values():
                if s.get("pool") == name and s.get("state") in counts:
                    counts[s["state"]] += 1
            state = p.get("state") or "-"
            if p.get("error"):
                state += f": {p['error']}"[:60]
            panel.rows.append((name, state, str(counts["available"]), str(counts["allocated"]),
                               str(counts["cleaning"] + counts["creating"] + counts["removing"]), str(counts["error"]),
                               f"{p.get('base') or ''} {render.short(p.get('base_commit'))}".strip(),
                               _fetch(p.get("fetch") or {}, now), _prepare(p.get("prepare"), now)))  # fmt: skip
        return panel

    def _leases_panel(self, now: float, pool: str | None) -> Panel:
        panel = Panel("leases", ("SLOT", "HOLDER", "AGE", "EXPIRES", "TASK"))
        held = [s for s in self.slots.values() if s.get("holder") and (pool is None or s.get("pool") == pool)]
        for s in sorted(held, key=lambda s: s.get("granted_at") or 0):
            age = render.duration(now - s["granted_at"]) if s.get("granted_at") else "-"
            panel.rows.append((s["slot_id"], str(s["holder"]), age, render.until(s.get("expires_at"), now),
                               s.get("task_id") or "-"))  # fmt: skip
        return panel

    def _tasks_panel(self, now: float, pool: str | None) -> Panel:
        panel = Panel("tasks", ("TASK", "STATE", "POOL", "RUNNER", "FOR", "WHY / SLOT"))
        mine = [t for t in self.tasks.values() if pool is None or t.get("pool") == pool]
        running = sorted(
            (t for t in mine if t.get("state") == "running"), key=lambda t: t.get("started_at") or 0
        )
        waiting = sorted((t for t in mine if t.get("state") in ("queued", "blocked")),
                         key=lambda t: t.get("submitted_at") or 0)  # fmt: skip
        failed = sorted((t for t in mine if t.get("state") == "failed"), key=lambda t: t.get("finished_at") or 0,
                        reverse=True)[:FAILURES_SHOWN]  # fmt: skip
        # tasks.list does not say where a task runs; its lease does.
        slot_of = {s["task_id"]: s["slot_id"] for s in self.slots.values() if s.get("task_id")}
        for t in running:
            took = render.duration(now - t["started_at"]) if t.get("started_at") else "-"
            panel.rows.append((t["task_id"], "running", str(t.get("pool")), str(t.get("runner") or "-"), took,
                               t.get("slot_id") or slot_of.get(t["task_id"], "")))  # fmt: skip
        for t in waiting:
            waited = render.duration(now - t["submitted_at"]) if t.get("submitted_at") else "-"
            why = t.get("waiting_on") or ""
            if t.get("reason"):
                why = f"{why}: {t['reason']}" if why else str(t["reason"])
            panel.rows.append((t["task_id"], str(t["state"]), str(t.get("pool")), str(t.get("runner") or "-"), waited,
                               why or "-"))  # fmt: skip
        for t in failed:
            ago = render.ago(t.get("finished_at"), now)
            panel.rows.append((t["task_id"], "failed", str(t.get("pool")), str(t.get("runner") or "-"), ago,
                               str(t.get("reason") or "")))  # fmt: skip
        return panel

    def _hosts_panel(self, now: float) -> Panel:
        panel = Panel("hosts", ("HOST", "STATE", "POOLS", "RUNNING", "LAST CONTACT", "ERROR"))
        for h in self.hosts:
            panel.rows.append((str(h.get("name")), str(h.get("state")), ",".join(h.get("pools") or []),
                               f"{len(h.get('running') or [])}/{h.get('max_concurrency', '-')}",
                               render.ago(h.get("last_contact"), now), str(h.get("error") or "")))  # fmt: skip
        return panel

    def _events_panel(self, pool: str | None) -> Panel:
        panel = Panel("events", ("TIME", "SEQ", "EVENT", "DETAIL"))
        shown = [e for e in self.events if pool is None or e.get("pool") in (pool, None)]
        for e in reversed(shown):
            panel.rows.append((_clock(e.get("ts")), str(e.get("seq") or "-"), str(e.get("type")), _detail(e)))
        return panel


_SKIP = {"seq", "ts", "topic", "type", "subscription", "owner_uid", "runner_uid", "granted_at", "expires_at"}


def _detail(e: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in e.items() if k not in _SKIP and v not in (None, [], {}, ""))[:200]


def _clock(ts: float | None) -> str:
    import time

    return time.strftime("%H:%M:%S", time.localtime(ts)) if ts else "-"


def _fetch(f: dict[str, Any], now: float) -> str:
    if f.get("state") == "failing":
        return (
            f"failing for {render.duration(now - f['failing_since'])}"
            if f.get("failing_since")
            else "failing"
        )
    return render.ago(f.get("last_ok_at"), now) if f.get("last_ok_at") else str(f.get("state") or "-")


def _prepare(prep: dict[str, Any] | None, now: float) -> str:
    if not prep:
        return "-"
    state = str(prep.get("state") or "-")
    if state == "running" and prep.get("started_at"):
        return f"running {render.duration(now - prep['started_at'])}"
    if state == "failed":
        return "failed" + (f": {prep['error'].splitlines()[0][:50]}" if prep.get("error") else "")
    if state == "ready" and prep.get("last_duration_s") is not None:
        return f"ready (took {render.duration(prep['last_duration_s'])})"
    return state


_HANDLERS: dict[str, Callable[[Picture, dict[str, Any]], None]] = {
    "lease.granted": Picture._lease_granted,
    "lease.released": Picture._lease_ended,
    "lease.expired": Picture._lease_ended,
    "lease.revoked": Picture._lease_ended,
    "slot.state": Picture._slot_state,
    "slot.removed": Picture._slot_removed,
    "pool.state": Picture._pool_state,
    "pool.base": Picture._pool_base,
    "pool.fetch": Picture._pool_fetch,
    "pool.prepare": Picture._pool_prepare,
    "pool.added": Picture._pool_lifecycle,
    "pool.draining": Picture._pool_lifecycle,
    "pool.removed": Picture._pool_lifecycle,
    "task.*": Picture._task,
    "daemon.*": Picture._daemon,
}
