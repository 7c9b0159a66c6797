"""``necroctl run``: a leased slot around any command — a CI job, a Slurm batch script, the
entrypoint of a Kubernetes Job.

It allocates a slot, runs the command in it with the ``NECROD_*`` environment a dispatched runner
gets, heartbeats while it runs (across daemon restarts), forwards SIGINT, SIGTERM and SIGHUP to
the command's process group, and at the end stops what the command left running in the slot and
releases it, salvaging as asked. Its exit status is the command's (128+n when a signal n killed
it), or one of the ``EXIT_*`` codes below; docs/operations.md lists them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio
from anyio.abc import Process

from necrod import paths
from necrod.client import AsyncClient
from necrod.ctl import render
from necrod.ctl.cli import sparse_of
from necrod.ctl.reconnect import LeaseLost, Reconnecting
from necrod.io.launchers import stop_group
from necrod.proto.errors import DaemonUnreachable, NecrodError

EXIT_USAGE = 2
#: The lease was lost while the command ran (revoked, expired, or no daemon answered for
#: ``--reconnect-for``), so the command was stopped. EX_TEMPFAIL: a scheduler may run it again.
EXIT_LEASE_LOST = 75
#: ``necroctl run`` failed before the command started (no daemon, no slot); 126 and 127 as a
#: shell's: the command could not be executed, or was not found. ``docker run`` does the same.
EXIT_NOT_STARTED, EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND = 125, 126, 127

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: Heartbeat at a third of the TTL, but often enough that a revoked lease is noticed soon.
HEARTBEAT_MAX_INTERVAL_S = 30.0
MAX_COMMAND_NOTE = 1000

#: How a release ended: done, refused because the lease was already gone, or no daemon answered.
Released = Literal["released", "lost", "unconfirmed"]


@dataclass(frozen=True, slots=True)
class Options:
    pool: str
    argv: list[str]
    socket: Path
    ref: str | None
    branch: str | None
    sparse: list[str] | None
    ttl_s: float | None
    wait_s: float | None
    holder: str
    salvage: str
    grace_s: float
    reconnect_for_s: float
    timeout_s: float | None
    as_json: bool


def environment(lease: dict[str, Any], socket: Path) -> dict[str, str]:
    """Ours, with the ``NECROD_*`` variables the dispatcher gives a runner for its lease."""
    env = dict(os.environ)
    env.update({
        "NECROD_SOCKET": str(socket), "NECROD_LEASE_ID": lease["lease_id"], "NECROD_SLOT_PATH": lease["path"],
        "NECROD_SLOT_ID": lease["slot_id"], "NECROD_POOL": lease["pool"], "NECROD_COMMIT": lease["commit"] or "",
        "NECROD_FENCING_TOKEN": str(lease["fencing_token"]), "NECROD_LEASE_TTL_S": f"{lease['ttl_s']:g}",
    })  # fmt: skip
    if lease.get("branch"):
        env["NECROD_BRANCH"] = lease["branch"]
    else:
        env.pop("NECROD_BRANCH", None)
    return env


def say(message: str) -> None:
    print(f"necroctl run: {message}", file=sys.stderr, flush=True)


def _killpg(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _status(returncode: int) -> int:
    return returncode if returncode >= 0 else 128 - returncode


class CommandRun:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.process: Process | None = None
        #: A signal that arrived before the command started: it is not started at all.
        self.interrupted: int | None = None
        self.lost: str | None = None
        self._starting = anyio.CancelScope()

    def _connection(self, backoff_cap: float) -> Reconnecting:
        return Reconnecting(self.opts.socket, timeout=self.opts.timeout_s or 10.0,
                            reconnect_for=self.opts.reconnect_for_s, backoff_cap=backoff_cap, say=say)  # fmt: skip

    async def relay(self, signals: AsyncIterator[signal.Signals]) -> None:
        async for signum in signals:
            if self.process is not None:
                _killpg(self.process.pid, signum)
            elif self.interrupted is None:
                self.interrupted = signum
                self._starting.cancel()

    async def execute(self) -> int:
        lease: dict[str, Any] | None = None
        try:
            with self._starting:
                lease = await self._allocate()
        except NecrodError as exc:
            say(f"{exc.kind}: {exc.message}" if exc.kind != DaemonUnreachable.kind else exc.message)
            return EXIT_NOT_STARTED
        if self.interrupted is not None:
            say(f"interrupted by {signal.Signals(self.interrupted).name} before the command started")
            if lease is not None:
                await self._release(lease, False)
            return 128 + self.interrupted
        assert lease is not None
        self._report_lease(lease)
        try:
            self.process = await anyio.open_process(
                self.opts.argv, cwd=lease["path"], env=environment(lease, self.opts.socket),
                stdin=None, stdout=None, stderr=None, start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            say(f"cannot run {self.opts.argv[0]!r}: {exc.strerror or exc}")
            await self._release(lease, False)
            return EXIT_NOT_FOUND if isinstance(exc, FileNotFoundError) else EXIT_CANNOT_EXECUTE
        if self.interrupted is not None:  # it came while the command was starting
            _killpg(self.process.pid, self.interrupted)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._keep, lease, self.process.pid)
                returncode = await self.process.wait()
                tg.cancel_scope.cancel()
        finally:
            # Nothing of the command's may keep writing into a slot that is about to be cleaned,
            # or that nobody heartbeats any more.
            await stop_group(self.process.pid, self.opts.grace_s)
        status = _status(returncode)
        if self.lost is not None:
            self._report_end(lease, status, EXIT_LEASE_LOST, released=False, salvage=None)
            return EXIT_LEASE_LOST
        salvage = {"always": True, "never": False}.get(self.opts.salvage, status != 0)
        outcome = await self._release(lease, salvage)
        code = EXIT_LEASE_LOST if outcome == "lost" else status
        released = outcome == "released"
        self._report_end(lease, status, code, released=released, salvage=salvage if released else None)
        return code

    async def _allocate(self) -> dict[str, Any]:
        o = self.opts
        # The reply may wait for a queued slot and for a ref to be fetched.
        async with AsyncClient(o.socket, timeout=(o.wait_s or 0) + (o.timeout_s or 120.0)) as client:
            lease: dict[str, Any] = await client.allocate(
                o.pool, holder=o.holder, ttl_s=o.ttl_s, ref=o.ref, branch=o.branch, wait_s=o.wait_s, sparse=o.sparse,
                metadata={"command": shlex.join(o.argv)[:MAX_COMMAND_NOTE]},
            )  # fmt: skip
        return lease

    async def _keep(self, lease: dict[str, Any], pgid: int) -> None:
        interval = min(float(lease["ttl_s"]) / 3, HEARTBEAT_MAX_INTERVAL_S)
        connection = self._connection(backoff_cap=min(interval, 2.0))
        try:
            while True:
                await anyio.sleep(interval)
                try:
                    await connection.call("slots.heartbeat", {"lease_id": lease["lease_id"]})
                except (LeaseLost, DaemonUnreachable):
                    raise
                except NecrodError as exc:  # a daemon bug, not an answer about the lease: beat again
                    say(f"heartbeat failed ({exc.kind}: {exc.message}); trying again in {interval:g}s")
        except (LeaseLost, DaemonUnreachable) as exc:
            self.lost = exc.reason if isinstance(exc, LeaseLost) else exc.message
            say(f"lost the lease: {self.lost}; stopping the command")
            await stop_group(pgid, self.opts.grace_s)
        finally:
            await connection.aclose()

    async def _release(self, lease: dict[str, Any], salvage: bool) -> Released:
        connection = self._connection(backoff_cap=2.0)
        try:
            await connection.call("slots.release", {"lease_id": lease["lease_id"], "salvage": salvage})
            return "released"
        except LeaseLost as exc:
            # It ended before the command did: whatever the command produced is suspect.
            self.lost = exc.reason
            say(f"the lease was lost before the command ended: {exc.reason}")
            return "lost"
        except NecrodError as exc:
            say(f"could not release lease {lease['lease_id']} ({exc.message}); it expires on its own")
            return "unconfirmed"
        finally:
            await connection.aclose()

    def _report_lease(self, lease: dict[str, Any]) -> None:
        if self.opts.as_json:
            print(json.dumps({"lease": lease}), file=sys.stderr, flush=True)
            return
        say(f"lease {lease['lease_id']} on slot {lease['slot_id']} at {render.short(lease['commit'])}"
            + (f" branch {lease['branch']}" if lease.get("branch") else "")
            + f", ttl {lease['ttl_s']:g}s: {lease['path']}")  # fmt: skip

    def _report_end(self, lease: dict[str, Any], status: int, code: int, *, released: bool,
                    salvage: bool | None) -> None:  # fmt: skip
        if self.opts.as_json:
            summary = {"lease_id": lease["lease_id"], "slot_id": lease["slot_id"], "command_status": status,
                       "exit_code": code, "released": released, "salvage": salvage, "lease_lost": self.lost}  # fmt: skip
            print(json.dumps({"result": summary}), file=sys.stderr, flush=True)
            return
        if released:
            kept = (
                f"; what it left, if anything, is salvaged to refs/necrod/salvage/{lease['lease_id']}"
                if salvage
                else ""
            )
            say(f"command exited {status}; lease {lease['lease_id']} released{kept}")
        elif code == EXIT_LEASE_LOST:
            say(f"command ended with status {status}; exiting {EXIT_LEASE_LOST} (lease lost)")


def options(args: argparse.Namespace) -> Options:
    socket = getattr(args, "socket", None)
    return Options(
        pool=args.pool, argv=list(args.argv),
        socket=(Path(socket) if socket else paths.client_socket_path()).absolute(),
        ref=args.ref, branch=args.branch, sparse=sparse_of(args), ttl_s=args.ttl, wait_s=args.wait,
        holder=args.holder or f"necroctl-run@{os.uname().nodename}:{os.getpid()}", salvage=args.salvage,
        grace_s=args.grace, reconnect_for_s=args.reconnect_for, timeout_s=getattr(args, "timeout", None),
        as_json=getattr(args, "json", False),
    )  # fmt: skip


async def _main(opts: Options) -> int:
    run = CommandRun(opts)
    with anyio.open_signal_receiver(*FORWARDED) as signals:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run.relay, signals)
            code = await run.execute()
            tg.cancel_scope.cancel()
    return code


def main(args: argparse.Namespace) -> int:
    if getattr(args, "host", None) or os.environ.get("NECROD_HOST"):
        say("not over -H/$NECROD_HOST: the command runs here, so the slot must be on this machine")
        return EXIT_USAGE
    if not args.argv:
        say("give the command after --, e.g. necroctl run --pool P -- make test")
        return EXIT_USAGE
    return anyio.run(_main, options(args))
