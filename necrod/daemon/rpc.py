"""The RPC methods: each checks what only it can check, hands the call to the part that owns it,
and shapes the result.

Parameter types and ranges are checked before these run (``proto.methods``).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from necrod import PROTOCOL_VERSION, __version__
from necrod.core.names import check_lease_id, check_pool_name
from necrod.core.tasks import Task
from necrod.daemon.events import as_seen_by
from necrod.daemon.pickup import patch
from necrod.daemon.resume import SalvagePoint, salvage_point, settled_salvage
from necrod.io.slotfs import read_head
from necrod.io.steps import read_chunk
from necrod.proto.errors import InvalidParams, NotFound, PermissionDenied, UnsupportedProtocol
from necrod.proto.methods import EVENT_TOPICS
from necrod.proto.router import CallContext, Handler, Router

if TYPE_CHECKING:
    from necrod.daemon.allocator import Allocator
    from necrod.daemon.dispatcher import Dispatcher
    from necrod.daemon.events import EventBus
    from necrod.daemon.lifecycle import Lifecycle
    from necrod.daemon.metrics import Metrics
    from necrod.daemon.mirrorkeeper import MirrorKeeper
    from necrod.daemon.pool import Pool
    from necrod.daemon.poolsize import PoolSizer
    from necrod.daemon.slottable import SlotTable
    from necrod.daemon.supervisor import Supervisor
    from necrod.io.store import StateStore


class Api:
    """The RPC methods: each checks who may call it and hands the call to the part that owns it.

    Given the parts it calls, not the daemon: ``status`` and ``reload`` are the daemon's own
    (its view of every part, and the config reload it serialises).
    """

    def __init__(
        self,
        *,
        table: SlotTable,
        allocator: Allocator,
        sizer: PoolSizer,
        lifecycle: Lifecycle,
        keeper: MirrorKeeper,
        dispatcher: Dispatcher,
        store: StateStore,
        bus: EventBus,
        metrics: Metrics,
        supervisor: Supervisor,
        status: Callable[[], dict[str, Any]],
        reload: Callable[[str], Awaitable[dict[str, Any]]],
    ) -> None:
        self.table = table
        self.allocator = allocator
        self.sizer = sizer
        self.lifecycle = lifecycle
        self.keeper = keeper
        self.dispatcher = dispatcher
        self.store = store
        self.bus = bus
        self.metrics = metrics
        self.supervisor = supervisor
        self.daemon_status = status
        self.daemon_reload = reload
        self.pid = os.getpid()
        self.methods: list[str] = []

    def router(self) -> Router:
        """The RPC methods, routed."""
        router = Router()
        for method, handler in {
            "hello": self.hello,
            "daemon.status": self.status,
            "daemon.reload": self.reload,
            "pools.list": self.pools_list,
            "pools.get": self.pools_get,
            "pools.prepare_log": self.prepare_log,
            "slots.list": self.slots_list,
            "slots.allocate": self.allocate,
            "slots.heartbeat": self.heartbeat,
            "slots.release": self.release,
            "slots.add": self.slots_add,
            "slots.remove": self.slots_remove,
            "events.subscribe": self.subscribe,
            "salvage.list": self.salvage_list,
            "salvage.show": self.salvage_show,
            "salvage.diff": self.salvage_diff,
            "salvage.branch": self.salvage_branch,
            "salvage.prune": self.salvage_prune,
            "anomalies.list": self.anomalies,
            "slots.recover": self.recover,
            "slots.isolate": self.isolate,
            "metrics.get": self.metrics_get,
            "tasks.submit": self.tasks_submit,
            "tasks.get": self.tasks_get,
            "tasks.list": self.tasks_list,
            "tasks.cancel": self.tasks_cancel,
            "tasks.retry": self.tasks_retry,
            "tasks.update": self.tasks_update,
            "runners.list": self.runners_list,
            "runners.pause": self.runners_pause,
            "runners.resume": self.runners_resume,
            "pools.refs": self.pools_refs,
            "tasks.logs": self.tasks_logs,
            "hosts.list": self.hosts_list,
        }.items():
            task_call = method.startswith(("tasks.", "runners.", "hosts."))
            router.register(method, self._after_recovery(handler) if task_call else handler)
        self.methods = sorted(router.methods)
        return router

    def _after_recovery(self, handler: Handler) -> Handler:
        """``handler`` once the dispatcher has its tasks and runners back (at once after start-up)."""

        async def wait_then(params: dict[str, Any], ctx: CallContext) -> Any:
            if not self.dispatcher.recovered.is_set():
                await self.dispatcher.recovered.wait()
            return await handler(params, ctx)

        return wait_then

    async def hello(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        protocol = params["protocol"]
        if protocol is not None and protocol != PROTOCOL_VERSION:
            raise UnsupportedProtocol(
                f"this daemon speaks protocol {PROTOCOL_VERSION}, not {protocol}",
                supported=[PROTOCOL_VERSION],
            )
        ctx.client = params["client"]
        return {
            "server": "necrod",
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "pid": self.pid,
            "methods": self.methods,
        }

    async def status(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        return self.daemon_status()

    async def reload(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        return await self.daemon_reload("rpc")

    async def pools_list(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        return {"pools": [p.view() for p in self.table.pools.values()]}

    async def pools_get(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        pool = self.table.pool(params["pool"])
        view = pool.view()
        view["slots_detail"] = self.table.list_slots(pool.name, viewer=ctx.viewer)
        return view

    async def prepare_log(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        pool = self.table.pool(params["pool"])
        if pool.prepare.log is None:
            raise NotFound(f"pool {pool.name} has run no prepare step", pool=pool.name)
        offset, limit = params["offset"] or 0, params["limit"] or 256 * 1024
        data = await anyio.to_thread.run_sync(read_chunk, pool.prepare.log, offset, limit)
        running = pool.prepare.state == "running"
        return {"pool": pool.name, "path": pool.prepare.log, "state": pool.prepare.state, "offset": offset + len(data),
                "data": data.decode("utf-8", "replace"), "eof": not running and len(data) < limit}  # fmt: skip

    async def slots_list(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        slots = self.table.list_slots(params["pool"], params["state"], ctx.viewer)
        held = [s for s in slots if s["state"] == "allocated"]
        if held:
            # Where each held slot's HEAD stands now: a few small files each, read in a worker
            # thread (they are the agent's, and may be on a slow disk).
            where = [self._git_dir(s["slot_id"]) for s in held]
            heads = await anyio.to_thread.run_sync(
                lambda: [read_head(*w) if w else (None, None) for w in where]
            )
            for s, (commit, branch) in zip(held, heads, strict=True):
                s["head_commit"], s["head_branch"] = commit, branch
        return {"slots": slots}

    def _git_dir(self, slot_id: str) -> tuple[Path, str, str | None] | None:
        """Where a slot's HEAD is (``read_head``'s arguments)."""
        try:
            slot = self.table.slot(slot_id)
            root, git_dir = self.table.pool(slot.pool).kind_of(slot).git_dir_at(slot.admin, slot.path)
        except NotFound:
            return None
        return root, git_dir, None if slot.kind == "worktree" else git_dir

    async def allocate(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        resume = await self._salvage_to_resume(params, ctx) if params["from_salvage"] else None
        lease = await self.allocator.allocate(
            pool=params["pool"],
            holder=params["holder"] or ctx.client or f"pid:{ctx.peer.pid}",
            ttl_s=params["ttl_s"],
            ref=params["ref"],
            branch=params["branch"],
            wait_s=params["wait_s"],
            metadata=params["metadata"],
            uid=ctx.peer.uid,
            affinity=params["affinity"],
            ports=params["ports"],
            sparse=params["sparse"],
            resume=resume,
            admin=ctx.admin,
        )
        # A lease nobody heard about (the caller vanished while queued) goes back at once.
        ctx.undelivered.append(lambda: self.allocator.abandon(lease["lease_id"]))
        return lease

    async def _salvage_to_resume(self, params: dict[str, Any], ctx: CallContext) -> SalvagePoint:
        lease_id = check_lease_id(params["from_salvage"])
        if params["ref"] is not None:
            raise InvalidParams(
                "from_salvage starts at the salvaged lease's commit: pass no ref", param="ref"
            )
        point = await settled_salvage(self.table.pool(params["pool"]), lease_id)
        if point is None:
            raise NotFound(f"no salvage of lease {lease_id} in pool {params['pool']} (it left nothing to keep, "
                           "or was another pool's)", lease_id=lease_id)  # fmt: skip
        if not ctx.may_act_for(point.uid):
            raise PermissionDenied(f"the salvage of lease {lease_id} is not yours (uid {ctx.peer.uid}); "
                                   "only its owner or an admin may resume it", lease_id=lease_id)  # fmt: skip
        return point

    def _check_lease(self, lease_id: str, ctx: CallContext) -> None:
        """A lease is acted on by the uid that took it (or its task's runner), or an admin."""
        lease = self.table.slot_for_lease(lease_id).lease
        assert lease is not None
        if not ctx.admin and not lease.held_by(ctx.peer.uid):
            raise PermissionDenied(
                f"lease {lease_id} is not yours (uid {ctx.peer.uid}); only its owner or an admin may act on it",
                lease_id=lease_id,
            )

    async def heartbeat(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        self._check_lease(params["lease_id"], ctx)
        return await self.allocator.heartbeat(params["lease_id"], params["ttl_s"])

    async def release(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        self._check_lease(params["lease_id"], ctx)
        return await self.allocator.release(params["lease_id"], params["salvage"])

    async def slots_add(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        return await self.sizer.add_slot(params["pool"], params["wait_s"])

    async def slots_remove(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        return await self.lifecycle.remove_slot(params["slot_id"], force=bool(params["force"]))

    async def subscribe(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        topics = params["topics"]
        if topics is not None:
            unknown = sorted(set(topics) - set(EVENT_TOPICS))
            if unknown:
                raise InvalidParams(
                    f"unknown topic(s) {', '.join(unknown)}; known: {', '.join(EVENT_TOPICS)}", param="topics"
                )
        since = params["since"]
        snapshot = params["snapshot"] if params["snapshot"] is not None else since is None
        if ctx.notify is None or ctx.spawn is None:
            raise InvalidParams("this connection cannot receive events")
        store, bus = self.store, self.bus
        # Registered and measured with no await in between: nothing committed can fall in a gap.
        sub = bus.subscribe(topics, connection=ctx.connection_id, uid=None if ctx.admin else ctx.peer.uid)
        ctx.on_close.append(lambda: bus.unsubscribe(sub))
        last = store.last_seq
        truncated = False
        if since is not None:
            first = store.first_seq()
            truncated = since + 1 < first and since < last
            if truncated:
                since = first - 1
        result: dict[str, Any] = {
            "subscription": "s-" + secrets.token_hex(4),
            "seq": last,
            "truncated": truncated,
        }
        if snapshot:
            result["snapshot"] = {
                "pools": [p.view() for p in self.table.pools.values()],
                "slots": self.table.list_slots(viewer=ctx.viewer),
            }
        notify, spawn, close, viewer = ctx.notify, ctx.spawn, ctx.close, ctx.viewer
        # An admin's replays wait only behind its own connection's; anyone else's behind its uid's.
        turn = ("connection", ctx.connection_id) if ctx.admin else ("uid", ctx.peer.uid)
        sid = result["subscription"]

        async def overflow(message: str) -> None:
            await notify("event", {"subscription": sid, "type": "overflow", "topic": "daemon", "seq": None,
                                   "message": message})  # fmt: skip
            if close is not None:
                close()

        async def send(event: dict[str, Any]) -> None:
            await notify("event", {"subscription": sid, **event})

        async def pump() -> None:
            # Live events are queued on ``sub`` from the moment it was registered, so the
            # replay (up to ``last``) and then the queue (after ``last``) leave no gap.
            if since is not None and not await bus.replay(
                store, sub, turn=turn, since=since, until=last, viewer=viewer, send=send
            ):
                if sub.closed:
                    return
                await overflow(
                    "subscriber fell too far behind; reconnect with since to resume"
                    if sub.overflowed
                    else "the history was pruned past this replay while it ran; reconnect with "
                    "since to resume (the reply will say truncated)"
                )
                return
            while True:
                batch = await sub.next_batch()
                for event in batch:
                    if event.seq > last:
                        await send(as_seen_by(event, viewer))
                if sub.overflowed:
                    await overflow("subscriber fell too far behind; reconnect with since to resume")
                    return
                if sub.closed:
                    return

        ctx.after_reply.append(lambda: spawn(pump))
        return result

    async def salvage_list(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        names = [check_pool_name(params["pool"])] if params["pool"] else list(self.table.pools)
        out: list[dict[str, Any]] = []
        for name in names:
            pool = self.table.pool(name)
            if not pool.mirror.exists:
                continue
            items = await pool.mirror.salvage_refs()
            out.extend({"pool": name, **item.view()} for item in items if ctx.may_act_for(item.uid))
        out.sort(key=lambda i: -int(i["date"]))
        return {"salvage": out}

    async def salvage_show(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        lease_id = check_lease_id(params["lease_id"])
        for pool in self.table.pools.values():
            if not pool.mirror.exists:
                continue
            shown = await pool.mirror.show_salvage(lease_id)
            if shown is not None:
                owner = shown["uid"]
                if not ctx.may_act_for(owner if isinstance(owner, int) else None):
                    raise PermissionDenied(
                        f"the salvage of lease {lease_id} is not yours (uid {ctx.peer.uid}); "
                        "only its owner or an admin may read it",
                        lease_id=lease_id,
                    )
                return {"pool": pool.name, **shown}
        raise NotFound(f"no salvage for lease {lease_id}", lease_id=lease_id)

    async def _salvage_of(self, lease_id: str, ctx: CallContext) -> tuple[Pool, SalvagePoint]:
        for pool in self.table.pools.values():
            if not pool.mirror.exists:
                continue
            point = await salvage_point(pool.mirror.git, pool.mirror.path, lease_id)
            if point is None:
                continue
            if not ctx.may_act_for(point.uid):
                raise PermissionDenied(f"the salvage of lease {lease_id} is not yours (uid {ctx.peer.uid}); "
                                       "only its owner or an admin may use it", lease_id=lease_id)  # fmt: skip
            return pool, point
        raise NotFound(f"no salvage for lease {lease_id}", lease_id=lease_id)

    async def salvage_diff(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        pool, point = await self._salvage_of(check_lease_id(params["lease_id"]), ctx)
        found = await patch(pool.mirror, point, binary=bool(params["binary"]))
        return {"pool": pool.name, "lease_id": point.lease_id, "start": point.start, "commit": point.commit,
                "patch": found.text, "truncated": found.truncated}  # fmt: skip

    async def salvage_branch(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        pool, point = await self._salvage_of(check_lease_id(params["lease_id"]), ctx)
        message = params["message"] or f"Work of lease {point.lease_id}, picked up from its salvage"
        branch, push = params["branch"], bool(params["push"])
        commit = await self.keeper.salvage_branch(pool, point, branch, message, push=push)
        return {"pool": pool.name, "lease_id": point.lease_id, "branch": branch, "commit": commit, "pushed": push,
                "fetch": f"git fetch {pool.mirror.path} refs/heads/{branch}"}  # fmt: skip

    async def salvage_prune(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        pool = check_pool_name(params["pool"]) if params["pool"] else None
        pruned = await self.keeper.prune_salvage(pool, dry_run=bool(params["dry_run"]))
        return {"pruned": pruned, "dry_run": bool(params["dry_run"])}

    async def anomalies(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        found = await self.supervisor.scan(
            params["pool"], heal=bool(params["heal"]), deep=bool(params["deep"])
        )
        return {"anomalies": found, "healed": bool(params["heal"])}

    async def recover(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        return await self.lifecycle.recover(params["slot_id"])

    async def isolate(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        return await self.lifecycle.isolate(params["slot_id"], params["reason"])

    async def metrics_get(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        return {"text": self.metrics.render()}

    async def tasks_submit(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        return await self.dispatcher.submit(
            {k: v for k, v in params.items() if v is not None}, ctx.peer.uid, admin=ctx.admin
        )

    def _own_tasks(self, ctx: CallContext, task_id: str | None, batch: str | None) -> None:
        """Only a task's submitter (or an admin) may cancel, retry or read it."""
        d = self.dispatcher
        targets: list[Task] = [d.task(task_id)] if task_id else d.matching(batch=batch) if batch else []
        for task in targets:
            if not ctx.may_act_for(task.uid):
                raise PermissionDenied(
                    f"task {task.task_id} is not yours (uid {ctx.peer.uid}); only its submitter or an admin "
                    "may do that",
                    task_id=task.task_id,
                )

    async def tasks_get(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        task = self.dispatcher.task(params["task_id"])
        view = task.view(owner=ctx.may_act_for(task.uid))
        view["dependents"] = sorted(self.dispatcher.dependents.get(task.task_id, ()))
        return view

    async def tasks_list(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        dispatcher = self.dispatcher
        tasks = dispatcher.matching(state=params["state"], pool=params["pool"], label=params["label"],
                                batch=params["batch"])  # fmt: skip
        result: dict[str, Any] = {"tasks": dispatcher.book.briefs(tasks)}
        if params["graph"]:
            result["levels"] = dispatcher.graph(tasks)
        return result

    @staticmethod
    def _who(ctx: CallContext) -> dict[str, Any]:
        """Who made a call, as tasks and events record it."""
        return {"uid": ctx.peer.uid, "pid": ctx.peer.pid, "client": ctx.client}

    async def tasks_cancel(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        self._own_tasks(ctx, params["task_id"], params["batch"])
        return await self.dispatcher.cancel(params["task_id"], params["batch"], reason=params["reason"],
                                            force=bool(params["force"]), by=self._who(ctx))  # fmt: skip

    async def tasks_update(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        self._own_tasks(ctx, params["task_id"], None)
        return await self.dispatcher.book.update(params["task_id"], priority=params["priority"],
                                                 labels=params["labels"], by=self._who(ctx))  # fmt: skip

    async def runners_list(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        return {"runners": self.dispatcher.runner_views()}

    async def runners_pause(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        return await self.dispatcher.profiles.pause(params["runner"], paused=True, reason=params["reason"],
                                                by=self._who(ctx))  # fmt: skip

    async def runners_resume(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        return await self.dispatcher.profiles.pause(params["runner"], paused=False, by=self._who(ctx))

    async def pools_refs(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        return await self.keeper.refs(params["pool"], params["pattern"])

    async def tasks_retry(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        self._own_tasks(ctx, params["task_id"], params["batch"])
        return await self.dispatcher.retry(params["task_id"], params["batch"])

    async def tasks_logs(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        self._own_tasks(ctx, params["task_id"], None)
        return await self.dispatcher.logs(params["task_id"], params["attempt"], params["offset"] or 0,
                                      params["limit"] or 256 * 1024)  # fmt: skip

    async def hosts_list(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        return {"hosts": self.dispatcher.hosts()}
