"""Hostile socket peers and other local users (issue 16, defects 5, 6, 7, 14 and 17(d)).

Every test runs the real daemon (as root, like the shipped unit) and plays the other side from
a forked child that drops to another uid: ``OWNER`` (65533) takes leases and submits tasks,
``INTRUDER`` (65534) tries to act on them. Both may use the socket through ``socket_group``
(their primary group is ``nogroup``); neither is an admin unless a test makes that group the
``admin_group``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import shutil
import signal
import socket as socketlib
import sqlite3
import statistics
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from necrod.client import Client
from necrod.ctl.main import main as necroctl_main
from necrod.daemon.main import main as necrod_main
from necrod.proto.errors import NecrodError
from tests.helpers import Necrod, same_turn, wait_for
from tests.reliability.conftest import FIGURES, Raw, daemon_config, request, rss_kb

pytestmark = pytest.mark.reliability

OWNER = 65533
INTRUDER = 65534
NOGROUP = 65534
SHARED = {"socket_group": "nogroup"}


@pytest.fixture(autouse=True)
def _root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("playing other uids needs root")


@contextlib.contextmanager
def holding_as_uid(uid: int, action: Callable[[], Any], timeout: float = 60.0) -> Iterator[Any]:
    """Run ``action`` in a forked child as ``uid`` (group ``nogroup``, no supplementary groups)
    and yield what it returned (``{"error": kind, "message": ...}`` for a ``NecrodError``); the
    child keeps whatever it opened until the block ends."""
    results_r, results_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 0
        try:
            os.close(results_r)
            os.close(hold_w)
            os.setgroups([])
            os.setgid(NOGROUP)
            os.setuid(uid)
            try:
                out: Any = {"ok": action()}
            except NecrodError as exc:
                out = {"ok": {"error": exc.kind, "message": exc.message}}
            os.write(results_w, json.dumps(out).encode())
            os.close(results_w)
            os.read(hold_r, 1)  # until the parent closes its end
        except BaseException:
            os.write(results_w, json.dumps({"crash": traceback.format_exc()}).encode())
            status = 1
        finally:
            os._exit(status)
    os.close(results_w)
    os.close(hold_r)
    try:
        data = b""
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([results_r], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"the child as uid {uid} did not finish in {timeout}s")
            chunk = os.read(results_r, 1 << 16)
            if not chunk:
                break
            data += chunk
        result = json.loads(data)
        assert "crash" not in result, result["crash"]
        yield result["ok"]
    finally:
        os.close(results_r)
        os.close(hold_w)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)


def as_uid(uid: int, action: Callable[[], Any], timeout: float = 60.0) -> Any:
    """``holding_as_uid`` for an action that keeps nothing open."""
    with holding_as_uid(uid, action, timeout) as result:
        return result


def call_as(uid: int, d: Necrod, method: str, params: dict[str, Any] | None = None) -> Any:
    def act() -> Any:
        with Client(d.socket, timeout=20) as c:
            return c.call(method, params)

    return as_uid(uid, act)


def refused(reply: Any, kind: str = "permission_denied") -> bool:
    return isinstance(reply, dict) and reply.get("error") == kind


@pytest.fixture
def shared_daemon(
    necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path
) -> Iterator[Callable[..., Necrod]]:
    """A daemon whose socket other uids may reach (``socket_group: nogroup``)."""
    workdir.chmod(0o711)

    def make(daemon: dict[str, Any] | None = None, extra: str = "", **defaults: Any) -> Necrod:
        (workdir / "d").mkdir(exist_ok=True)
        (workdir / "d").chmod(0o711)
        pool = {"slots": 2, "min_idle": 0, **defaults}
        return necrod_factory(daemon_config({"repo": origin}, {**SHARED, **(daemon or {})}, **pool) + extra)

    yield make


# --- defect 5: a lease belongs to the uid that took it ------------------------------------------


def test_another_uids_lease_cannot_be_heartbeaten_released_or_seen(
    shared_daemon: Callable[..., Necrod],
) -> None:
    d = shared_daemon()
    lease = call_as(OWNER, d, "slots.allocate", {"pool": "repo", "ttl_s": 600})
    lease_id = lease["lease_id"]
    # The intruder does not see the id...
    listed = call_as(INTRUDER, d, "slots.list", {"pool": "repo"})["slots"]
    held = next(s for s in listed if s["slot_id"] == lease["slot_id"])
    assert held["state"] == "allocated" and held["lease_id"] is None and held["owner_uid"] == OWNER
    detail = call_as(INTRUDER, d, "pools.get", {"pool": "repo"})["slots_detail"]
    assert all(s["lease_id"] is None for s in detail)
    # ...and knowing it is not enough: no short heartbeat, no release.
    assert refused(call_as(INTRUDER, d, "slots.heartbeat", {"lease_id": lease_id, "ttl_s": 1}))
    assert refused(call_as(INTRUDER, d, "slots.release", {"lease_id": lease_id, "salvage": False}))
    FIGURES["calls on another uid's lease refused"] += 2
    # The owner sees and keeps its lease; the daemon's lease TTL was never shortened.
    mine = call_as(OWNER, d, "slots.list", {"pool": "repo"})["slots"]
    assert lease_id in [s["lease_id"] for s in mine]
    beat = call_as(OWNER, d, "slots.heartbeat", {"lease_id": lease_id})
    assert beat["ttl_s"] == 600
    # An admin (root) sees every lease and may end it.
    assert lease_id in [s["lease_id"] for s in d.call("slots.list", {"pool": "repo"})["slots"]]
    assert d.call("slots.release", {"lease_id": lease_id, "salvage": False})["slot_id"] == lease["slot_id"]


def test_another_uids_salvage_cannot_be_listed_or_read(shared_daemon: Callable[..., Necrod]) -> None:
    d = shared_daemon()
    lease = call_as(OWNER, d, "slots.allocate", {"pool": "repo", "ttl_s": 600})
    (Path(lease["path"]) / "private-work.txt").write_text("the owner's work\n")
    call_as(OWNER, d, "slots.release", {"lease_id": lease["lease_id"]})
    wait_for(lambda: any(i["lease_id"] == lease["lease_id"] for i in d.call("salvage.list")["salvage"]),
             30, what="the salvage")  # fmt: skip
    listed = call_as(INTRUDER, d, "salvage.list", {})["salvage"]
    assert lease["lease_id"] not in [i["lease_id"] for i in listed]
    assert refused(call_as(INTRUDER, d, "salvage.show", {"lease_id": lease["lease_id"]}))
    mine = call_as(OWNER, d, "salvage.list", {})["salvage"]
    assert [i["uid"] for i in mine if i["lease_id"] == lease["lease_id"]] == [OWNER]
    shown = call_as(OWNER, d, "salvage.show", {"lease_id": lease["lease_id"]})
    assert "private-work.txt" in [f["path"] for f in shown["files"]]
    assert d.call("salvage.show", {"lease_id": lease["lease_id"]})["uid"] == OWNER  # admins see all
    FIGURES["calls on another uid's lease refused"] += 1


def test_admin_methods_need_the_admin_role(shared_daemon: Callable[..., Necrod]) -> None:
    d = shared_daemon()
    lease = call_as(OWNER, d, "slots.allocate", {"pool": "repo", "ttl_s": 600})
    sid = lease["slot_id"]
    for method, params in [
        ("daemon.reload", {}),
        ("slots.isolate", {"slot_id": sid, "reason": "mine now"}),
        ("slots.remove", {"slot_id": sid, "force": True}),
        ("slots.recover", {"slot_id": sid}),
        ("slots.add", {"pool": "repo"}),
        ("anomalies.list", {"heal": True}),
        ("salvage.prune", {}),
    ]:
        assert refused(call_as(INTRUDER, d, method, params)), method
        assert refused(call_as(OWNER, d, method, params)), method
        FIGURES["admin calls by a non-admin refused"] += 2
    # Nothing changed: the lease is still held, by its owner.
    assert call_as(OWNER, d, "slots.heartbeat", {"lease_id": lease["lease_id"]})["slot_id"] == sid
    assert d.call("daemon.reload")["generation"] >= 1  # root is an admin


def test_the_admin_group_is_admin_for_every_lease(shared_daemon: Callable[..., Necrod]) -> None:
    d = shared_daemon({"admin_group": "nogroup"})  # both test uids are in it: both are admins
    lease = call_as(OWNER, d, "slots.allocate", {"pool": "repo", "ttl_s": 600})
    listed = call_as(INTRUDER, d, "slots.list", {"pool": "repo"})["slots"]
    assert lease["lease_id"] in [s["lease_id"] for s in listed]
    isolated = call_as(INTRUDER, d, "slots.isolate", {"slot_id": lease["slot_id"], "reason": "inspect"})
    assert isolated["slot_id"] == lease["slot_id"] and isolated["state"] == "allocated"
    released = call_as(INTRUDER, d, "slots.release", {"lease_id": lease["lease_id"], "salvage": False})
    assert released["slot_id"] == lease["slot_id"]


def test_events_show_lease_ids_to_their_owner_only(shared_daemon: Callable[..., Necrod]) -> None:
    d = shared_daemon()

    def watch_grant(allocate: bool) -> Any:
        with Client(d.socket, timeout=20) as c:
            sub = c.call("events.subscribe", {"topics": ["leases"], "since": 0})
            if allocate:
                with Client(d.socket, timeout=20) as c2:
                    c2.allocate("repo", ttl_s=600)
            for event in c.events(timeout=20):
                if event.get("type") == "lease.granted":
                    return {"event": event, "snapshot": sub.get("snapshot")}
        return None

    owner_view = as_uid(OWNER, lambda: watch_grant(True))
    assert owner_view["event"]["lease_id"] is not None and owner_view["event"]["owner_uid"] == OWNER
    # The intruder replays the same history: the grant is there, its lease id is not.
    intruder_view = as_uid(INTRUDER, lambda: watch_grant(False))
    assert intruder_view["event"]["seq"] == owner_view["event"]["seq"]
    assert intruder_view["event"]["lease_id"] is None
    snapshot = call_as(INTRUDER, d, "events.subscribe", {"snapshot": True})["snapshot"]
    assert all(s["lease_id"] is None for s in snapshot["slots"])


#: Runner profiles: ``open`` runs anyone's tasks (as the daemon's uid: the operator said so),
#: ``mine`` only admins' (the default for a ``process`` runner); tasks that name none go to ``mine``.
RUNNERS = """\
dispatcher:
  default_runner: mine
