"""Other necrod hosts, driven over SSH: links, health, remote slots and remote runners.

Each host in ``hosts:`` runs its own necrod with its own pools. A ``HostLink`` keeps one SSH
connection to it (keepalives every few seconds; reconnection with backoff) and checks its
daemon with a ``daemon.status`` call; a host that stops answering is ``down`` and gets no new
tasks. Through the link the dispatcher leases slots from that host's necrod (the same protocol,
over a stream to its socket) and starts runners there.

A remote runner is a small shell script started with ``setsid nohup`` in the slot, in its own
process group. It writes its pid, its output (to a log on that host) and its exit status to
files under ``<workdir>/<origin>/<task>/``, so it does not depend on the SSH connection that
started it: if the link drops, the runner goes on, and when the host is back the dispatcher
finds it again (still running: watched again; finished: its status is read; gone without a
status: a lost attempt). A host that stays unreachable for ``dispatcher.host_grace_s`` has its
attempts written off, and their tasks may run elsewhere; when it comes back, a written-off
runner that is still running is stopped at once, so a task never keeps two runners.

Output streams back into the attempt's local log (``tail -F`` over SSH), so ``necroctl logs -f``
and the output watchdog work as for local runners. Heartbeats go from the runner to its own
host's necrod: ``NECROD_SOCKET`` and ``NECROD_LEASE_ID`` name that host's socket and lease.
"""

from __future__ import annotations

import hashlib
import shlex
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from necrod.client import AsyncClient
from necrod.core.config import HostConfig
from necrod.io.launchers import Exit, Run
from necrod.io.ssh import SSHError, SSHStream, SSHTarget, connect, open_daemon
from necrod.proto.errors import DaemonUnreachable, NecrodError, Unavailable

if TYPE_CHECKING:
    import asyncssh

log = structlog.get_logger("necrod.fleet")

PING_EVERY_S = 5.0
RECONNECT_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
POLL_S = 0.5


class HostDown(Exception):
    """The host cannot be reached right now."""


def origin_id(state_dir: Path) -> str:
    """A name for this daemon on other hosts, to keep its files apart from other daemons'."""
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]
    return f"{socket.gethostname()}-{digest}"


