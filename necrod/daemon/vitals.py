"""How the daemon is doing, told to what watches it: the HTTP probes, systemd's watchdog and the
``STATUS=`` line.

- **Alive** (``/healthz``): the event loop answers. The handler runs on the loop, so any answer
  proves it; a wedged loop answers nothing and the probe times out.
- **Ready** (``/readyz``): serving. The state is loaded and the daemon has said READY, it is not
  stopping, and its own socket answers a ``hello`` (the accept loop and a connection's request
  loop work) while the state store's writer answers a ping, each within ``SELF_CHECK_S``.
  Degraded — a pool whose fetch fails, low disk, a rejected config — is still ready: the daemon
  serves what it can, and the body lists why it is degraded. Answers 503 with the reasons
  otherwise.
- **Watchdog**: ``WATCHDOG=1`` is sent only after the same self-check passes, so systemd
  restarts a daemon whose accept loop or store is stuck, not only one whose timers stopped.
  While stopping, the ping goes on unconditionally: the stop has its own deadlines.
- **STATUS=**: pools, slots by state, leases and tasks (``systemctl status necrod``), sent again
  every ``STATUS_EVERY_S`` when it changed.

Owns the last self-check and the last status line sent. Calls the state store (``ping``), the
RPC server (``accepting``), the socket (``server.probe``), the notifier, and reads the slot
table and the dispatcher's counts; the daemon's phase and degraded reasons are callables.

Resource handling: self-checks are coalesced — probes arriving while one runs wait for it, and
a result younger than ``SELF_CHECK_REUSE_S`` is reused — so no flood of ``/readyz`` can make the
daemon connect to itself more than once a second.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import structlog

from necrod.core.clock import Clock
from necrod.daemon.dispatcher import Dispatcher
from necrod.daemon.slottable import SlotTable
from necrod.io.metrics_http import Reply
from necrod.io.sdnotify import Notifier
from necrod.io.server import RpcServer, probe
from necrod.io.store import StateStore

log = structlog.get_logger("necrod.vitals")

#: How long the socket and the store may take to answer a self-check.
SELF_CHECK_S = 5.0
#: A self-check result younger than this answers the next probe too.
SELF_CHECK_REUSE_S = 1.0
STATUS_EVERY_S = 2.0
#: The STATUS= line shows this much of the first degraded reason.
STATUS_REASON_CHARS = 80

JSON = "application/json"


@dataclass(frozen=True, slots=True)
class Check:
    """One self-check: whether the socket and the store answered, and what failed."""

    at: float
    problems: tuple[str, ...]
    socket_s: float | None = None


class Vitals:
    def __init__(self, *, socket: Path, store: StateStore, server: RpcServer, table: SlotTable,
                 dispatcher: Dispatcher, notifier: Notifier, phase: Callable[[], str],
                 degraded: Callable[[], list[str]], clock: Clock) -> None:  # fmt: skip
        self.socket = socket
        self.store = store
        self.server = server
        self.table = table
        self.dispatcher = dispatcher
        self.notifier = notifier
        #: "starting" until READY, then "running", then "stopping".
        self.phase = phase
        self.degraded = degraded
        self.clock = clock
        self.last_check: Check | None = None
        self._checking: anyio.Event | None = None
        self._status_sent: str | None = None

    # --- the self-check ---------------------------------------------------------------------------

    async def check(self, timeout: float = SELF_CHECK_S) -> Check:
        """The socket and the store answer, each within ``timeout`` (a fresh result, or one
        younger than a second)."""
        while True:
            last = self.last_check
            if last is not None and self.clock.monotonic() - last.at < SELF_CHECK_REUSE_S:
                return last
            if self._checking is None:
                break
            await self._checking.wait()  # one in flight: its result, unless it was cancelled
        self._checking = anyio.Event()
        try:
            self.last_check = await self._check(timeout)
        finally:
            self._checking.set()
            self._checking = None
        return self.last_check

    async def _check(self, timeout: float) -> Check:
        """Ask the socket and the store at once; each has ``timeout`` to answer."""
        problems: list[str] = []
        socket_s: list[float] = []

        async def ask_socket() -> None:
            if not self.server.accepting:
                problems.append("the socket is not accepting connections")
                return
            try:
                socket_s.append(await probe(self.socket, timeout))
            except TimeoutError:
                problems.append(f"the socket {self.socket} did not answer within {timeout:g}s")
            except OSError as exc:
                problems.append(f"the socket {self.socket} does not answer: {exc.strerror or exc}")

        async def ask_store() -> None:
            try:
                with anyio.fail_after(timeout):
                    await self.store.ping()
            except TimeoutError:
                problems.append(f"the state store did not answer within {timeout:g}s")
            except Exception as exc:
                problems.append(f"the state store does not answer: {exc}")

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask_socket)
            tg.start_soon(ask_store)
        return Check(self.clock.monotonic(), tuple(sorted(problems)), socket_s[0] if socket_s else None)

    # --- the probes -------------------------------------------------------------------------------

    async def healthz(self) -> Reply:
        body = {"status": "alive", "phase": self.phase()}
        return Reply(200, json.dumps(body).encode() + b"\n", JSON)

    async def readyz(self) -> Reply:
        phase = self.phase()
        reasons: list[str] = []
        if phase == "starting":
            reasons.append("starting: the state is being loaded and the runners found again")
        elif phase == "stopping":
            reasons.append("stopping: no new leases or connections are taken")
        else:
            reasons += (await self.check()).problems
        if reasons:
            body: dict[str, Any] = {"status": "not ready", "phase": phase, "reasons": reasons}
            return Reply(503, json.dumps(body).encode() + b"\n", JSON)
        degraded = self.degraded()
        body = {"status": "ready", "state": "degraded" if degraded else "running", "degraded": degraded}
        return Reply(200, json.dumps(body).encode() + b"\n", JSON)

    # --- systemd ----------------------------------------------------------------------------------

    async def watchdog(self) -> None:
        """Ping systemd's watchdog while the daemon works (``WATCHDOG_USEC``); nothing without it."""
        interval = self.notifier.watchdog_interval()
        if interval is None:
            return
        # The answers (asked at once) must come before systemd's deadline, two intervals away.
        timeout = min(SELF_CHECK_S, interval * 0.8)
        while True:
            if self.phase() == "stopping":
                self.notifier.watchdog()
            else:
                check = await self.check(timeout)
                if check.problems:
                    log.error("watchdog_withheld", problems=list(check.problems))
                    self.send_status()  # led by what does not answer
                else:
                    self.notifier.watchdog()
            await anyio.sleep(interval)

    async def keep_status(self) -> None:
        """Keep the ``STATUS=`` line current (only when run by systemd)."""
        if not self.notifier.enabled:
            return
        while True:
            await anyio.sleep(STATUS_EVERY_S)
            if self.phase() == "running":
                self.send_status()

    def send_status(self, *, ready: bool = False) -> None:
        line = self.status_line()
        if ready:
            self.notifier.ready(line)
        elif line != self._status_sent:
            self.notifier.status(line)
        self._status_sent = line

    def status_line(self) -> str:
        """``2 pools; slots: 3 available, 1 allocated; 1 lease; tasks: 1 running, 2 queued``,
        led by the first degraded reason when there is one, and before it by what did not answer
        the last self-check."""
        pools = self.table.pools
        slots: dict[str, int] = {}
        for p in pools.values():
            for state, count in p.by_state().items():
                slots[state] = slots.get(state, 0) + count
        leases = len(self.table.leases)
        tasks = {
            state: n
            for state, n in self.dispatcher.counts().items()
            if n and state in ("running", "queued", "blocked")
        }
        parts = [
            f"{len(pools)} pool{'s' if len(pools) != 1 else ''}",
            "slots: " + (", ".join(f"{n} {state}" for state, n in slots.items() if n) or "none"),
            f"{leases} lease{'s' if leases != 1 else ''}",
        ]
        if tasks:
            parts.append("tasks: " + ", ".join(f"{n} {state}" for state, n in tasks.items()))
        degraded = self.degraded()
        if degraded:
            first = degraded[0]
            if len(first) > STATUS_REASON_CHARS:
                first = first[: STATUS_REASON_CHARS - 1] + "…"
            more = f" (+{len(degraded) - 1} more)" if len(degraded) > 1 else ""
            parts.insert(0, f"degraded: {first}{more}")
        if self.last_check is not None and self.last_check.problems:
            parts.insert(0, "not answering: " + "; ".join(self.last_check.problems))
        return "; ".join(parts)