runners:
  open:
    submitters: anyone
    max_concurrency: 4
  mine:
    command: ["id", "-u"]
    skills: [build]
"""


def test_another_uids_task_cannot_be_cancelled_retried_or_read(shared_daemon: Callable[..., Necrod]) -> None:
    d = shared_daemon(extra=RUNNERS)
    submitted = call_as(OWNER, d, "tasks.submit", {"pool": "repo", "runner": "open", "command": ["sleep", "60"],
                                                   "env": {"API_TOKEN": "s3cret"}, "payload": {"k": "s3cret"}})  # fmt: skip
    task_id = submitted["task_id"]
    wait_for(
        lambda: d.call("tasks.get", {"task_id": task_id})["state"] == "running", 30, what="the task to run"
    )
    assert refused(call_as(INTRUDER, d, "tasks.cancel", {"task_id": task_id}))
    assert refused(call_as(INTRUDER, d, "tasks.retry", {"task_id": task_id}))
    assert refused(call_as(INTRUDER, d, "tasks.logs", {"task_id": task_id}))
    seen = call_as(INTRUDER, d, "tasks.get", {"task_id": task_id})
    assert seen["state"] == "running" and all(a["lease_id"] is None for a in seen["attempts"])
    assert "s3cret" not in json.dumps(seen), "another uid read the task's env or payload"
    assert call_as(OWNER, d, "tasks.get", {"task_id": task_id})["env"] == {"API_TOKEN": "s3cret"}
    # The task's lease is its submitter's.
    lease_id = d.call("tasks.get", {"task_id": task_id})["attempts"][0]["lease_id"]
    assert refused(call_as(INTRUDER, d, "slots.release", {"lease_id": lease_id}))
    assert call_as(OWNER, d, "slots.heartbeat", {"lease_id": lease_id})["lease_id"] == lease_id
    assert call_as(OWNER, d, "tasks.cancel", {"task_id": task_id})["state"] == "cancelled"


def test_a_peer_that_is_not_an_admin_cannot_have_code_run_as_the_daemon(
    shared_daemon: Callable[..., Necrod],
) -> None:
    """A ``process`` runner runs as the daemon's uid, an admin: a task of a peer that is not one
    there (its own command, or a profile's with its ``env``: ``LD_PRELOAD``) would hand it every
    lease, task and key of the daemon. Refused, naming the profiles; an admin's goes on."""
    d = shared_daemon(extra=RUNNERS)
    for params in ({"command": ["id", "-u"]}, {"runner": "mine"}, {"skills": ["build"]},
                   {"runner": "mine", "env": {"LD_PRELOAD": "/tmp/evil.so"}},
                   {"tasks": [{"runner": "open", "command": ["true"]}, {"runner": "mine"}]}):  # fmt: skip
        reply = call_as(OWNER, d, "tasks.submit", {"pool": "repo", **params})
        assert refused(reply), (params, reply)
    reply = call_as(OWNER, d, "tasks.submit", {"pool": "repo", "runner": "mine"})
    assert "is not an admin" in reply["message"] and "mine" in reply["message"], reply
    assert d.call("tasks.list", {})["tasks"] == [], "a refused batch left a task behind"
    # What an admin submits runs there, as the daemon.
    task_id = d.call("tasks.submit", {"pool": "repo", "runner": "mine"})["task_id"]
    wait_for(lambda: d.call("tasks.get", {"task_id": task_id})["state"] == "succeeded", 60, what="the task")
    assert d.call("tasks.logs", {"task_id": task_id})["data"].strip() == "0"


def test_one_uid_cannot_take_every_slot_or_fill_the_queue(shared_daemon: Callable[..., Necrod]) -> None:
    d = shared_daemon({"max_leases_per_uid": 1, "max_tasks_per_uid": 3}, extra=RUNNERS, slots=3, max_slots=3)
    mine = call_as(OWNER, d, "slots.allocate", {"pool": "repo"})
    assert refused(call_as(OWNER, d, "slots.allocate", {"pool": "repo", "wait_s": 5}), "resource_exhausted")
    assert "max_leases_per_uid" in call_as(OWNER, d, "slots.allocate", {"pool": "repo"})["message"]
    other = call_as(INTRUDER, d, "slots.allocate", {"pool": "repo"})
    assert "lease_id" in other, "the cap is per uid"
    admins = d.call("slots.allocate", {"pool": "repo"})
    assert "lease_id" in admins, "an admin is not held to it"
    call_as(OWNER, d, "slots.release", {"lease_id": mine["lease_id"]})
    call_as(INTRUDER, d, "slots.release", {"lease_id": other["lease_id"]})
    d.call("slots.release", {"lease_id": admins["lease_id"]})
    # A task's lease counts against its submitter's tasks, not its leases.
    task_id = call_as(
        OWNER, d, "tasks.submit", {"pool": "repo", "runner": "open", "command": ["sleep", "60"]}
    )["task_id"]
    wait_for(
        lambda: d.call("tasks.get", {"task_id": task_id})["state"] == "running", 30, what="the task to run"
    )
    again = call_as(OWNER, d, "slots.allocate", {"pool": "repo", "wait_s": 30})
    assert "lease_id" in again, again
    call_as(OWNER, d, "slots.release", {"lease_id": again["lease_id"]})
    call_as(OWNER, d, "tasks.cancel", {"task_id": task_id})
    d.call("runners.pause", {"runner": "open", "reason": "hold the queue"})
    batch = call_as(OWNER, d, "tasks.submit", {"pool": "repo", "runner": "open", "command": ["true"],
                                               "tasks": [{}, {}]})  # fmt: skip
    assert len(batch["tasks"]) == 2
    reply = call_as(OWNER, d, "tasks.submit", {"pool": "repo", "runner": "open", "tasks": [{}, {}],
                                               "command": ["true"]})  # fmt: skip
    assert refused(reply, "resource_exhausted") and "max_tasks_per_uid" in reply["message"], reply
    assert "task_id" in call_as(
        OWNER, d, "tasks.submit", {"pool": "repo", "runner": "open", "command": ["true"]}
    )
    assert all("task_id" in d.call("tasks.submit", {"pool": "repo", "runner": "open", "command": ["true"]})
               for _ in range(4))  # fmt: skip
    FIGURES["calls past a per-uid quota refused"] += 3


def test_submits_in_one_turn_cannot_pass_the_task_quota(shared_daemon: Callable[..., Necrod]) -> None:
    """Each submit counted the uid's tasks in the index, which a submit's tasks join only once
    committed: submits in one loop turn each saw none of the others', and all were taken."""
    d = shared_daemon({"max_tasks_per_uid": 3}, extra=RUNNERS)
    d.call("runners.pause", {"runner": "open", "reason": "hold the queue"})
    call = ("tasks.submit", {"pool": "repo", "runner": "open", "command": ["true"]})
    replies = as_uid(OWNER, lambda: same_turn(d, *[call] * 6))
    assert sum("result" in r for r in replies) == 3, replies
    assert all("max_tasks_per_uid" in r["error"]["message"] for r in replies if "error" in r), replies


def test_owners_survive_a_restart_and_rows_without_one_are_admin_only(
    shared_daemon: Callable[..., Necrod],
) -> None:
    d = shared_daemon()
    kept = call_as(OWNER, d, "slots.allocate", {"pool": "repo", "ttl_s": 600})
    legacy = call_as(OWNER, d, "slots.allocate", {"pool": "repo", "ttl_s": 600})
    d.kill9()
    # Make the second lease look like one recorded before leases had owners.
    db = sqlite3.connect(d.state_dir / "necrod.db")
    with db:
        (data,) = db.execute(
            "SELECT data FROM records WHERE kind='slot' AND key=?", (legacy["slot_id"],)
        ).fetchone()
        row = json.loads(data)
        del row["lease"]["uid"], row["lease"]["runner_uid"]
        db.execute(
            "UPDATE records SET data=? WHERE kind='slot' AND key=?", (json.dumps(row), legacy["slot_id"])
        )
    db.close()
    d.start()
    assert refused(call_as(INTRUDER, d, "slots.heartbeat", {"lease_id": kept["lease_id"], "ttl_s": 1}))
    assert (
        call_as(OWNER, d, "slots.heartbeat", {"lease_id": kept["lease_id"]})["lease_id"] == kept["lease_id"]
    )
    assert refused(call_as(OWNER, d, "slots.heartbeat", {"lease_id": legacy["lease_id"]}))
    assert d.call("slots.heartbeat", {"lease_id": legacy["lease_id"]})["lease_id"] == legacy["lease_id"]


def test_an_admin_group_that_does_not_exist_is_refused_at_reload(
    shared_daemon: Callable[..., Necrod], origin: Path
) -> None:
    d = shared_daemon()
    assert d.config_path is not None
    d.config_path.write_text(daemon_config({"repo": origin}, {**SHARED, "admin_group": "no-such-group-16"}))
    with pytest.raises(NecrodError) as caught:
        d.call("daemon.reload")
    assert caught.value.kind == "failed_precondition" and "admin_group" in caught.value.message
    assert d.call("daemon.status")["config"]["last_reload_error"] is not None


# --- defect 6: no peer exhausts connections or memory for the others ------------------------------


def open_connections(d: Necrod, count: int) -> Callable[[], Any]:
    """An action: open ``count`` connections that each get an answer to ``hello``, then one more;
    returns how many were served and what the extra one was told."""

    def act() -> Any:
        held = []
        for i in range(count):
            conn = Raw(d.socket)
            held.append(conn)
            reply = conn.ask(request("hello", {"client": f"hog-{i}"}, id=i))
            assert reply is not None and "result" in reply, reply
        extra = Raw(d.socket)
        held.append(extra)
        told = extra.ask(request("hello", {"client": "one more"}))
        # Kept open by the child until the test lets it go (the objects stay referenced here).
        act.held = held  # type: ignore[attr-defined]
        return {"served": count, "extra": told}

    return act


def test_one_uid_cannot_take_every_connection(shared_daemon: Callable[..., Necrod]) -> None:
    d = shared_daemon({"max_connections": 40, "max_connections_per_uid": 12})
    lease = call_as(OWNER, d, "slots.allocate", {"pool": "repo", "ttl_s": 600})
    with holding_as_uid(INTRUDER, open_connections(d, 12)) as hog:
        assert hog["extra"]["error"]["data"]["kind"] == "resource_exhausted", hog
        assert "12 connections" in hog["extra"]["error"]["message"]
        FIGURES["connections refused to a uid over its cap"] += 1
        # Another uid's holder still heartbeats, and the operator still sees everything.
        assert (
            call_as(OWNER, d, "slots.heartbeat", {"lease_id": lease["lease_id"]})["lease_id"]
            == lease["lease_id"]
        )
        assert d.call("daemon.status")["connections"] >= 12
        # The same uid again, from another process: the cap is per uid, not per process.
        again = call_as(INTRUDER, d, "daemon.status")
        assert again["error"] == "resource_exhausted"
    wait_for(lambda: call_as(INTRUDER, d, "daemon.status").get("pid"), 20, what="the uid to be served again")


def test_admins_are_not_held_to_the_per_uid_cap(shared_daemon: Callable[..., Necrod]) -> None:
    d = shared_daemon({"max_connections": 40, "max_connections_per_uid": 4})
    conns = [Raw(d.socket) for _ in range(10)]  # root: the daemon's own operator
    try:
        for i, conn in enumerate(conns):
            reply = conn.ask(request("hello", {"client": "root"}, id=i))
            assert reply is not None and "result" in reply
    finally:
        for conn in conns:
            conn.close()


def trickle(conn: Raw, data: bytes, every: float, stop: threading.Event) -> None:
    for i in range(len(data)):
        if stop.is_set():
            return
        try:
            conn.send(data[i : i + 1])
        except OSError:
            return
        time.sleep(every)


def test_a_line_must_arrive_whole_within_the_read_deadline(shared_daemon: Callable[..., Necrod]) -> None:
    d = shared_daemon({"read_timeout_s": 2})
    stop = threading.Event()
    slow = [Raw(d.socket) for _ in range(5)]
    threads = [
        threading.Thread(target=trickle, args=(conn, request("daemon.status") * 50, 0.3, stop), daemon=True)
        for conn in slow
    ]
    started = time.monotonic()
    try:
        for t in threads:
            t.start()
        # A byte every 0.3 s never lets a receive time out; the line's deadline cuts it.
        for conn in slow:
            assert conn.closed_by_peer(timeout=15), "a client trickling one byte at a time was never cut off"
        assert time.monotonic() - started < 10
        FIGURES["slow-trickle (slowloris) clients cut off"] += len(slow)
    finally:
        stop.set()
        for conn in slow:
            conn.close()
    # A bulk trickle (64 KiB a second towards a 1 MiB line) is cut off the same way.
    with Raw(d.socket) as bulk:
        bulk.send(b'{"jsonrpc":"2.0","id":1,"method":"hello","params":{"client":"')
        cut = time.monotonic()
        with contextlib.suppress(OSError):
            for _ in range(10):
                bulk.send(b"x" * 65536)
                time.sleep(1)
        assert bulk.closed_by_peer(timeout=10) and time.monotonic() - cut < 12
    # Pipelined requests that each arrive in time are all answered.
    with Raw(d.socket) as fine:
        fine.send(request("hello", {"client": "a"}, id=1) + request("daemon.status", {}, id=2))
        assert [fine.line()["id"], fine.line()["id"]] == [1, 2]  # type: ignore[index]


def half_lines(d: Necrod, count: int, size: int) -> Callable[[], Any]:
    """An action: ``count`` connections that each send ``size`` bytes of a line and no newline;
    returns the kinds of the errors they got (None: held without a word)."""

    def act() -> Any:
        held = [Raw(d.socket, timeout=5) for _ in range(count)]
        act.held = held  # type: ignore[attr-defined]
        head = b'{"jsonrpc":"2.0","id":1,"method":"hello","params":{"client":"'
        told: list[Any] = []
        for conn in held:
            with contextlib.suppress(OSError):
                conn.send(head + b"x" * (size - len(head)))
            time.sleep(0.05)
        for conn in held:
            conn.sock.settimeout(0.5)
            try:
                reply = conn.line()
            except TimeoutError:
                reply = None
            told.append(reply["error"]["data"]["kind"] if reply else None)
        return told

    return act


def test_half_sent_lines_cannot_exhaust_memory(shared_daemon: Callable[..., Necrod]) -> None:
    d = shared_daemon({"max_buffered_bytes": "8MiB", "read_timeout_s": 60})
    assert d.proc is not None
    before = rss_kb(d.proc.pid)
    lease = call_as(OWNER, d, "slots.allocate", {"pool": "repo", "ttl_s": 600})
    # One non-admin uid: a quarter of the budget (2 MiB), so the third 900 KiB line is refused.
    with holding_as_uid(INTRUDER, half_lines(d, 6, 900 << 10)) as told:
        assert told[:2] == [None, None] and set(told[2:]) == {"resource_exhausted"}, told
        # Everybody together: the whole budget. root (an admin) fills the rest of it...
        with holding_as_uid(0, half_lines(d, 12, 900 << 10)) as told_root:
            assert None in told_root and told_root.count("resource_exhausted") >= 4, told_root
            FIGURES["half-sent 900 KiB lines refused over the buffer budget"] += told.count(
                "resource_exhausted"
            ) + told_root.count("resource_exhausted")
            # ...and small requests are still served: a heartbeat needs less than one receive.
            beat = call_as(OWNER, d, "slots.heartbeat", {"lease_id": lease["lease_id"]})
            assert beat["lease_id"] == lease["lease_id"]
            grown_mb = (rss_kb(d.proc.pid) - before) / 1024
            FIGURES["daemon RSS growth holding the buffer budget (MB)"] = round(grown_mb)
            assert grown_mb < 120, f"the daemon grew by {grown_mb:.0f} MB"


# --- defect 14: the default socket directory in a shared /tmp ------------------------------------

#: Whose default socket directory the tests plant (a uid nobody on the machine uses).
VICTIM = OWNER


@pytest.fixture
def victim_tmp_dir() -> Iterator[Path]:
    """``/tmp/necrod-<VICTIM>``, the default socket directory of ``VICTIM``, removed afterwards."""
    path = Path("/tmp") / f"necrod-{VICTIM}"
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    yield path
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        path.unlink() if path.is_symlink() else shutil.rmtree(path)


def in_process(main: Callable[[list[str]], int], argv: list[str], env: dict[str, str] | None = None) -> Any:
    """An action: run a command's ``main`` here (the child is another uid, which may not be able
    to exec this Python); returns its exit status and what it printed."""

    def act() -> Any:
        for key in ("NECROD_SOCKET", "NECROD_HOST", "XDG_RUNTIME_DIR", "RUNTIME_DIRECTORY"):
            os.environ.pop(key, None)
        os.environ.update(env or {})
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = main(argv)
            except SystemExit as exc:
                status = exc.code if isinstance(exc.code, int) else 1
        return {"status": status, "stdout": out.getvalue(), "stderr": err.getvalue()}

    return act


def start_as_victim(workdir: Path, origin: Path) -> Any:
    """necrod as ``VICTIM`` with no socket named: it uses ``/tmp/necrod-<VICTIM>``. It must
    refuse before it does anything else (a daemon that starts after all is killed in 20 s)."""
    home = workdir / "victim"
    home.mkdir(exist_ok=True)
    os.chown(home, VICTIM, NOGROUP)
    (home / "pools.yaml").write_text(daemon_config({"repo": origin}))
    argv = ["--state-dir", str(home / "state"), "--config", str(home / "pools.yaml")]
    return as_uid(VICTIM, in_process(necrod_main, argv, {"HOME": str(home)}), timeout=20)


@pytest.mark.parametrize("planted", ["symlink", "directory of another user", "directory open to all"])
def test_the_daemon_refuses_a_planted_default_socket_directory(
    planted: str, victim_tmp_dir: Path, workdir: Path, origin: Path
) -> None:
    workdir.chmod(0o711)
    origin.chmod(0o755)
    elsewhere = workdir / "attacker"
    elsewhere.mkdir()
    os.chown(elsewhere, INTRUDER, NOGROUP)
    elsewhere.chmod(0o777)
    if planted == "symlink":
        # Even to a private directory of the victim's own: whoever planted the link chose it.
        os.chown(elsewhere, VICTIM, NOGROUP)
        elsewhere.chmod(0o700)
        victim_tmp_dir.symlink_to(elsewhere)
    elif planted == "directory of another user":
        victim_tmp_dir.mkdir(mode=0o777)
        os.chown(victim_tmp_dir, INTRUDER, NOGROUP)
    else:
        victim_tmp_dir.mkdir()
        os.chown(victim_tmp_dir, VICTIM, NOGROUP)
        victim_tmp_dir.chmod(0o777)
    result = start_as_victim(workdir, origin)
    assert result["status"] != 0, result
    assert str(victim_tmp_dir) in result["stderr"] and "refusing" in result["stderr"], result
    assert not list(elsewhere.iterdir()), "the daemon created something where the planted path leads"
    FIGURES["planted socket directories refused (daemon)"] += 1


def impostor(socket_path: Path) -> Callable[[], Any]:
    """An action: listen on ``socket_path`` and answer any line with a forged allocation."""

    def act() -> Any:
        server = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
        server.bind(str(socket_path))
        os.chmod(socket_path, 0o777)
        server.listen(8)

        def answer() -> None:
            while True:
                conn, _ = server.accept()
                conn.recv(65536)
                conn.sendall(b'{"jsonrpc":"2.0","id":1,"result":{"slot_id":"evil/1","path":"/tmp/evil"}}\n')
                conn.close()

        threading.Thread(target=answer, daemon=True).start()
        act.server = server  # type: ignore[attr-defined]
        return str(socket_path)

    return act


def client_as_victim(socket_path: Path) -> Any:
    def act() -> Any:
        with Client(socket_path, timeout=5) as c:
            return c.call("slots.allocate", {"pool": "repo"})

    return as_uid(VICTIM, act)


def test_clients_refuse_a_planted_directory_and_a_daemon_of_another_uid(victim_tmp_dir: Path) -> None:
    sock = victim_tmp_dir / "necrod.sock"
    # Planted by another user, with an impostor listening in it.
    victim_tmp_dir.mkdir(mode=0o777)
    os.chown(victim_tmp_dir, INTRUDER, NOGROUP)
    victim_tmp_dir.chmod(0o777)
    with holding_as_uid(INTRUDER, impostor(sock)):
        told = client_as_victim(sock)
        assert told["error"] == "permission_denied" and f"uid {INTRUDER}" in told["message"], told
        ctl = as_uid(VICTIM, in_process(necroctl_main, ["--socket", str(sock), "allocate", "repo"]))
        assert ctl["status"] != 0 and "permission_denied" in ctl["stderr"] and "evil" not in ctl["stdout"], (
            ctl
        )
    FIGURES["planted socket directories refused (client)"] += 2
    # The directory is the victim's and private, but the socket in it is another uid's daemon
    # (moved there by root): the client checks who answers, not only where.
    shutil.rmtree(victim_tmp_dir)
    victim_tmp_dir.mkdir(mode=0o700)
    os.chown(victim_tmp_dir, VICTIM, NOGROUP)
    staging = Path(tempfile.mkdtemp(prefix="nd-imp-", dir="/tmp"))
    staging.chmod(0o777)
    try:
        with holding_as_uid(INTRUDER, impostor(staging / "s.sock")):
            os.rename(staging / "s.sock", sock)
            told = client_as_victim(sock)
            assert told["error"] == "permission_denied" and "runs as uid" in told["message"], told
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --- defect 17(d): integers past what SQLite and the OS take ------------------------------------


@pytest.mark.parametrize("huge", [2**53, 2**63, 2**64, 10**29])
def test_huge_integer_params_are_invalid_params_not_internal(
    shared_daemon: Callable[..., Necrod], huge: int
) -> None:
    d = shared_daemon()
    submitted = d.call("tasks.submit", {"pool": "repo", "command": ["true"]})
    with Raw(d.socket) as conn:
        for method, params in [
            ("events.subscribe", {"since": huge}),
            ("tasks.logs", {"task_id": submitted["task_id"], "offset": huge}),
            ("slots.allocate", {"pool": "repo", "ttl_s": huge}),
            ("tasks.submit", {"pool": "repo", "command": ["true"], "priority": -huge}),
        ]:
            reply = conn.ask(request(method, params, id=method))
            assert reply is not None and reply["error"]["data"]["kind"] == "invalid_params", (method, reply)
            FIGURES["huge integer params refused"] += 1
        # The largest accepted value works: nothing to replay, no error.
        fine = conn.ask(request("events.subscribe", {"since": 2**53 - 1, "snapshot": False}, id="edge"))
        assert fine is not None and fine["result"]["seq"] >= 1


def test_every_number_param_has_a_bound() -> None:
    from necrod.proto.methods import METHODS, check_param

    checked = 0
    for method, specs in METHODS.items():
        for name, spec in specs.items():
            if spec.type in ("integer", "number"):
                for value in (2**63, -(2**63)):
                    with pytest.raises(NecrodError) as caught:
                        check_param(method, name, spec, value)
                    assert caught.value.kind == "invalid_params"
                checked += 1
    assert checked >= 12


# --- defect 7: large valid requests do not stall the loop ---------------------------------------


def submit_line(params: dict[str, Any], pad_to: int = 0, id: Any = 1) -> bytes:
    line = request("tasks.submit", {"pool": "repo", **params}, id=id).rstrip(b"\n")
    return line + b" " * max(0, pad_to - len(line)) + b"\n"


def test_each_method_takes_only_as_large_a_request_as_it_can_use(
    shared_daemon: Callable[..., Necrod],
) -> None:
    d = shared_daemon()
    with Raw(d.socket) as conn:
        for method, params in [
            ("daemon.status", {"padding": "x" * 100_000}),
            ("slots.allocate", {"pool": "repo", "metadata": {"k": list(range(20_000))}}),
            ("slots.heartbeat", {"lease_id": "l-" + "0" * 200_000}),
        ]:
            reply = conn.ask(request(method, params))
            assert reply is not None and reply["error"]["data"]["kind"] == "invalid_request", (method, reply)
            assert reply["error"]["data"]["limit"] == 65536, reply
            FIGURES["requests over their method's size bound refused"] += 1
        # tasks.submit may use the whole line: a big body, padded to just under 1 MiB.
        line = submit_line({"command": ["true"], "body": "y" * 60_000}, pad_to=(1 << 20) - 1)
        conn.send(line)
        reply = conn.line()
        assert reply is not None and "task_id" in reply["result"], reply
        # Still strict at that size: a duplicate key or one level too many at the far end.
        dup = submit_line({"command": ["true"], "body": "y" * 60_000}).rstrip(b"}\n") + b',"pool":"other"}}'
        conn.send(dup + b" " * ((1 << 20) - 1 - len(dup)) + b"\n")
        reply = conn.line()
        assert reply is not None and reply["error"]["data"]["kind"] == "invalid_request", reply
        deep: Any = 1
        for _ in range(31):  # the request and its params are two levels more
            deep = [deep]
        conn.send(submit_line({"command": ["true"], "payload": deep, "body": "y" * 60_000}, pad_to=900_000))
        reply = conn.line()
        assert reply is not None and "nesting" in reply["error"]["message"], reply
        assert conn.ask(request("hello", {"client": "after"}, id=9))["id"] == 9  # type: ignore[index]


def flood(d: Necrod, lines: list[bytes], stop: threading.Event, answered: list[int]) -> None:
    with Raw(d.socket, timeout=60) as conn:
        while not stop.is_set():
            for line in lines:
                conn.send(line)
                if conn.line() is None:
                    return
                answered[0] += 1


def test_large_requests_from_many_clients_leave_status_fast(shared_daemon: Callable[..., Necrod]) -> None:
    d = shared_daemon()
    # Valid JSON of 1 MB each, of the shapes that cost most to decode; refused by their params.
    lines = [
        submit_line({"command": ["true"], "payload": list(range(135_000))}),
        submit_line({"command": ["true"], "payload": [{"n": i} for i in range(70_000)]}),
        submit_line({"command": ["true"], "payload": ["ten chars!"] * 70_000}),
        request("daemon.status", {"x": list(range(135_000))}),
    ]
    assert all(900_000 < len(line) < 1 << 20 for line in lines)
    stop = threading.Event()
    answered = [0]
    floods = [threading.Thread(target=flood, args=(d, lines, stop, answered), daemon=True) for _ in range(8)]
    latencies = []
    try:
        for t in floods:
            t.start()
        wait_for(lambda: answered[0] >= 8, 30, what="the floods to be answered")
        before = answered[0]
        with d.client(timeout=30) as c:
            until = time.monotonic() + 4
            while time.monotonic() < until:
                started = time.perf_counter()
                c.status()
                latencies.append(time.perf_counter() - started)
                time.sleep(0.01)
        during = answered[0] - before
    finally:
        stop.set()
        for t in floods:
            t.join(30)
    p99 = statistics.quantiles(latencies, n=100)[98]
    FIGURES["daemon.status p99 with 8 clients sending 1 MB requests (ms)"] = round(p99 * 1000, 1)
    FIGURES["1 MB requests answered in the 4 s status was measured"] = during
    assert during >= 16, "the floods were not answered: the test measured nothing"
    # Before issue 16 #7 it was 3 s; one large decode at a time bounds it near one decode's time.
    assert p99 < 0.4, f"daemon.status p99 {p99 * 1000:.0f} ms with 8 clients sending 1 MB lines"


def test_the_new_limits_are_validated() -> None:
    from necrod.core.config import ConfigError, parse_config

    pools = "pools:\n  p:\n    repo_url: https://example.invalid/p.git\n"
    daemon = "daemon:\n  max_connections_per_uid: 8\n  max_buffered_bytes: 16MiB\n  admin_group: ops\n"
    ok = parse_config(daemon + pools)
    assert (ok.daemon.max_connections_per_uid, ok.daemon.max_buffered_bytes) == (8, 16 << 20)
    assert ok.daemon.admin_group == "ops"
    for bad in ("max_connections_per_uid: 0", "max_buffered_bytes: 1MiB", "max_buffered_bytes: lots",
                "admin_group: 7"):  # fmt: skip
        with pytest.raises(ConfigError):
            parse_config(f"daemon:\n  {bad}\n" + pools)