class HostLink:
    """See the module docstring."""

    def __init__(self, config: HostConfig, origin: str) -> None:
        self.config = config
        self.name = config.name
        self.origin = origin
        self.target = SSHTarget.parse(config.address, key=config.key, known_hosts=config.known_hosts,
                                      accept_unknown=config.accept_unknown_host_key or None)  # fmt: skip
        self.state = "connecting"
        self.error: str | None = None
        self.last_contact: float | None = None
        self.down_since: float | None = None
        self.remote: dict[str, Any] = {}
        self.on_up: list[Callable[[HostLink], Awaitable[None]]] = []
        self._conn: asyncssh.SSHClientConnection | None = None
        self._rpc: AsyncClient | None = None
        self._up = anyio.Event()
        self._closed = False

    @property
    def up(self) -> bool:
        return self.state == "up"

    def view(self) -> dict[str, Any]:
        return {
            "name": self.name, "address": self.target.describe(), "state": self.state, "error": self.error,
            "pools": list(self.config.pools), "skills": list(self.config.skills), "labels": list(self.config.labels),
            "max_concurrency": self.config.max_concurrency, "last_contact": self.last_contact,
            "down_since": self.down_since, "remote": self.remote,
        }  # fmt: skip

    # --- the connection -----------------------------------------------------------------------------

    async def run(self) -> None:
        failures = 0
        while not self._closed:
            try:
                self._conn = await connect(self.target)
                await self._check()
            except (SSHError, HostDown, NecrodError, OSError) as exc:
                self._mark_down(str(exc))
                delay = RECONNECT_BACKOFF_S[min(failures, len(RECONNECT_BACKOFF_S) - 1)]
                failures += 1
                self._drop()
                await anyio.sleep(delay)
                continue
            failures = 0
            self.state, self.error, self.down_since = "up", None, None
            log.info("host_up", host=self.name, address=self.target.describe())
            self._up.set()
            for callback in list(self.on_up):
                try:
                    await callback(self)
                except Exception:
                    log.exception("host_up_callback_failed", host=self.name)
            try:
                while True:
                    await anyio.sleep(PING_EVERY_S)
                    await self._check()
            except (SSHError, HostDown, NecrodError, OSError) as exc:
                self._mark_down(str(exc))
                self._drop()

    async def _check(self) -> None:
        status = await self.call("daemon.status")
        self.last_contact = time.time()
        self.remote = {"version": status.get("version"), "pid": status.get("pid"), "state": status.get("state"),
                       "pools": {n: p.get("state") for n, p in status.get("pools", {}).items()}}  # fmt: skip

    def _mark_down(self, why: str) -> None:
        if self.state != "down":
            log.warning("host_down", host=self.name, error=why)
            self.down_since = time.time()
        self.state, self.error = "down", why
        if self._up.is_set():
            self._up = anyio.Event()

    def _drop(self) -> None:
        self._rpc = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        self._closed = True
        self._drop()

    async def wait_up(self, timeout: float) -> bool:
        with anyio.move_on_after(timeout):
            await self._up.wait()
        return self.up

    def _connection(self) -> asyncssh.SSHClientConnection:
        if self._conn is None:
            raise HostDown(f"host {self.name} is not connected")
        return self._conn

    def _lost(self, why: str) -> HostDown:
        """A command found the connection dead: say so now, not at the next ping."""
        self._mark_down(why)
        self._drop()
        return HostDown(why)

    # --- the daemon over there ----------------------------------------------------------------------

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """An RPC to that host's necrod (the stream is reopened once if the daemon restarted)."""
        for attempt in (1, 2):
            if self._rpc is None:
                try:
                    reader, writer = await open_daemon(self._connection(), self.target)
                except SSHError as exc:
                    raise HostDown(str(exc)) from None
                stream = SSHStream(self._connection(), reader, writer, owns_connection=False)
                self._rpc = AsyncClient.over(stream, self.target.describe(), timeout=60)
            try:
                return await self._rpc.call(method, params)
            except DaemonUnreachable as exc:
                self._rpc = None
                if attempt == 2:
                    raise HostDown(f"necrod on {self.name}: {exc.message}") from None
        raise AssertionError("unreachable")

    # --- commands over there ------------------------------------------------------------------------

    async def exec(self, command: str, *, input: str | None = None, timeout: float = 60.0) -> tuple[int, str]:
        """Run ``command`` with ``sh -c`` on the host: its exit status and output."""
        import asyncssh

        try:
            with anyio.fail_after(timeout):
                result = await self._connection().run(command, input=input, check=False, encoding="utf-8",
                                                      errors="replace")  # fmt: skip
        except TimeoutError:
            raise HostDown(f"{self.name}: no answer within {timeout:g}s") from None
        except (asyncssh.Error, OSError) as exc:
            raise self._lost(f"{self.name}: {exc}") from None
        if result.exit_status is None and result.exit_signal is None:
            raise self._lost(f"{self.name}: the connection dropped while a command ran")
        out = str(result.stdout or "") + str(result.stderr or "")
        return (result.exit_status if result.exit_status is not None else -1), out

    async def stream_lines(self, command: str, sink: Callable[[bytes], None]) -> None:
        """Run ``command`` on the host, passing its output to ``sink`` as it comes, until it ends
        or the connection drops (``HostDown``)."""
        import asyncssh

        try:
            async with self._connection().create_process(command, encoding=None) as process:
                while chunk := await process.stdout.read(65536):
                    sink(chunk)
        except (asyncssh.Error, OSError) as exc:
            raise self._lost(f"{self.name}: {exc}") from None


