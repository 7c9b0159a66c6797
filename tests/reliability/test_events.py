"""Event subscriptions that resume from a long history, or come in their thousands.

A replay (``events.subscribe {"since": ...}``) is read off the event loop a page at a time, so
it stalls nobody else and a client that does not read holds a page, not the history; it
replays everything after ``since`` however long ago that was, with no gap before the live
events. Subscriptions are capped per connection and per uid (docs/protocol.md).
"""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from necrod.client import Client
from necrod.daemon.events import MAX_SUBSCRIPTIONS_PER_CONNECTION, MAX_SUBSCRIPTIONS_PER_UID
from necrod.io.store import StateStore
from tests.helpers import Necrod, wait_for
from tests.reliability.conftest import FIGURES, Raw, request, rss_kb
from tests.reliability.test_peers import INTRUDER, holding_as_uid

pytestmark = pytest.mark.reliability

#: What a slot.state event looks like in the history (its size matters for the memory figures).
_EVENT_DATA = orjson.dumps(
    {
        "slot_id": "repo/1",
        "pool": "repo",
        "state": "available",
        "commit": "8063d6c1f3a5b6e1c2d4e5f60718293a4b5c6d7e",
        "reason": "cleaned",
        "lease_id": None,
        "holder": "agent-runner-with-a-long-name/7",
    }
).decode()


def daemon_with_history(factory: Callable[..., Necrod], events: int, history: int) -> Necrod:
    """A daemon (no pools) whose database already holds ``events`` events, keeping ``history``."""
    d = factory(f"daemon:\n  event_history: {history}\npools: {{}}\n", start=False)
    db = d.state_dir / "necrod.db"
    StateStore.open(db).close()
    conn = sqlite3.connect(db)
    now = time.time()
    conn.executemany(
        "INSERT INTO events VALUES (?, ?, ?, ?, ?)",
        ((seq, now, "slots", "slot.state", _EVENT_DATA) for seq in range(1, events + 1)),
    )
    conn.commit()
    conn.close()
    return d.start()


