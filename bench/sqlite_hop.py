"""DESIGN.md's question: does a blocking sqlite3 commit pay to run off the event loop?

One durable commit of the shape the daemon makes (WAL, ``synchronous=FULL``; one slot record
of ~500 bytes of JSON and one event row) is timed three ways on the same database file system
as the daemon's state: inline on the event loop (the loop is blocked for all of it), through
``anyio.to_thread.run_sync`` (the loop is free but the caller waits for the hop too), and the
hop alone with a no-op. A cross-check times ``necrod.io.store.StateStore.write``, the real path,
and what keeping the WAL small costs it: the idle checkpoint that truncates the WAL (on the
loop, after every 50 writes here) and the first write after it, which starts a new WAL file.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

from bench.report import Row
from bench.stats import median, percentile

_ROW = json.dumps(
    {"slot_id": "bench/1", "state": "allocated", "path": "/x" * 40, "lease": {"id": "l-0" * 20}}
)


def _open(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(
        "CREATE TABLE records (kind TEXT, key TEXT, data TEXT, PRIMARY KEY (kind, key)) WITHOUT ROWID"
    )
    conn.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY, ts REAL, topic TEXT, type TEXT, data TEXT)")
    return conn


def _commit(conn: sqlite3.Connection, n: int) -> None:
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT OR REPLACE INTO records VALUES ('slot', ?, ?)", (f"bench/{n % 64}", _ROW))
    conn.execute("INSERT INTO events VALUES (NULL, ?, 'slots', 'slot.state', ?)", (time.time(), _ROW))
    conn.execute("COMMIT")


async def _timed(count: int, call: Callable[[int], Awaitable[None]]) -> list[float]:
    out = []
    for n in range(count):
        started = time.perf_counter()
        await call(n)
        out.append((time.perf_counter() - started) * 1000)
    return out


async def _run(root: Path, count: int) -> dict[str, list[float]]:
    conn = _open(root / "hop.sqlite")

    async def inline(n: int) -> None:
        _commit(conn, n)

    async def threaded(n: int) -> None:
        await anyio.to_thread.run_sync(_commit, conn, n)

    async def hop(n: int) -> None:
        await anyio.to_thread.run_sync(int, n)

    await _timed(20, threaded)  # start the worker thread
    out = {
        "inline": await _timed(count, inline),
        "thread": await _timed(count, threaded),
        "hop": await _timed(count, hop),
    }
    conn.close()
    out["store"] = await _store(root / "store.sqlite", count)
    out["checkpoint"], out["after_checkpoint"] = await _checkpoints(root / "checkpoint.sqlite", count)
    return out


async def _checkpoints(path: Path, count: int) -> tuple[list[float], list[float]]:
    from necrod.io.store import Put, StateStore

    store = StateStore.open(path)
    data = json.loads(_ROW)
    checkpoint, after = [], []
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(store.run)
            for n in range(max(1, count // 50)):
                for i in range(50):
                    await store.write([Put("slot", f"bench/{i}", data)])
                started = time.perf_counter()
                store._checkpoint()  # what the writer does after CHECKPOINT_IDLE_S of quiet
                checkpoint.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                await store.write([Put("slot", f"bench/{n}", data)])
                after.append((time.perf_counter() - started) * 1000)
            tg.cancel_scope.cancel()
    finally:
        store.close()
    return checkpoint, after


async def _store(path: Path, count: int) -> list[float]:
    from necrod.io.store import Put, StateStore

    store = StateStore.open(path)
    data = json.loads(_ROW)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(store.run)

            async def write(n: int) -> None:
                await store.write([Put("slot", f"bench/{n % 64}", data)])

            out = await _timed(count, write)
            tg.cancel_scope.cancel()
    finally:
        store.close()
    return out


def measure(root: Path, count: int) -> list[Row]:
    root.mkdir(parents=True, exist_ok=True)
    s = anyio.run(_run, root, count)
    inline = median(s["inline"])

    def row(key: str, what: str) -> Row:
        r = Row("db", what, "ms", median(s[key]), percentile(s[key], 99), len(s[key]))
        if key != "inline":
            r.ratio, r.ratio_to = median(s[key]) / inline, "inline"
        return r

    return [
        row("inline", "sqlite commit inline on the loop (blocks it)"),
        row("thread", "sqlite commit via anyio.to_thread.run_sync"),
        row("hop", "to_thread.run_sync hop alone (no-op)"),
        row("store", "StateStore.write as the daemon does it (inline)"),
        row("checkpoint", "StateStore idle WAL checkpoint + truncate, after 50 writes (inline)"),
        row("after_checkpoint", "first StateStore.write after the WAL was truncated"),
    ]