class RemoteRun(Run):
    """A runner on another host; see the module docstring."""

    def __init__(self, link: HostLink, directory: str, number: int, pgid: int | None, log_path: Path,
                 grace: Callable[[], float]) -> None:  # fmt: skip
        self.link = link
        self.dir = directory
        self.number = number
        self.pid = pgid
        self.log_path = log_path
        self._grace = grace
        self.written_off = False

    def _file(self, suffix: str) -> str:
        return shlex.quote(f"{self.dir}/{self.number}.{suffix}")

    async def wait(self) -> Exit:
        while True:
            if not self.link.up and not await self.link.wait_up(self._remaining()):
                self.written_off = True
                return Exit(
                    code=None, lost=True, detail=f"host {self.link.name} was unreachable for the grace"
                )
            try:
                if self.pid is None and not await self.resolve():
                    return Exit(code=None, lost=True, detail=f"the runner never started on {self.link.name}")
                return await self._wait_connected()
            except HostDown:
                # The link is down: wait for it (within the grace) and look again — after a
                # pause, never in a tight loop.
                await anyio.sleep(POLL_S)

    async def resolve(self) -> bool:
        """Learn the directory and pid of a runner whose start was cut off with the link; False
        when it never started."""
        q = shlex.quote
        status, out = await self.link.exec(
            f'cd "$HOME" && d=$(cd {q(self.dir)} 2>/dev/null && pwd) && echo "$d" && cat "$d/{self.number}.pid"'
        )
        lines = out.strip().splitlines()
        if status != 0 or len(lines) < 2 or not lines[-1].isdigit():
            return False
        self.dir, self.pid = lines[-2], int(lines[-1])
        return True

    def _remaining(self) -> float:
        since = self.link.down_since or time.time()
        return max(0.0, self._grace() - (time.time() - since))

    async def _wait_connected(self) -> Exit:
        """The runner's exit status, following its output meanwhile; ``HostDown`` if the link
        drops (the children report it as a value: a task group would wrap it in a group)."""
        result: Exit | None = None
        dropped: HostDown | None = None

        async def follow() -> None:
            nonlocal dropped
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            with self.log_path.open("ab") as out:

                def sink(chunk: bytes) -> None:
                    out.write(chunk)
                    out.flush()

                try:
                    await self.link.stream_lines(self._follow_script(offset), sink)
                except HostDown as exc:
                    dropped = exc

        async with anyio.create_task_group() as tg:

            async def finish() -> None:
                nonlocal result, dropped
                try:
                    result = await self._poll_exit()
                except HostDown as exc:
                    dropped = exc
                    tg.cancel_scope.cancel()
                    return
                await anyio.sleep(POLL_S)  # let the follower copy the last lines
                tg.cancel_scope.cancel()

            tg.start_soon(follow)
            tg.start_soon(finish)
        if result is None:
            raise dropped or HostDown(f"{self.link.name}: the watch ended without an exit status")
        return result

    def _follow_script(self, offset: int) -> str:
        """Copy the log from ``offset`` as it grows, and end once the runner has (a plain
        ``tail -F`` would outlive it on the host, waiting for output that never comes)."""
        log_file = self._file("log")
        return (
            f"off={offset}\n"
            "while :; do\n"
            f"  alive=0; kill -0 -{self.pid} 2>/dev/null && alive=1\n"
            f"  size=$(wc -c < {log_file} 2>/dev/null || echo 0)\n"
            f'  if [ "$size" -gt "$off" ]; then tail -c +$((off + 1)) {log_file} | head -c $((size - off)); off=$size; fi\n'
            '  [ "$alive" = 1 ] || exit 0\n'
            "  sleep 0.3\n"
            "done\n"
        )

    async def _poll_exit(self) -> Exit:
        script = (
            f"while [ ! -e {self._file('exit')} ]; do\n"
            f"  if ! kill -0 -{self.pid} 2>/dev/null; then sleep 1; "
            f"[ -e {self._file('exit')} ] || {{ echo lost; exit 0; }}; fi\n"
            "  sleep 0.5\n"
            "done\n"
            # The runner writes its record: a number, read up to 64 bytes, not whole.
            f"head -c 64 {self._file('exit')}\n"
        )
        status, out = await self.link.exec(script, timeout=366 * 24 * 3600)
        text = out.strip().splitlines()[-1] if out.strip() else ""
        if status != 0 or text == "lost" or not text.lstrip("-").isdigit():
            return Exit(
                code=None, lost=True, detail=f"the runner on {self.link.name} is gone without an exit status"
            )
        code = int(text)
        return Exit(code=None, signal=code - 128) if code > 128 else Exit(code=code)

    async def stop(self, grace: float) -> None:
        try:
            if self.pid is None and not await self.resolve():
                return
        except HostDown:
            log.warning("remote_stop_failed", host=self.link.name, directory=self.dir)
            return
        steps = max(1, int(grace * 10))
        try:
            await self.link.exec(
                f"kill -TERM -{self.pid} 2>/dev/null; i=0; "
                f"while kill -0 -{self.pid} 2>/dev/null && [ $i -lt {steps} ]; do sleep 0.1; i=$((i+1)); done; "
                f"kill -KILL -{self.pid} 2>/dev/null; true",
                timeout=grace + 30,
            )
        except HostDown:
            log.warning("remote_stop_failed", host=self.link.name, pgid=self.pid)


