"""The durable state: one SQLite database (WAL, ``synchronous=FULL``) with one writer.

Records are JSON documents keyed by (kind, key) — pools, slots, tasks — plus an append-only,
bounded event history. The in-memory state is the authority while the daemon runs; the store
makes each change durable before the reply that reports it is sent.

Group commit: callers hand a list of operations to ``write`` and wait. The writer task takes
everything queued since its last transaction and commits it in one transaction, so 32
concurrent allocations cost one or two fsyncs, not 32. If a transaction fails (disk full, I/O
error) every change in it is undone in memory, in reverse order, by the ``undo`` callbacks the
callers gave, and each caller gets ``Unavailable``: never an acknowledgement without durability.

The transaction runs on the event loop: it costs a fraction of a millisecond, less than a hop to
a worker thread (BENCHMARKS.md has the measurement).

The WAL is kept small for a small state file system: SQLite checkpoints it inside a commit
once it holds ``WAL_AUTOCHECKPOINT_PAGES`` (~1 MiB, not its default ~4 MB), and the writer,
once idle for ``CHECKPOINT_IDLE_S``, checkpoints it and truncates it to nothing, off the hot
path (BENCHMARKS.md, "WAL checkpoints").

A full file system: a transaction that fails with ``SQLITE_FULL`` makes the store read-only
(``read_only`` says why) until a transaction succeeds again. Nothing is refused in advance —
every change is still tried, so the first one after space returns goes through — but background
work can ``wait_writable`` rather than redo, over and over, work it could not record.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus

from necrod.proto.errors import Unavailable
from necrod.proto.jsonrpc import dump_json

log = structlog.get_logger("necrod.store")

SCHEMA_VERSION = 1

#: Pages the WAL may hold before a commit checkpoints it (SQLite's default, 1000, is ~4 MB).
WAL_AUTOCHECKPOINT_PAGES = 256
#: What the WAL file is cut back to when a checkpoint inside a commit restarts it.
WAL_SIZE_LIMIT = 1 << 20
#: Quiet time after the last transaction before the writer truncates the WAL.
CHECKPOINT_IDLE_S = 1.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    kind TEXT NOT NULL, key TEXT NOT NULL, data TEXT NOT NULL, PRIMARY KEY (kind, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY, ts REAL NOT NULL, topic TEXT NOT NULL, type TEXT NOT NULL, data TEXT NOT NULL
);
"""


class StoreError(Exception):
    """The state database cannot be used; the message says which file and how to recover."""


@dataclass(slots=True)
class Put:
    kind: str
    key: str
    data: dict[str, Any]


@dataclass(slots=True)
class Delete:
    kind: str
    key: str


@dataclass(slots=True)
class Event:
    topic: str
    type: str
    data: dict[str, Any]
    ts: float = field(default_factory=time.time)
    seq: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "ts": self.ts, "topic": self.topic, "type": self.type, **self.data}


Op = Put | Delete | Event
Undo = Callable[[], None]


@dataclass(slots=True)
class _Pending:
    ops: Sequence[Op]
    undo: Undo | None
    # asyncio's own event: anyio's costs a look-up of the running backend at each creation, and
    # one is made per write on the allocation path.
    done: asyncio.Event = field(default_factory=asyncio.Event)
    error: BaseException | None = None


def _recovery_hint(path: Path) -> str:
    return (
        f"To recover: stop necrod, move the file aside (mv {path} {path}.damaged; also its -wal "
        f"and -shm files), and start necrod again: it adopts the slots it finds on disk and "
        f"salvages their contents (leases that were held are lost)."
    )


