"""The state store: durable before the reply, one fsync for many callers, undone when it fails."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anyio
import pytest

from necrod.io.store import Delete, Event, Put, StateStore, StoreError
from necrod.proto.errors import Unavailable

pytestmark = pytest.mark.anyio


async def test_writes_are_durable_and_events_numbered(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path / "s.db")
    published: list[Event] = []
    store.on_commit = published.extend
    async with anyio.create_task_group() as tg:
        await tg.start(store.run)
        await store.write(
            [Put("slot", "p/1", {"state": "available"}), Event("slots", "slot.state", {"n": 1})]
        )
        await store.write(
            [
                Put("slot", "p/2", {"state": "allocated"}),
                Delete("slot", "p/1"),
                Event("slots", "slot.state", {"n": 2}),
            ]
        )
        tg.cancel_scope.cancel()
    store.close()
    again = StateStore.open(tmp_path / "s.db")
    assert again.load("slot") == {"p/2": {"state": "allocated"}}
    assert [e.seq for e in published] == [1, 2] and again.last_seq == 2
    assert [e.data for e in again.events_since(0)] == [{"n": 1}, {"n": 2}]
    assert [e.seq for e in again.events_since(1)] == [2]


async def test_concurrent_writers_share_transactions(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path / "s.db")
    async with anyio.create_task_group() as tg:
        await tg.start(store.run)
        before = store.transactions

        async def one(i: int) -> None:
            await store.write([Put("slot", f"p/{i}", {"i": i})])

        async with anyio.create_task_group() as writers:
            for i in range(32):
                writers.start_soon(one, i)
        assert store.transactions - before <= 3  # 32 callers, a couple of fsyncs
        tg.cancel_scope.cancel()
    assert len(store.load("slot")) == 32
    store.close()


async def test_a_failed_commit_is_undone_and_reported(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path / "s.db")
    memory = {"state": "allocated"}
    async with anyio.create_task_group() as tg:
        await tg.start(store.run)
        await store.write([Put("slot", "p/1", {"state": "available"})])
        # Make the next transaction fail the way a full disk or I/O error would.
        store._conn.execute(
            "CREATE TRIGGER boom BEFORE INSERT ON records BEGIN SELECT RAISE(FAIL, 'disk I/O error'); END"
        )
        with pytest.raises(Unavailable, match="disk I/O error"):
            await store.write(
                [Put("slot", "p/2", {"state": "allocated"}), Event("slots", "x", {})],
                undo=lambda: memory.update(state="available"),
            )
        assert memory == {"state": "available"}
        store._conn.execute("DROP TRIGGER boom")
        await store.write([Event("slots", "after", {})])
        tg.cancel_scope.cancel()
    assert store.load("slot") == {"p/1": {"state": "available"}}
    assert [e.type for e in store.events_since(0)] == ["after"] and store.last_seq == 1  # no gap
    store.close()


async def test_writes_after_stop_are_refused(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path / "s.db")
    undone = []
    with pytest.raises(Unavailable, match="shutting down"):
        await store.write([Put("slot", "p/1", {})], undo=lambda: undone.append(1))
    assert undone == [1]
    store.close()


def test_a_damaged_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "necrod.db"
    path.write_bytes(b"this is not a database" * 200)
    with pytest.raises(StoreError) as info:
        StateStore.open(path)
    message = str(info.value)
    assert str(path) in message and "damaged" in message and "mv " in message


def test_a_locked_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "necrod.db"
    StateStore.open(path).close()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError, match="locked by another process"):
            StateStore.open(path, busy_timeout_s=0.2)
    finally:
        other.execute("ROLLBACK")
        other.close()


def test_history_is_bounded(tmp_path: Path) -> None:
    async def main() -> StateStore:
        store = StateStore.open(tmp_path / "s.db")
        store.set_history(100)
        async with anyio.create_task_group() as tg:
            await tg.start(store.run)
            for i in range(1500):
                await store.write([Event("slots", "e", {"i": i})])
            tg.cancel_scope.cancel()
        return store

    store = anyio.run(main)
    assert store.last_seq == 1500
    assert store.first_seq() > 1000 and store.events_since(1499)[0].data == {"i": 1499}
    store.close()
