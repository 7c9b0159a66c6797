"""The same-run floors of issue 22: the least any Python daemon can do on this machine.

- ``durable``: an asyncio Unix-socket JSON-lines server that, per request line, decodes it
  (orjson, the daemon's codec), writes one SQLite row (WAL, ``synchronous=FULL``, a database of
  its own) and group-commits once per loop turn: every request that arrived in the same loop
  turn shares one COMMIT, and a reply goes out only after its commit. Each reply is shaped like
  a ``slots.allocate`` result.
- ``plain``: the same server without SQLite (decode, reply).
- ``spawn``: a plain Python loop that runs ``true`` N at a time (``asyncio.create_subprocess_exec``
  under a semaphore) and prints its tasks per second and its own CPU per task, as JSON.
- ``resets``: the same loop, each of the N workers with a slot of its own that it gives back
  after each ``true`` the least way the slot's kind allows: on an overlay, unmount it (the
  daemon's test that nothing uses it), put its upper aside, make a new one, mount it again and
  delete the old one; on a git worktree, ``checkout --force`` of the base, ``clean -ffdx`` and the
  ``status`` that verifies it. What a dispatcher that resets a slot between tasks cannot go under.

Each runs as its own process (``python -m bench.floors ...``), like the daemon, so its CPU is read
the same way (``bench.cpu``; ``spawn`` reads its own with getrusage, its children excluded).
Item 1 measures the echo servers with its own client program; item 7 runs ``spawn``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from bench.cpu import process_cpu_seconds
from bench.scratch import Scratch

DURABLE, PLAIN = "durable", "plain"
LABELS = {DURABLE: "durable echo (1 SQLite row, group commit per loop turn)", PLAIN: "plain echo"}


# --- the servers (run in the floor's own process) -------------------------------------------------


class _Server:
    def __init__(self, db: sqlite3.Connection | None) -> None:
        self.db = db
        self.loop = asyncio.get_running_loop()
        #: Replies waiting for the commit of the loop turn their requests arrived in.
        self.pending: list[tuple[asyncio.StreamWriter, bytes]] = []
        self.leases = 0

    def _reply(self, line: bytes) -> bytes:
        request = orjson.loads(line)
        params = request.get("params") or {}
        self.leases += 1
        lease = f"l-{os.getpid()}-{self.leases}"
        result = {
            "lease_id": lease,
            "slot_id": f"{params.get('pool', 'floor')}/{self.leases % 64}",
            "pool": params.get("pool"),
            "holder": params.get("holder"),
            "path": f"/tmp/floor/{self.leases % 64}",
            "commit": "0" * 40,
        }
        if self.db is not None:
            if not self.pending:
                self.db.execute("BEGIN IMMEDIATE")
            self.db.execute(
                "INSERT INTO leases VALUES (?, ?, ?, ?)", (lease, result["pool"], result["holder"], line)
            )
        reply = {"jsonrpc": "2.0", "id": request.get("id"), "result": result}
        return orjson.dumps(reply, option=orjson.OPT_APPEND_NEWLINE)

    def _commit(self) -> None:
        """Called once per loop turn that received requests: one COMMIT, then their replies."""
        pending, self.pending = self.pending, []
        assert self.db is not None
        self.db.execute("COMMIT")
        for writer, reply in pending:
            if not writer.is_closing():
                writer.write(reply)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                reply = self._reply(line)
                if self.db is None:
                    writer.write(reply)
                    continue
                if not self.pending:  # the first request of this loop turn
                    # call_soon runs after every callback already ready in this turn.
                    self.loop.call_soon(self._commit)
                self.pending.append((writer, reply))
        except (ConnectionError, orjson.JSONDecodeError):
            pass
        finally:
            writer.close()


def _open_db(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute("CREATE TABLE leases (lease_id TEXT PRIMARY KEY, pool TEXT, holder TEXT, request BLOB)")
    return db


async def _serve(path: str, db_path: str | None) -> None:
    server = _Server(_open_db(Path(db_path)) if db_path else None)
    async with await asyncio.start_unix_server(server.serve, path, limit=1 << 20) as s:
        await s.serve_forever()


# --- spawn: tasks of ``true``, N at a time ----------------------------------------------------------


async def _spawn(tasks: int, at_once: int) -> dict[str, float]:
    gate = asyncio.Semaphore(at_once)

    async def one() -> None:
        async with gate:
            proc = await asyncio.create_subprocess_exec("true")
            if await proc.wait() != 0:
                raise RuntimeError("true failed")

    usage = _usage()
    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(tasks)))
    wall = time.perf_counter() - started
    return {"tasks": tasks, "per_second": tasks / wall, **_cpu_per_task(usage, _usage(), tasks)}


def _usage() -> tuple[float, float]:
    """CPU seconds of this process, and of the children it waited for (git, ``true``)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def _cpu_per_task(before: tuple[float, float], after: tuple[float, float], tasks: int) -> dict[str, float]:
    own = after[0] - before[0]
    return {
        "cpu_ms_per_task": own * 1000 / tasks,
        "all_cpu_ms_per_task": (own + after[1] - before[1]) * 1000 / tasks,
    }


