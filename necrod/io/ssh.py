"""Reaching a necrod on another host over SSH (asyncssh), the way operators already do.

No new port is opened anywhere: the client asks the remote sshd for a stream to the remote
daemon's Unix socket (OpenSSH's ``direct-streamlocal``, what ``ssh -L local:remote.sock`` uses),
and speaks the same protocol through it. Host keys are checked against ``known_hosts``; an
unknown key is refused unless the operator says otherwise (``accept_unknown``). Only public-key
authentication is offered — a key file, the default keys, or the agent — so nothing ever waits
at a password prompt.

``ssh://[user@]host[:port][/path/to/necrod.sock]`` names a remote daemon; the socket path
defaults to the system one, ``/run/necrod/necrod.sock``.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from necrod.paths import SYSTEM_SOCKET

if TYPE_CHECKING:
    import asyncio

    import asyncssh

# asyncssh takes a third of a second to import, asyncio a fiftieth: each is imported where an
# SSH address is used, so local clients (necroctl, runners' heartbeats) never pay for them.

#: SSH keepalive: a host that stops answering is noticed within about interval × count.
KEEPALIVE_INTERVAL_S = 5.0
KEEPALIVE_COUNT_MAX = 3
CONNECT_TIMEOUT_S = 15.0


class SSHError(Exception):
    """The remote daemon could not be reached; the message says why, for a person."""


@dataclass(frozen=True, slots=True)
class SSHTarget:
    host: str
    port: int = 22
    user: str | None = None
    socket: str = str(SYSTEM_SOCKET)
    key: str | None = None
    known_hosts: str | None = None
    accept_unknown: bool = False

    @classmethod
    def parse(cls, url: str, **options: Any) -> SSHTarget:
        parts = urlsplit(url)
        if parts.scheme != "ssh" or not parts.hostname:
            raise ValueError(f"{url!r} is not ssh://[user@]host[:port][/path/to/necrod.sock]")
        if parts.hostname.startswith("-"):
            raise ValueError(f"{url!r}: the host may not start with '-'")
        target = cls(
            host=parts.hostname,
            port=parts.port or 22,
            user=unquote(parts.username) if parts.username else None,
        )
        if parts.path not in ("", "/"):
            target = replace(target, socket=unquote(parts.path))
        return replace(target, **{k: v for k, v in options.items() if v is not None})

    def describe(self) -> str:
        who = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port != 22 else ""
        return f"ssh://{who}{self.host}{port}{self.socket}"


def _known_hosts(target: SSHTarget) -> str | tuple[()] | None:
    if target.accept_unknown:
        return None  # asyncssh: no host key checking (the operator asked for it)
    if target.known_hosts:
        return os.path.expanduser(target.known_hosts)
    return ()  # asyncssh's default: ~/.ssh/known_hosts


async def connect(target: SSHTarget, *, keepalive: bool = True) -> asyncssh.SSHClientConnection:
    """An SSH connection to ``target``, or ``SSHError`` saying plainly what went wrong."""
    import asyncssh

    options: dict[str, Any] = {
        "port": target.port,
        "known_hosts": _known_hosts(target),
        "preferred_auth": "publickey",
        "connect_timeout": CONNECT_TIMEOUT_S,
    }
    if target.user:
        options["username"] = target.user
    if target.key:
        options["client_keys"] = [os.path.expanduser(target.key)]
    if keepalive:
        options["keepalive_interval"] = KEEPALIVE_INTERVAL_S
        options["keepalive_count_max"] = KEEPALIVE_COUNT_MAX
    where = f"{target.host}:{target.port}"
    try:
        return await asyncssh.connect(target.host, **options)
    except asyncssh.HostKeyNotVerifiable as exc:
        known = target.known_hosts or "~/.ssh/known_hosts"
        raise SSHError(
            f"the host key of {where} is not trusted ({exc.reason}): add it to {known} "
            f"(ssh-keyscan -p {target.port} {target.host}), or accept unknown keys explicitly"
        ) from None
    except asyncssh.PermissionDenied as exc:
        raise SSHError(
            f"{where} refused our keys ({exc.reason}); necrod authenticates with a key or the agent only"
        ) from None
    except asyncssh.DisconnectError as exc:
        raise SSHError(f"{where} closed the SSH connection: {exc.reason}") from None
    except (TimeoutError, OSError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise SSHError(f"cannot reach {where}: {reason}") from None
    except (asyncssh.Error, ValueError) as exc:
        raise SSHError(f"SSH to {where} failed: {exc}") from None


async def open_daemon(conn: asyncssh.SSHClientConnection, target: SSHTarget
                      ) -> tuple[asyncssh.SSHReader[bytes], asyncssh.SSHWriter[bytes]]:  # fmt: skip
    """A byte stream to the remote daemon's socket."""
    import asyncssh

    try:
        return await conn.open_unix_connection(target.socket, encoding=None)
    except asyncssh.ChannelOpenError as exc:
        raise SSHError(f"no necrod answers at {target.socket} on {target.host} ({exc.reason})") from None