async def launch(link: HostLink, *, directory: str, number: int, slot_path: str, argv: list[str],
                 env: dict[str, str], log_path: Path, grace: Callable[[], float]) -> RemoteRun:  # fmt: skip
    """Start a runner on ``link``'s host; it keeps running if the link drops."""
    q = shlex.quote
    variables = " ".join(q(f"{k}={v}") for k, v in env.items())
    # The script finds its files beside itself ($0 is absolute), whatever directory it is in.
    script = (
        "#!/bin/sh\n"
        'd=$(dirname "$0")\n'
        f'echo $$ > "$d/{number}.pid"\n'
        f'cd {q(slot_path)} || {{ echo 127 > "$d/{number}.exit"; exit 127; }}\n'
        f'env -i PATH="$PATH" HOME="$HOME" USER="${{USER:-}}" LANG="${{LANG:-C.UTF-8}}" TERM=dumb {variables} '
        f'{" ".join(q(a) for a in argv)} >> "$d/{number}.log" 2>&1 < /dev/null\n'
        f'echo $? > "$d/{number}.exit.tmp" && mv "$d/{number}.exit.tmp" "$d/{number}.exit"\n'
    )
    # A relative directory is relative to the login's home; we answer with its absolute path.
    start = (
        f'set -e; cd "$HOME"; mkdir -p {q(directory)}; d=$(cd {q(directory)} && pwd); '
        f'rm -f "$d/{number}.pid" "$d/{number}.exit"; cat > "$d/{number}.sh"; chmod 700 "$d/{number}.sh"; '
        f'setsid nohup sh "$d/{number}.sh" > /dev/null 2>&1 < /dev/null &\n'
        f'i=0; while [ ! -s "$d/{number}.pid" ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done\n'
        f'echo "$d"; cat "$d/{number}.pid"'
    )
    try:
        status, out = await link.exec(start, input=script)
    except HostDown:
        # The runner may be running already: learn its pid when the host is back, never run blind.
        log.warning("remote_start_unconfirmed", host=link.name, directory=directory)
        return RemoteRun(link, directory, number, None, log_path, grace)
    lines = out.strip().splitlines()
    if status != 0 or len(lines) < 2 or not lines[-1].isdigit() or not lines[-2].startswith("/"):
        raise OSError(f"could not start the runner on {link.name}: {out.strip()[-300:] or f'exit {status}'}")
    return RemoteRun(link, lines[-2], number, int(lines[-1]), log_path, grace)


class Fleet:
    """The hosts of ``hosts:``, as the dispatcher sees them."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.links: dict[str, HostLink] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self.on_up: list[Callable[[HostLink], Awaitable[None]]] = []

    async def run(self, hosts: dict[str, HostConfig], *, task_status: anyio.abc.TaskStatus[None]
                  = anyio.TASK_STATUS_IGNORED) -> None:  # fmt: skip
        async with anyio.create_task_group() as tg:
            self._tg = tg
            self.apply(hosts)
            task_status.started()
            await anyio.sleep_forever()

    def apply(self, hosts: dict[str, HostConfig]) -> list[str]:
        """Start links to new hosts, restart changed ones, close removed ones."""
        changes = []
        for name in list(self.links):
            if name not in hosts or hosts[name] != self.links[name].config:
                self.links.pop(name).close()
                changes.append(
                    f"removed host {name}" if name not in hosts else f"host {name} changed: reconnecting"
                )
        for name, config in hosts.items():
            if name not in self.links:
                link = HostLink(config, self.origin)
                link.on_up.extend(self.on_up)
                self.links[name] = link
                if self._tg is not None:
                    self._tg.start_soon(link.run)
                if not any(c.startswith(f"host {name} changed") for c in changes):
                    changes.append(f"host {name}: {config.address}")
        return changes

    def link(self, name: str) -> HostLink:
        link = self.links.get(name)
        if link is None:
            raise Unavailable(f"no host {name!r} in the config")
        return link

    def directory(self, link: HostLink, task_id: str) -> str:
        return f"{link.config.workdir.rstrip('/')}/{self.origin}/{task_id}"