async def _resets(
    kind: str, root: Path, source: str, commit: str, tasks: int, at_once: int
) -> dict[str, float]:
    """``tasks`` runs of ``true``, ``at_once`` slots of ``kind`` each reset after each run."""
    from necrod.io import overlay  # the syscalls the daemon mounts with (the floor is Linux-only too)

    slots = [root / f"slot-{i}" for i in range(at_once)]

    async def git(cwd: Path, *args: str) -> None:
        proc = await asyncio.create_subprocess_exec("git", *args, cwd=cwd, stdout=subprocess.DEVNULL)
        if await proc.wait() != 0:
            raise RuntimeError(f"git {args[0]} failed in {cwd}")

    def mount_fresh(slot: Path, n: int) -> None:
        upper = root / f"upper-{slot.name}-{n}"
        (upper / "upper").mkdir(parents=True)
        (upper / "work").mkdir()
        slot.mkdir(exist_ok=True)
        overlay.mount(slot, [Path(source)], upper / "upper", upper / "work")

    def remount(slot: Path, n: int) -> None:
        if not overlay.unmount_if_unused(slot):
            raise RuntimeError(f"{slot} is in use")
        old = root / f"upper-{slot.name}-{n - 1}"
        aside = root / f"trash-{slot.name}-{n}"
        os.rename(old, aside)
        mount_fresh(slot, n)
        shutil.rmtree(aside)

    if kind == "overlay":
        for slot in slots:
            await asyncio.to_thread(mount_fresh, slot, 0)
    else:
        for slot in slots:
            await git(Path(source), "worktree", "add", "--quiet", "--detach", str(slot), commit)

    async def worker(slot: Path, count: int) -> None:
        for n in range(1, count + 1):
            proc = await asyncio.create_subprocess_exec("true", cwd=slot)
            if await proc.wait() != 0:
                raise RuntimeError("true failed")
            if kind == "overlay":
                await asyncio.to_thread(remount, slot, n)
            else:
                await git(slot, "checkout", "--quiet", "--force", "--detach", commit)
                await git(slot, "clean", "--quiet", "-ffdx")
                await git(slot, "status", "--porcelain=v1", "-z", "--untracked-files=all")

    shares = [tasks // at_once + (1 if i < tasks % at_once else 0) for i in range(at_once)]
    usage = _usage()
    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker(slot, count) for slot, count in zip(slots, shares, strict=True)))
        wall = time.perf_counter() - started
        after = _usage()
    finally:
        if kind == "overlay":
            for slot in slots:
                overlay.unmount(slot)
    return {"tasks": tasks, "per_second": tasks / wall, **_cpu_per_task(usage, after, tasks)}


