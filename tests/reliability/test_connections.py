"""Clients that stall, stop reading, vanish, or come in their thousands.

A client may hurt only itself: a half-sent line is cut off at the read deadline, a client that
does not read its replies at the write deadline, and neither holds a slot or slows anyone else.
At the connection cap an operator can still ask for ``daemon.status``; past it, callers are told
so at once.
"""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from necrod.client import Client
from necrod.proto.errors import ResourceExhausted
from tests.helpers import Necrod, wait_for
from tests.reliability.conftest import (
    FIGURES,
    Raw,
    daemon_config,
    raise_nofile,
    request,
    slots_by_id,
)

pytestmark = pytest.mark.reliability

HEADROOM = 16  # connections accepted above the cap for operators (docs/protocol.md)


@pytest.fixture
def opened() -> Iterator[list[Raw]]:
    conns: list[Raw] = []
    yield conns
    for conn in conns:
        conn.close()


def hello(conn: Raw, id: object = 1) -> dict[str, object] | None:
    return conn.ask(request("hello", {"client": "t"}, id=id))


def test_clients_that_stall_mid_line_are_cut_off_and_hold_nothing(
    necrod_factory: Callable[..., Necrod], origin: Path, opened: list[Raw]
) -> None:
    d = necrod_factory(daemon_config({"repo": origin}, {"read_timeout_s": 0.5}, slots=2, min_idle=0))
    stalled = []
    for i in range(50):
        conn = Raw(d.socket)
        opened.append(conn)
        # Half an allocation: if it were ever acted on, it would hold a slot.
        conn.send(
            json.dumps({"jsonrpc": "2.0", "id": i, "method": "slots.allocate", "params": {"pool": "repo"}})[
                :-9
            ].encode()
        )
        stalled.append(conn)
    # Meanwhile everybody else is served.
    with d.client(timeout=10) as c:
        for _ in range(20):
            assert c.status()["pid"] == d.proc.pid  # type: ignore[union-attr]
        lease = c.allocate("repo")
        c.release(lease["lease_id"], salvage=False)
    for conn in stalled:
        assert conn.closed_by_peer(timeout=20), "a stalled client was never disconnected"
    FIGURES["stalled clients cut off"] += len(stalled)
    d.wait_slots("repo", "available", 2)
    assert all(s["lease_id"] is None for s in slots_by_id(d).values())


def test_a_client_that_stops_reading_is_dropped_without_slowing_others(
    necrod_factory: Callable[..., Necrod], origin: Path, opened: list[Raw]
) -> None:
    d = necrod_factory(daemon_config({"repo": origin}, {"write_timeout_s": 1}, slots=1, min_idle=0))
    hog = Raw(d.socket)
    opened.append(hog)
    hog.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    big = request("slots.list", {}, id=1) * 2000  # far more replies than the socket buffers hold
    sender = threading.Thread(target=lambda: _send_quietly(hog, big))
    sender.start()
    with d.client(timeout=10) as c:
        latencies = []
        for _ in range(50):
            started = time.perf_counter()
            c.status()
            latencies.append(time.perf_counter() - started)
        # The hog has not read a byte: after the write deadline the daemon lets it go.
        wait_for(lambda: c.status()["connections"] == 1, 30, what="the client that never reads to be dropped")
    assert hog.closed_by_peer(timeout=30)
    sender.join(30)
    assert statistics.median(latencies) < 1.0  # generous: it must not wait on the hog's writes


def _send_quietly(conn: Raw, data: bytes) -> None:
    try:
        conn.sock.sendall(data)
    except OSError:
        pass