class StateStore:
    """See the module docstring. ``open`` is synchronous and raises ``StoreError``."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self._conn = conn
        self._queue: list[_Pending] = []
        self._wake = asyncio.Event()
        self._running = False
        self._last_seq = self._read_last_seq()
        self._history = 50_000
        self._pruned_below = 0
        #: Called with the committed events, in order, after each successful transaction.
        self.on_commit: Callable[[list[Event]], None] = lambda events: None
        self.transactions = 0
        self.commits_failed = 0
        self.checkpoints = 0
        self.checkpoints_failed = 0
        #: Frames may be in the WAL that no idle checkpoint has truncated yet (a crash leaves some).
        self._wal_dirty = True
        #: Why changes cannot be saved now (the file system is full), or None.
        self.read_only: str | None = None
        self._writable = anyio.Event()
        self._writable.set()

    # --- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, *, busy_timeout_s: float = 2.0) -> StateStore:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the state database {path}: {exc}") from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            row = conn.execute("PRAGMA quick_check").fetchone()
            if row is None or row[0] != "ok":
                raise StoreError(
                    f"the state database {path} is damaged ({row[0] if row else 'no answer'}). "
                    + _recovery_hint(path)
                )
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
            conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            conn.executescript(_SCHEMA)
            # Take the write lock once now, so a database held by another process fails here,
            # clearly, and not at the first allocation.
            conn.execute("BEGIN IMMEDIATE")
            found = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if found is None:
                conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            conn.execute("COMMIT")
            if found is not None and int(found[0]) > SCHEMA_VERSION:
                raise StoreError(
                    f"the state database {path} was written by a newer necrod "
                    f"(schema {found[0]}, this one knows {SCHEMA_VERSION})"
                )
        except StoreError:
            conn.close()
            raise
        except sqlite3.OperationalError as exc:
            conn.close()
            if "locked" in str(exc) or "busy" in str(exc):
                raise StoreError(
                    f"the state database {path} is locked by another process "
                    f"(find it with: fuser {path}); stop it and start necrod again"
                ) from None
            raise StoreError(f"cannot use the state database {path}: {exc}") from None
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(
                f"the state database {path} is damaged ({exc}). " + _recovery_hint(path)
            ) from None
        return cls(path, conn)

    def close(self) -> None:
        self._conn.close()

    @property
    def wal_path(self) -> Path:
        return self.path.with_name(self.path.name + "-wal")

    def statistics(self) -> dict[str, Any]:
        try:
            wal_bytes: int | None = self.wal_path.stat().st_size
        except OSError:
            wal_bytes = None
        return {
            "path": str(self.path),
            "wal_bytes": wal_bytes,
            "transactions": self.transactions,
            "commits_failed": self.commits_failed,
            "checkpoints": self.checkpoints,
            "checkpoints_failed": self.checkpoints_failed,
            "read_only": self.read_only,
        }

    # --- reading (startup, history) ---------------------------------------------------------------

    def load(self, kind: str) -> dict[str, dict[str, Any]]:
        rows = self._conn.execute("SELECT key, data FROM records WHERE kind = ?", (kind,))
        return {key: json.loads(data) for key, data in rows}

    def _read_last_seq(self) -> int:
        row = self._conn.execute("SELECT MAX(seq) FROM events").fetchone()
        return int(row[0] or 0)

    @property
    def last_seq(self) -> int:
        return self._last_seq

    def first_seq(self) -> int:
        row = self._conn.execute("SELECT MIN(seq) FROM events").fetchone()
        return int(row[0] or self._last_seq + 1)

    def events_since(
        self,
        since: int,
        *,
        until: int | None = None,
        topics: Iterable[str] | None = None,
        limit: int = 100_000,
    ) -> list[Event]:
        """At most ``limit`` events after ``since``, read on the writer's connection, on the
        loop: for a few. A subscriber's replay reads pages through an ``EventReader`` instead."""
        sql, args = _events_query(since, until, topics, limit)
        return [
            Event(topic, type_, json.loads(data), ts, seq)
            for seq, ts, topic, type_, data in self._conn.execute(sql, args)
        ]

    def reader(self) -> EventReader:
        """A reader of the event history for a worker thread (see ``EventReader``)."""
        return EventReader(self.path)

    # --- writing ---------------------------------------------------------------------------------

    def set_history(self, events: int) -> None:
        self._history = events

    async def write(self, ops: Sequence[Op], undo: Undo | None = None) -> None:
        """Make ``ops`` durable; on failure run ``undo`` and raise ``Unavailable``."""
        if not self._running:
            if undo is not None:
                undo()
            raise Unavailable("the daemon is shutting down; the change was not saved")
        pending = _Pending(ops, undo)
        self._queue.append(pending)
        self._wake.set()
        # Shielded: once queued, the change is committed or undone whatever happens to the caller.
        with anyio.CancelScope(shield=True):
            await pending.done.wait()
        if pending.error is None:
            return
        if self.read_only is not None:
            raise Unavailable(
                f"the state could not be saved: {self.read_only}; nothing was changed. necrod is "
                "read-only until there is room: it serves reads and refuses changes"
            )
        raise Unavailable(f"the state could not be saved ({pending.error}); nothing was changed")

    async def ping(self) -> None:
        """Return once the writer task has come round to this call (it answers): what the
        watchdog and ``/readyz`` ask. Nothing is written; ``Unavailable`` when it is not running."""
        if not self._running:
            raise Unavailable("the state store's writer is not running")
        pending = _Pending([], None)
        self._queue.append(pending)
        self._wake.set()
        await pending.done.wait()

    async def wait_writable(self) -> None:
        """Return once the store is not read-only (at once when it is not)."""
        await self._writable.wait()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The writer task. On cancellation it commits what is already queued, then stops."""
        self._running = True
        task_status.started()
        try:
            while True:
                with anyio.move_on_after(CHECKPOINT_IDLE_S if self._wal_dirty else math.inf):
                    await self._wake.wait()
                if not self._wake.is_set():
                    self._checkpoint()
                    continue
                self._wake = asyncio.Event()
                self._flush()
        finally:
            self._running = False
            self._flush()

    def _checkpoint(self) -> None:
        """Copy the WAL into the database and truncate it to nothing. Run when the writer is
        idle, so no commit waits behind it (~0.5 ms after 50 transactions, BENCHMARKS.md); a
        failure (a full disk: the database cannot grow) is retried after the next commit."""
        self._wal_dirty = False
        try:
            row = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error as exc:
            self.checkpoints_failed += 1
            log.warning("wal_checkpoint_failed", error=str(exc))
            return
        if row is not None and row[0]:
            self._wal_dirty = True  # busy: another connection reads the database; try again later
            return
        self.checkpoints += 1

    def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            if not any(p.ops for p in batch):  # pings only: nothing to commit
                for pending in batch:
                    pending.done.set()
                continue
            events = [op for p in batch for op in p.ops if isinstance(op, Event)]
            first_seq = self._last_seq + 1
            try:
                self._transaction(batch, events, first_seq)
            except sqlite3.Error as exc:
                self.commits_failed += 1
                log.error("state_commit_failed", error=str(exc), changes=len(batch))
                if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                    self._became_read_only(exc)
                for event in events:
                    event.seq = 0
                for pending in reversed(batch):
                    pending.error = exc
                    if pending.undo is not None:
                        try:
                            pending.undo()
                        except Exception:
                            log.exception("undo_failed")
            else:
                self.transactions += 1
                self._wal_dirty = True
                if self.read_only is not None:
                    self._became_writable()
                self._last_seq = first_seq + len(events) - 1
                if events:
                    try:
                        self.on_commit(events)
                    except Exception:
                        log.exception("event_publish_failed")
            for pending in batch:
                pending.done.set()

    def _became_read_only(self, exc: sqlite3.Error) -> None:
        directory = self.path.parent
        try:
            st = os.statvfs(directory)
            free = f"{st.f_bavail * st.f_frsize} bytes free"
        except OSError:
            free = "free space unknown"
        self.read_only = f"the file system of {directory} is full ({exc}; {free})"
        if self._writable.is_set():
            self._writable = anyio.Event()
            log.error("state_read_only", reason=self.read_only)

    def _became_writable(self) -> None:
        log.info("state_writable", was=self.read_only)
        self.read_only = None
        self._writable.set()

    def _transaction(self, batch: list[_Pending], events: list[Event], first_seq: int) -> None:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            seq = first_seq
            for pending in batch:
                for op in pending.ops:
                    if isinstance(op, Put):
                        conn.execute(
                            "INSERT OR REPLACE INTO records VALUES (?, ?, ?)",
                            (op.kind, op.key, dump_json(op.data).decode()),
                        )
                    elif isinstance(op, Delete):
                        conn.execute("DELETE FROM records WHERE kind = ? AND key = ?", (op.kind, op.key))
                    else:
                        op.seq = seq
                        seq += 1
                        conn.execute(
                            "INSERT INTO events VALUES (?, ?, ?, ?, ?)",
                            (op.seq, op.ts, op.topic, op.type, dump_json(op.data).decode()),
                        )
            horizon = seq - 1 - self._history
            if horizon > self._pruned_below + 1000:
                conn.execute("DELETE FROM events WHERE seq <= ?", (horizon,))
                self._pruned_below = horizon
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


def _events_query(
    since: int, until: int | None, topics: Iterable[str] | None, limit: int
) -> tuple[str, list[Any]]:
    sql = "SELECT seq, ts, topic, type, data FROM events WHERE seq > ?"
    args: list[Any] = [since]
    if until is not None:
        sql += " AND seq <= ?"
        args.append(until)
    if topics is not None:
        wanted = list(topics)
        sql += f" AND topic IN ({','.join('?' * len(wanted))})"
        args.extend(wanted)
    sql += " ORDER BY seq LIMIT ?"
    args.append(limit)
    return sql, args


class EventReader:
    """Pages of the event history, read from a worker thread on a connection of its own.

    The writer's connection stays the event loop's alone (a read on it from a thread would
    queue behind, or in front of, a commit), and each page is its own short read transaction:
    no snapshot is held between pages, so a slow subscriber keeps neither the WAL from being
    checkpointed nor the history from being pruned.

    Resource handling: the connection is opened at the first ``page`` and closed by ``close``;
    use the reader from one thread at a time (any thread: anyio's worker threads vary).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None

    def page(
        self, since: int, *, until: int, topics: Iterable[str] | None, limit: int
    ) -> tuple[int, list[Event]]:
        """The oldest ``seq`` still kept, and at most ``limit`` events after ``since`` up to
        ``until``, both from one snapshot: an oldest kept ``seq`` above ``since + 1`` means
        events after ``since`` were pruned."""
        if self._conn is None:
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA query_only = ON")
            self._conn.execute("PRAGMA busy_timeout = 2000")
        conn = self._conn
        sql, args = _events_query(since, until, topics, limit)
        conn.execute("BEGIN")
        try:
            row = conn.execute("SELECT MIN(seq) FROM events").fetchone()
            first = int(row[0]) if row is not None and row[0] is not None else until + 1
            events = [
                Event(topic, type_, json.loads(data), ts, seq)
                for seq, ts, topic, type_, data in conn.execute(sql, args)
            ]
        finally:
            conn.execute("COMMIT")
        return first, events

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