def reset_floor(
    scratch: Scratch, kind: str, source: Path, commit: str, tasks: int, at_once: int
) -> dict[str, float]:
    """Run ``resets`` in a process of its own; its tasks per second and CPU ms per task.
    ``source``: the overlay's lower directory, or the repository the worktrees are added to."""
    root = scratch.path(f"floor-resets-{kind}")
    root.mkdir()
    argv = [sys.executable, "-m", "bench.floors", "resets", "--slot-kind", kind, "--root", str(root),
            "--source", str(source), "--commit", commit, "--tasks", str(tasks), "--at-once", str(at_once)]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=scratch.root, env=_env())
    result: dict[str, float] = json.loads(out.stdout)
    return result


def spawn_floor(scratch: Scratch, tasks: int, at_once: int) -> dict[str, float]:
    """Run ``spawn`` in a process of its own; its tasks per second and CPU ms per task."""
    argv = [sys.executable, "-m", "bench.floors", "spawn", "--tasks", str(tasks), "--at-once", str(at_once)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=scratch.root, env=_env())
    result: dict[str, float] = json.loads(out.stdout)
    return result


def _env() -> dict[str, str]:
    """The bench package importable from the floor's own process, wherever it runs."""
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    return env


# --- the handle the bench holds ---------------------------------------------------------------------


class Floor:
    """One echo server process under the bench's scratch directory."""

    def __init__(self, scratch: Scratch, kind: str) -> None:
        self.kind = kind
        self.label = LABELS[kind]
        self.root = scratch.path(f"floor-{kind}")
        self.root.mkdir(exist_ok=True)
        self.socket = self.root / "floor.sock"
        argv = [sys.executable, "-m", "bench.floors", kind, "--socket", str(self.socket)]
        if kind == DURABLE:
            argv += ["--db", str(self.root / "floor.sqlite")]
        self.scratch = scratch
        self.proc = scratch.spawn(argv, log=self.root / "floor.log", env=_env())
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"floor {self.kind} exited with {self.proc.returncode}: {self.root}")
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(self.socket))
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"floor {self.kind} did not listen within {timeout:g}s")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """User plus system CPU of the floor's process, read as ``Daemon.cpu_seconds`` reads the daemon's."""
        return process_cpu_seconds(self.pid)

    def stop(self) -> None:
        self.scratch.stop(self.proc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floors", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    for kind in (DURABLE, PLAIN):
        p = sub.add_parser(kind, help=LABELS[kind])
        p.add_argument("--socket", required=True)
        if kind == DURABLE:
            p.add_argument("--db", required=True, help="the SQLite file (created; must not exist)")
    p = sub.add_parser("spawn", help="run `true` --tasks times, --at-once at a time; print JSON")
    p.add_argument("--tasks", type=int, required=True)
    p.add_argument("--at-once", type=int, default=8)
    p = sub.add_parser("resets", help="the same, each worker's slot reset after each run; print JSON")
    p.add_argument("--slot-kind", choices=["overlay", "worktree"], required=True)
    p.add_argument("--root", required=True, help="an empty directory for the slots")
    p.add_argument("--source", required=True, help="the overlay's lower directory, or the repository")
    p.add_argument("--commit", required=True, help="what a worktree is reset to")
    p.add_argument("--tasks", type=int, required=True)
    p.add_argument("--at-once", type=int, default=8)
    args = parser.parse_args(argv)
    if args.kind == "resets":
        result = asyncio.run(
            _resets(args.slot_kind, Path(args.root), args.source, args.commit, args.tasks, args.at_once)
        )
        print(json.dumps(result))
        return 0
    if args.kind == "spawn":
        result: dict[str, Any] = asyncio.run(_spawn(args.tasks, args.at_once))
        print(json.dumps(result))
        return 0
    try:
        asyncio.run(_serve(args.socket, getattr(args, "db", None)))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
