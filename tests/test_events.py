"""The event bus: replays read a page at a time, say when the history moved under them, and
subscriptions are capped (the socket-level tests are in tests/reliability/test_events.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import anyio
import pytest

from necrod.core.slots import Lease, Slot, SlotState
from necrod.daemon import events as events_module
from necrod.daemon.events import (
    MAX_SUBSCRIPTIONS_PER_CONNECTION,
    MAX_SUBSCRIPTIONS_PER_UID,
    EventBus,
    as_seen_by,
)
from necrod.io.store import Event, EventReader, StateStore
from necrod.proto.errors import ResourceExhausted

pytestmark = pytest.mark.anyio


def store_with(path: Path, count: int) -> StateStore:
    StateStore.open(path).close()
    conn = sqlite3.connect(path)
    conn.executemany(
        "INSERT INTO events VALUES (?, 0, ?, 'e', ?)",
        ((seq, "slots" if seq % 3 else "pools", f'{{"n": {seq}}}') for seq in range(1, count + 1)),
    )
    conn.commit()
    conn.close()
    return StateStore.open(path)


async def test_a_replay_is_read_in_pages_and_is_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events_module, "REPLAY_PAGE_EVENTS", 100)
    store = store_with(tmp_path / "s.db", 1_050)
    bus = EventBus()
    sub = bus.subscribe(["slots"])
    got: list[dict[str, Any]] = []
    reads: list[int] = []
    page = EventReader.page

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        reads.append(len(got))  # the previous page was handed over before the next is read
        return page(self, *args, **kwargs)

    monkeypatch.setattr(EventReader, "page", counted)

    async def send(event: dict[str, Any]) -> None:
        got.append(event)

    whole = await bus.replay(store, sub, turn="t", since=10, until=1_000, viewer=None, send=send)
    assert whole
    assert [e["seq"] for e in got] == [s for s in range(11, 1_001) if s % 3]
    assert reads == [0, 100, 200, 300, 400, 500, 600]  # 660 events of the topic: 7 pages
    store.close()


async def test_a_replay_overtaken_by_pruning_is_not_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events_module, "REPLAY_PAGE_EVENTS", 100)
    store = store_with(tmp_path / "s.db", 1_000)
    bus = EventBus()
    sub = bus.subscribe()
    got: list[int] = []

    async def send(event: dict[str, Any]) -> None:
        got.append(event["seq"])
        if event["seq"] == 100:  # the writer prunes while this page is written out
            with sqlite3.connect(store.path) as conn:
                conn.execute("DELETE FROM events WHERE seq <= 500")

    whole = await bus.replay(store, sub, turn="t", since=0, until=1_000, viewer=None, send=send)
    assert not whole and got == list(range(1, 101))  # stopped at the gap, not past it
    store.close()


async def test_subscriptions_are_capped_and_freed() -> None:
    bus = EventBus()
    mine = [bus.subscribe(connection=1, uid=7) for _ in range(MAX_SUBSCRIPTIONS_PER_CONNECTION)]
    with pytest.raises(ResourceExhausted, match="this connection"):
        bus.subscribe(connection=1, uid=7)
    bus.unsubscribe(mine[0])
    bus.unsubscribe(mine[0])  # twice frees once
    mine[0] = bus.subscribe(connection=1, uid=7)
    for conn in range(2, 100):
        try:
            for _ in range(MAX_SUBSCRIPTIONS_PER_CONNECTION):
                bus.subscribe(connection=conn, uid=7)
        except ResourceExhausted as exc:
            assert "uid 7" in exc.message
            break
    assert bus.subscribers == MAX_SUBSCRIPTIONS_PER_UID
    assert bus.subscribe(connection=1000, uid=8)  # another uid
    assert bus.subscribe(connection=1001, uid=None)  # an admin
    await anyio.lowlevel.checkpoint()


def test_a_runner_uid_is_not_shown_the_leases_of_its_profile_s_other_tasks() -> None:
    """Every task of a contained profile runs as its ``user``, whoever submitted it: that uid
    may act on a lease (by the id its runner was given), but is shown none, or one task's
    runner could list the others' ids and release them (their work unsalvaged, their result
    forged). The owner still sees its own."""
    owner, other_owner, runner = 1001, 1002, 65534
    lease = Lease(lease_id="l-victim", holder="h", metadata={}, ttl_s=30.0, granted_at=1.0, expires_at=31.0,
                  fencing_token=1, start_commit="c", uid=other_owner, runner_uid=runner)  # fmt: skip
    assert lease.held_by(runner) and lease.held_by(other_owner) and not lease.held_by(owner)
    s = Slot(
        slot_id="p/1", pool="p", number=1, path="/s/1", admin="1", state=SlotState.ALLOCATED, lease=lease
    )
    assert s.view(viewer=runner)["lease_id"] is None and s.view(viewer=owner)["lease_id"] is None
    assert s.view(viewer=other_owner)["lease_id"] == "l-victim" and s.view()["lease_id"] == "l-victim"
    event = Event(
        "leases", "lease.granted", {"lease_id": "l-victim", "owner_uid": other_owner, "runner_uid": runner}
    )
    assert as_seen_by(event, runner)["lease_id"] is None
    assert as_seen_by(event, other_owner)["lease_id"] == "l-victim"