class SSHStream:
    """The remote daemon's socket as the few stream calls ``AsyncClient`` makes (anyio-shaped)."""

    def __init__(self, conn: asyncssh.SSHClientConnection, reader: asyncssh.SSHReader[bytes],
                 writer: asyncssh.SSHWriter[bytes], *, owns_connection: bool = True) -> None:  # fmt: skip
        self._conn, self._reader, self._writer = conn, reader, writer
        self._owns = owns_connection

    @classmethod
    async def open(cls, target: SSHTarget) -> SSHStream:
        conn = await connect(target, keepalive=False)
        try:
            reader, writer = await open_daemon(conn, target)
        except BaseException:
            conn.close()
            raise
        return cls(conn, reader, writer)

    async def send(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def receive(self, max_bytes: int = 65536) -> bytes:
        data = await self._reader.read(max_bytes)
        if not data:
            raise EOFError("the remote daemon closed the stream")
        return data

    async def aclose(self) -> None:
        self._writer.close()
        if self._owns:
            self._conn.close()
            await self._conn.wait_closed()


class SSHBridge:
    """For blocking clients: an SSH stream to the remote daemon, served on one end of a local
    socket pair by a thread running its own event loop. The caller talks to the other end as if
    it were the daemon's own socket."""

    def __init__(self, target: SSHTarget) -> None:
        import asyncio

        self.target = target
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._ready: asyncio.Future[None] | None = None

    def open(self, timeout: float = 60.0) -> socket.socket:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ready: dict[str, BaseException | None] = {}
        started = threading.Event()

        def run() -> None:
            import asyncio

            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self._serve(theirs, ready, started))
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=run, name="necrod-ssh-bridge", daemon=True)
        self._thread.start()
        if not started.wait(timeout):
            mine.close()
            raise SSHError(f"SSH to {self.target.host} did not answer within {timeout:g}s")
        error = ready.get("error")
        if error is not None:
            mine.close()
            raise error
        return mine

    async def _serve(self, sock: socket.socket, ready: dict[str, BaseException | None],
                     started: threading.Event) -> None:  # fmt: skip
        import asyncio

        import asyncssh

        try:
            stream = await SSHStream.open(self.target)
        except BaseException as exc:
            ready["error"] = exc
            sock.close()
            started.set()
            return
        started.set()
        sock.setblocking(False)
        local_reader, local_writer = await asyncio.open_unix_connection(sock=sock)

        async def up() -> None:
            try:
                while data := await local_reader.read(65536):
                    await stream.send(data)
            except (ConnectionError, asyncssh.Error):
                pass

        async def down() -> None:
            try:
                while True:
                    local_writer.write(await stream.receive())
                    await local_writer.drain()
            except (EOFError, ConnectionError, asyncssh.Error):
                pass

        tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            local_writer.close()
            await stream.aclose()


def expand(path: str | None) -> str | None:
    return str(Path(path).expanduser()) if path else None