def test_a_caller_that_vanished_while_queued_does_not_take_the_next_slot(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    d = necrod_factory(daemon_config({"repo": origin}, slots=1, max_slots=1, min_idle=0, lease_ttl_s=600))
    with d.client() as c:
        first = c.allocate("repo", holder="first")
    ghost = Raw(d.socket)
    ghost.send(request("slots.allocate", {"pool": "repo", "holder": "ghost", "wait_s": 120}, id=1))
    wait_for(lambda: d.call("pools.get", {"pool": "repo"})["waiting"] == 1, 10, what="the ghost to queue")
    ghost.close()  # gone: its agent crashed while waiting
    outcome: list[object] = []

    def live_caller() -> None:
        with d.client(timeout=60) as c2:
            try:
                outcome.append(c2.allocate("repo", holder="live", wait_s=5))
            except ResourceExhausted as exc:
                outcome.append(exc)

    t = threading.Thread(target=live_caller)
    t.start()
    wait_for(
        lambda: d.call("pools.get", {"pool": "repo"})["waiting"] >= 1, 10, what="the live caller to queue"
    )
    with d.client() as c:
        c.release(first["lease_id"], salvage=False)
    t.join(60)
    assert outcome and isinstance(outcome[0], dict), f"the live caller got {outcome}; slots: {slots_by_id(d)}"
    assert outcome[0]["holder"] == "live"


@pytest.mark.timeout(300)
def test_at_the_connection_cap_status_stays_fast_and_past_it_callers_are_told_at_once(
    necrod_factory: Callable[..., Necrod], origin: Path, opened: list[Raw]
) -> None:
    cap = 1024
    raise_nofile(cap + HEADROOM + 256)
    d = necrod_factory(daemon_config({"repo": origin}, {"max_connections": cap}, slots=1, min_idle=0))
    operator = Client(d.socket, timeout=30)
    operator.connect()
    try:
        # Up to the cap: every connection is served normally.
        for i in range(cap - 1):
            conn = Raw(d.socket, timeout=30)
            opened.append(conn)
            conn.send(request("hello", {"client": f"held-{i}"}, id=i))
        for i, conn in enumerate(opened):
            reply = conn.line()
            assert reply is not None and reply["id"] == i and "result" in reply
        assert operator.status()["connections"] == cap
        FIGURES["connections held at once"] = max(FIGURES["connections held at once"], cap + HEADROOM)

        latencies = []
        for _ in range(300):
            started = time.perf_counter()
            operator.status()
            latencies.append(time.perf_counter() - started)
        p99 = statistics.quantiles(latencies, n=100)[98]
        print(
            f"\ndaemon.status with {cap} connections open: p50 {statistics.median(latencies) * 1000:.2f} ms, "
            f"p99 {p99 * 1000:.2f} ms"
        )
        FIGURES["daemon.status p99 at the connection cap (ms)"] = round(p99 * 1000, 2)
        assert p99 < 0.050, f"p99 of daemon.status at the cap is {p99 * 1000:.1f} ms"

        # Above the cap: a few status-only connections for operators.
        restricted = []
        for _ in range(HEADROOM):
            conn = Raw(d.socket, timeout=30)
            opened.append(conn)
            restricted.append(conn)
        for conn in restricted:
            status = conn.ask(request("daemon.status", {}, id="op"))
            assert status is not None and status["result"]["pid"] == d.proc.pid  # type: ignore[union-attr]
            refused = conn.ask(request("slots.allocate", {"pool": "repo"}, id="alloc"))
            assert refused is not None and refused["error"]["data"]["kind"] == "resource_exhausted"
        # Past the headroom: one clear refusal at once, then the connection is closed.
        for _ in range(5):
            started = time.monotonic()
            with Raw(d.socket, timeout=10) as late:
                reply = late.line()
                assert reply is not None and reply["error"]["data"]["kind"] == "resource_exhausted", reply
                assert "connection limit" in reply["error"]["message"]
                assert late.closed_by_peer(timeout=10)
            assert time.monotonic() - started < 5
        # The operator's own connection kept working all along.
        assert operator.status()["state"] in ("running", "degraded")
    finally:
        operator.close()
    # Once the crowd leaves, everybody is served again.
    for conn in opened:
        conn.close()
    with d.client() as c:
        wait_for(lambda: c.status()["connections"] <= 2, 30, what="the connections to be gone")
        lease = c.allocate("repo")
        assert lease["slot_id"] == "repo/1"