class Lines:
    """A raw connection read a chunk at a time (``Raw.line`` copies its buffer per line)."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.settimeout(timeout)
        self.rest = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self) -> list[dict[str, Any]]:
        """The whole lines that have arrived (at least one); [] once the daemon closed."""
        while True:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                return []
            *lines, self.rest = (self.rest + chunk).split(b"\n")
            if lines:
                return [orjson.loads(line) for line in lines]

    def close(self) -> None:
        self.sock.close()


def timed_status(d: Necrod, stop: threading.Event, worst: list[float]) -> None:
    """Ask ``daemon.status`` again and again until ``stop``; the slowest answer goes in ``worst``."""
    with Client(d.socket, timeout=120) as c:
        while not stop.is_set():
            started = time.perf_counter()
            c.status()
            worst[0] = max(worst[0], time.perf_counter() - started)
            time.sleep(0.01)


def test_a_replay_past_the_old_limit_is_whole_and_stalls_nobody(
    necrod_factory: Callable[..., Necrod],
) -> None:
    history = 130_000  # more than the 100,000 events a replay used to stop at, silently
    d = daemon_with_history(necrod_factory, history, history + 10_000)
    worst = [0.0]
    stop = threading.Event()
    watcher = threading.Thread(target=timed_status, args=(d, stop, worst))
    conn = Lines(d.socket)
    try:
        watcher.start()
        time.sleep(0.1)
        conn.send(request("events.subscribe", {"since": 0, "snapshot": False}))
        reply, *events = conn.read()
        assert reply["result"]["truncated"] is False
        last = reply["result"]["seq"]
        assert last > history
        reloaded = False
        while not (reloaded and events and events[-1]["params"]["type"] == "config.reloaded"):
            if not reloaded and len(events) > 1000:
                # Live events committed while the replay runs come after it, in order.
                d.call("daemon.reload")
                reloaded = True
            more = conn.read()
            assert more, "the daemon closed the connection"
            events += more
    finally:
        stop.set()
        if watcher.is_alive():
            watcher.join()
        conn.close()
    FIGURES["slowest daemon.status during a replay of 130,000 events (ms)"] = round(worst[0] * 1000)
    seqs = [e["params"]["seq"] for e in events]
    assert seqs == list(range(1, seqs[-1] + 1))  # every event once, in order: no gap
    assert events[-1]["params"]["type"] == "config.reloaded"
    assert worst[0] < 0.5, f"daemon.status took {worst[0]:.3f}s during a replay"
    FIGURES["events replayed in one subscription"] += len(events)


def test_replayers_that_do_not_read_hold_a_page_not_the_history(
    necrod_factory: Callable[..., Necrod],
) -> None:
    d = daemon_with_history(necrod_factory, 50_000, 50_000)
    assert d.proc is not None
    before = rss_kb(d.proc.pid)
    worst = [0.0]
    stop = threading.Event()
    watcher = threading.Thread(target=timed_status, args=(d, stop, worst))
    hogs = [Raw(d.socket) for _ in range(4)]
    peak = before
    try:
        watcher.start()
        for hog in hogs:
            hog.send(
                b"".join(request("events.subscribe", {"since": 0, "snapshot": False}, id=i) for i in range(3))
            )
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            peak = max(peak, rss_kb(d.proc.pid))
            time.sleep(0.05)
    finally:
        stop.set()
        watcher.join()
        for hog in hogs:
            hog.close()
    grown_mb = (peak - before) / 1024
    FIGURES["daemon RSS growth with 12 unread replays of 50,000 events (MB)"] = round(grown_mb)
    FIGURES["slowest daemon.status while 12 replays were unread (ms)"] = round(worst[0] * 1000)
    assert grown_mb < 100, f"RSS grew {grown_mb:.0f} MB with 12 replays nobody reads"
    assert worst[0] < 0.5, f"daemon.status took {worst[0]:.3f}s while replays were stuck"


def test_subscriptions_are_capped_per_connection(necrod: Necrod) -> None:
    with Raw(necrod.socket) as conn:
        for i in range(MAX_SUBSCRIPTIONS_PER_CONNECTION):
            reply = conn.ask(request("events.subscribe", {"snapshot": False}, id=i))
            assert reply is not None and "result" in reply, reply
        refused = conn.ask(request("events.subscribe", {"snapshot": False}, id="one more"))
        assert refused is not None and refused["error"]["data"]["kind"] == "resource_exhausted", refused
        assert f"{MAX_SUBSCRIPTIONS_PER_CONNECTION} subscriptions" in refused["error"]["message"]
        # The connection still answers; another connection has its own.
        assert conn.ask(request("daemon.status", id="still"))["result"]["events"]["subscribers"] >= 16  # type: ignore[index]
        with necrod.client() as other:
            assert other.subscribe(snapshot=False)["subscription"]
    # A closed connection frees its subscriptions.
    wait_for(
        lambda: necrod.call("daemon.status")["events"]["subscribers"] == 0, 10, what="subscriptions freed"
    )


def _subscribe_until_refused() -> Any:
    """As another uid: subscribe on connection after connection until refused."""
    held: list[Client] = []
    _subscribe_until_refused.held = held  # type: ignore[attr-defined]  # kept open for the test
    count = 0
    while count <= MAX_SUBSCRIPTIONS_PER_UID:
        c = Client(_subscribe_until_refused.socket, timeout=20)  # type: ignore[attr-defined]
        held.append(c)
        for _ in range(MAX_SUBSCRIPTIONS_PER_CONNECTION):
            reply = c.call("events.subscribe", {"snapshot": False, "topics": ["pools"]})
            count += 1
            if count > MAX_SUBSCRIPTIONS_PER_UID:
                return {"count": count, "reply": reply}
    return {"count": count}


def test_subscriptions_are_capped_per_uid(necrod_factory: Callable[..., Necrod], workdir: Path) -> None:
    workdir.chmod(0o711)
    (workdir / "d").mkdir()
    (workdir / "d").chmod(0o711)
    d = necrod_factory("daemon:\n  socket_group: nogroup\npools: {}\n")
    _subscribe_until_refused.socket = d.socket  # type: ignore[attr-defined]
    with holding_as_uid(INTRUDER, _subscribe_until_refused) as hog:
        assert hog.get("error") == "resource_exhausted", hog
        assert f"{MAX_SUBSCRIPTIONS_PER_UID} subscriptions" in hog["message"]
        assert d.call("daemon.status")["events"]["subscribers"] == MAX_SUBSCRIPTIONS_PER_UID
        with d.client() as admin:  # root is not held to the per-uid cap
            assert admin.subscribe(snapshot=False)["subscription"]
