"""Python clients for necrod: ``Client`` (blocking) and ``AsyncClient`` (anyio), for runners and scripts.

Both have one method per RPC method and raise the ``necrod.proto.errors`` class of each error
kind (``NotFound``, ``ResourceExhausted``, ...), or ``DaemonUnreachable`` when nothing answers::

    with Client() as necrod:
        lease = necrod.allocate("my-project", holder="agent-7", ttl_s=600)
        ...
        necrod.release(lease["lease_id"])

The address defaults to ``$NECROD_HOST`` (``ssh://[user@]host[:port][/socket]``: the daemon of
another host, reached over SSH), then ``$NECROD_SOCKET``, then the per-user socket, then the
system one. ``ssh_options`` (``key``, ``known_hosts``, ``accept_unknown``) refine SSH addresses.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import struct
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeAlias, TypeVar

from necrod import PROTOCOL_VERSION, paths
from necrod.proto.errors import (
    DaemonUnreachable,
    Internal,
    NecrodError,
    PermissionDenied,
    ReplyTimeout,
    error_from_object,
)

if TYPE_CHECKING:
    from anyio.abc import SocketStream

    from necrod.io.ssh import SSHStream, SSHTarget

# anyio and the SSH module are imported where they are used, not here: a blocking client on a
# local socket (``necroctl status``) answers in less time than anyio alone takes to import.

__all__ = ["AsyncClient", "Client", "DaemonUnreachable", "NecrodError", "ReplyTimeout"]

R = TypeVar("R")

#: Replies can be large (slots.list of thousands of slots); this bounds a single line.
MAX_REPLY_BYTES = 256 << 20


Address: TypeAlias = "Path | SSHTarget"


def _address(where: str | os.PathLike[str] | None, ssh_options: dict[str, Any] | None) -> Address:
    if where is None:
        where = os.environ.get("NECROD_HOST") or None
    if where is None:
        return paths.client_socket_path()
    if str(where).startswith("ssh://"):
        from necrod.io.ssh import SSHTarget

        try:
            return SSHTarget.parse(str(where), **(ssh_options or {}))
        except ValueError as exc:
            raise DaemonUnreachable(str(exc)) from None
    return Path(where)


def check_shared_tmp_dir(path: Path) -> None:
    """A socket in ``/tmp/necrod-<uid>`` is used only if that directory is ours and private:
    in a shared ``/tmp`` another user may have planted it to answer in the daemon's place."""
    if path.parent == paths.shared_tmp_dir():
        problem = paths.private_dir_problem(path.parent)
        if problem is not None:
            raise PermissionDenied(f"refusing to use {path}: {problem}", socket=str(path))


def check_daemon_uid(sock: socket.socket, path: Path) -> None:
    """The daemon answering in ``/tmp/necrod-<uid>`` must run as our uid or root. (Elsewhere the
    socket's directory is not everybody's, and the system service runs as its own user.)"""
    if path.parent != paths.shared_tmp_dir():
        return
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", raw)
    if uid not in (0, os.getuid()):
        raise PermissionDenied(
            f"the daemon at {path} runs as uid {uid}, neither you (uid {os.getuid()}) nor root: refusing it",
            socket=str(path),
        )


def _describe(address: Address) -> str:
    return str(address) if isinstance(address, Path) else address.describe()


def _clean(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


class _Api(Generic[R]):
    """One method per RPC method; ``call`` is the transport's."""

    def call(self, method: str, params: dict[str, Any] | None = None) -> R:
        raise NotImplementedError

    def hello(self, client: str = "necrod.client") -> R:
        return self.call("hello", {"protocol": PROTOCOL_VERSION, "client": client})

    def status(self) -> R:
        return self.call("daemon.status")

    def reload(self) -> R:
        return self.call("daemon.reload")

    def pools(self) -> R:
        return self.call("pools.list")

    def pool(self, name: str) -> R:
        return self.call("pools.get", {"pool": name})

    def slots(self, pool: str | None = None, state: str | None = None) -> R:
        return self.call("slots.list", _clean({"pool": pool, "state": state}))

    def allocate(
        self,
        pool: str,
        *,
        holder: str | None = None,
        ttl_s: float | None = None,
        ref: str | None = None,
        branch: str | None = None,
        wait_s: float | None = None,
        metadata: dict[str, Any] | None = None,
        affinity: str | None = None,
        ports: int | None = None,
        sparse: list[str] | None = None,
        from_salvage: str | None = None,
    ) -> R:
        """A lease; ``sparse``: the directories its slot holds (``[]``: all; None: the pool's)."""
        return self.call(
            "slots.allocate",
            _clean(
                {
                    "pool": pool,
                    "holder": holder,
                    "ttl_s": ttl_s,
                    "ref": ref,
                    "branch": branch,
                    "wait_s": wait_s,
                    "metadata": metadata,
                    "affinity": affinity,
                    "ports": ports,
                    "sparse": sparse,
                    "from_salvage": from_salvage,
                }
            ),
        )

    def heartbeat(self, lease_id: str, ttl_s: float | None = None) -> R:
        return self.call("slots.heartbeat", _clean({"lease_id": lease_id, "ttl_s": ttl_s}))

    def release(self, lease_id: str, *, salvage: bool | None = None) -> R:
        return self.call("slots.release", _clean({"lease_id": lease_id, "salvage": salvage}))

    def add_slot(self, pool: str, *, wait_s: float | None = None) -> R:
        return self.call("slots.add", _clean({"pool": pool, "wait_s": wait_s}))

    def remove_slot(self, slot_id: str, *, force: bool = False) -> R:
        return self.call("slots.remove", {"slot_id": slot_id, "force": force})

    def salvage_list(self, pool: str | None = None) -> R:
        return self.call("salvage.list", _clean({"pool": pool}))

    def salvage_show(self, lease_id: str) -> R:
        return self.call("salvage.show", {"lease_id": lease_id})

    def salvage_diff(self, lease_id: str, *, binary: bool = False) -> R:
        return self.call("salvage.diff", _clean({"lease_id": lease_id, "binary": binary or None}))

    def salvage_branch(
        self, lease_id: str, branch: str, *, message: str | None = None, push: bool = False
    ) -> R:
        return self.call(
            "salvage.branch",
            _clean({"lease_id": lease_id, "branch": branch, "message": message, "push": push or None}),
        )

    def salvage_prune(self, pool: str | None = None, *, dry_run: bool = False) -> R:
        return self.call("salvage.prune", _clean({"pool": pool, "dry_run": dry_run or None}))

    def anomalies(self, pool: str | None = None, *, heal: bool = False, deep: bool = False) -> R:
        return self.call("anomalies.list", _clean({"pool": pool, "heal": heal, "deep": deep}))

    def recover(self, slot_id: str) -> R:
        return self.call("slots.recover", {"slot_id": slot_id})

    def isolate(self, slot_id: str, reason: str | None = None) -> R:
        return self.call("slots.isolate", _clean({"slot_id": slot_id, "reason": reason}))

    def metrics(self) -> R:
        return self.call("metrics.get")

    def submit(self, pool: str | None = None, **task: Any) -> R:
        """One task (``command=[...]`` or ``runner="profile"``, ``payload``, ``depends_on``, ...),
        or a batch with ``tasks=[{...}, ...]``."""
        return self.call("tasks.submit", _clean({"pool": pool, **task}))

    def task(self, task_id: str) -> R:
        return self.call("tasks.get", {"task_id": task_id})

    def tasks(self, *, state: str | None = None, pool: str | None = None, label: str | None = None,
              batch: str | None = None, graph: bool = False) -> R:  # fmt: skip
        return self.call("tasks.list", _clean({"state": state, "pool": pool, "label": label, "batch": batch,
                                               "graph": graph or None}))  # fmt: skip

    def cancel(self, task_id: str | None = None, *, batch: str | None = None, reason: str | None = None,
               force: bool | None = None) -> R:  # fmt: skip
        return self.call(
            "tasks.cancel", _clean({"task_id": task_id, "batch": batch, "reason": reason, "force": force})
        )

    def update(self, task_id: str, *, priority: int | None = None, labels: list[str] | None = None) -> R:
        """Change a waiting task's priority or labels."""
        return self.call("tasks.update", _clean({"task_id": task_id, "priority": priority, "labels": labels}))

    def runners(self) -> R:
        return self.call("runners.list")

    def pause(self, runner: str, reason: str | None = None) -> R:
        """Pause a runner profile: it starts nothing until resumed; its running tasks go on."""
        return self.call("runners.pause", _clean({"runner": runner, "reason": reason}))

    def resume(self, runner: str) -> R:
        return self.call("runners.resume", {"runner": runner})

    def refs(self, pool: str, pattern: str | None = None) -> R:
        """The branches and tags of a pool's origin, with their commits."""
        return self.call("pools.refs", _clean({"pool": pool, "pattern": pattern}))

    def retry(self, task_id: str | None = None, *, batch: str | None = None) -> R:
        return self.call("tasks.retry", _clean({"task_id": task_id, "batch": batch}))

    def hosts(self) -> R:
        return self.call("hosts.list")

    def logs(
        self, task_id: str, *, attempt: int | None = None, offset: int = 0, limit: int | None = None
    ) -> R:
        return self.call("tasks.logs", _clean({"task_id": task_id, "attempt": attempt, "offset": offset,
                                               "limit": limit}))  # fmt: skip


def _request_line(request_id: int, method: str, params: dict[str, Any]) -> bytes:
    # The standard library's encoder, not orjson: the request is small, and a blocking client
    # starts in the time orjson's import would take. NaN and Infinity are not JSON: refused here.
    request = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
    return json.dumps(request, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def _decode_reply(line: bytes) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except ValueError as exc:
        raise Internal(f"the daemon sent something that is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise Internal("the daemon sent a reply that is not an object")
    return message


def _result(message: dict[str, Any]) -> Any:
    if "error" in message:
        raise error_from_object(message["error"])
    return message.get("result")


class Client(_Api[Any]):
    """A blocking client on one connection. Not thread-safe: one per thread."""

    def __init__(self, address: str | os.PathLike[str] | None = None, *, timeout: float | None = 60.0,
                 ssh_options: dict[str, Any] | None = None) -> None:  # fmt: skip
        self.address = _address(address, ssh_options)
        self.path = _describe(self.address)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._ids = itertools.count(1)
        #: Notifications that arrived while waiting for a reply (``events()`` reads them first).
        self.notifications: deque[dict[str, Any]] = deque()

    def connect(self) -> None:
        if self._sock is not None:
            return
        if not isinstance(self.address, Path):
            from necrod.io.ssh import SSHBridge, SSHError

            try:
                self._sock = SSHBridge(self.address).open()
            except SSHError as exc:
                raise DaemonUnreachable(str(exc), host=self.path) from None
            return
        check_shared_tmp_dir(self.address)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(os.fspath(self.address))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise DaemonUnreachable(
                f"no necrod answers at {self.path} ({exc.strerror})", socket=str(self.path)
            ) from None
        except OSError as exc:
            sock.close()
            raise DaemonUnreachable(
                f"cannot connect to {self.path}: {exc.strerror or exc}", socket=str(self.path)
            ) from None
        try:
            check_daemon_uid(sock, self.address)
        except PermissionDenied:
            sock.close()
            raise
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_message(self, timeout: float | None) -> dict[str, Any]:
        assert self._sock is not None
        self._sock.settimeout(timeout)
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                return _decode_reply(line)
            if len(self._buf) > MAX_REPLY_BYTES:
                raise Internal("reply line too long")
            try:
                chunk = self._sock.recv(1 << 16)
            except TimeoutError:
                raise
            except OSError as exc:
                self.close()
                raise DaemonUnreachable(f"connection to {self.path} lost ({exc})") from None
            if not chunk:
                self.close()
                raise DaemonUnreachable(f"the daemon at {self.path} closed the connection")
            self._buf += chunk

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        self.connect()
        assert self._sock is not None
        request_id = next(self._ids)
        try:
            self._sock.sendall(_request_line(request_id, method, params or {}))
        except OSError as exc:
            self.close()
            raise DaemonUnreachable(f"connection to {self.path} lost ({exc})") from None
        while True:
            try:
                message = self._read_message(self.timeout)
            except TimeoutError:
                self.close()
                raise ReplyTimeout(f"no reply from {self.path} within {self.timeout:g}s") from None
            if "id" not in message:
                self.notifications.append(message)
                continue
            if message.get("id") not in (request_id, None):
                continue
            return _result(message)

    def subscribe(
        self, topics: list[str] | None = None, *, since: int | None = None, snapshot: bool | None = None
    ) -> Any:
        return self.call("events.subscribe", _clean({"topics": topics, "since": since, "snapshot": snapshot}))

    def events(self, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Event notifications after ``subscribe``; stops when ``timeout`` passes with none."""
        while True:
            while self.notifications:
                note = self.notifications.popleft()
                if note.get("method") == "event":
                    yield note.get("params", {})
            try:
                message = self._read_message(timeout)
            except TimeoutError:
                return
            if "id" not in message:
                self.notifications.append(message)


class AsyncClient(_Api[Awaitable[Any]]):
    """An anyio client on one connection; concurrent calls are serialized."""

    def __init__(self, address: str | os.PathLike[str] | None = None, *, timeout: float | None = 60.0,
                 ssh_options: dict[str, Any] | None = None) -> None:  # fmt: skip
        self.address = _address(address, ssh_options)
        self.path = _describe(self.address)
        self.timeout = timeout
        self._stream: SocketStream | SSHStream | None = None
        self._buf = bytearray()
        self._ids = itertools.count(1)
        import anyio

        self._lock = anyio.Lock()
        self.notifications: deque[dict[str, Any]] = deque()

    @classmethod
    def over(cls, stream: SSHStream, label: str, *, timeout: float | None = 60.0) -> AsyncClient:
        """A client on a stream opened elsewhere (the fleet reuses one SSH connection per host)."""
        client = cls(Path(label), timeout=timeout)
        client._stream = stream
        return client

    async def connect(self) -> None:
        import anyio.abc

        if self._stream is not None:
            return
        if not isinstance(self.address, Path):
            from necrod.io.ssh import SSHError, SSHStream

            try:
                self._stream = await SSHStream.open(self.address)
            except SSHError as exc:
                raise DaemonUnreachable(str(exc), host=self.path) from None
            return
        check_shared_tmp_dir(self.address)
        try:
            stream = await anyio.connect_unix(self.address)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonUnreachable(
                f"no necrod answers at {self.path} ({exc.strerror})", socket=str(self.path)
            ) from None
        except OSError as exc:
            raise DaemonUnreachable(
                f"cannot connect to {self.path}: {exc.strerror or exc}", socket=str(self.path)
            ) from None
        try:
            check_daemon_uid(stream.extra(anyio.abc.SocketAttribute.raw_socket), self.address)
        except PermissionDenied:
            await stream.aclose()
            raise
        self._stream = stream

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
            self._stream = None

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _read_message(self) -> dict[str, Any]:
        import anyio

        assert self._stream is not None
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                return _decode_reply(line)
            try:
                chunk = await self._stream.receive(1 << 16)
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError, EOFError):
                await self.aclose()
                raise DaemonUnreachable(f"the daemon at {self.path} closed the connection") from None
            self._buf += chunk

    async def _call(self, method: str, params: dict[str, Any] | None) -> Any:
        import anyio

        await self.connect()
        assert self._stream is not None
        async with self._lock:
            request_id = next(self._ids)
            try:
                await self._stream.send(_request_line(request_id, method, params or {}))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                await self.aclose()
                raise DaemonUnreachable(f"connection to {self.path} lost") from None
            while True:
                if self.timeout is None:
                    message = await self._read_message()
                else:
                    try:
                        with anyio.fail_after(self.timeout):
                            message = await self._read_message()
                    except TimeoutError:
                        await self.aclose()
                        raise ReplyTimeout(f"no reply from {self.path} within {self.timeout:g}s") from None
                if "id" not in message:
                    self.notifications.append(message)
                    continue
                if message.get("id") not in (request_id, None):
                    continue
                return _result(message)

    def call(self, method: str, params: dict[str, Any] | None = None) -> Awaitable[Any]:
        return self._call(method, params)

    def subscribe(
        self, topics: list[str] | None = None, *, since: int | None = None, snapshot: bool | None = None
    ) -> Awaitable[Any]:
        return self._call(
            "events.subscribe", _clean({"topics": topics, "since": since, "snapshot": snapshot})
        )

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Event notifications after ``subscribe``, forever (until the connection closes)."""
        while True:
            while self.notifications:
                note = self.notifications.popleft()
                if note.get("method") == "event":
                    yield note.get("params", {})
            async with self._lock:
                message = await self._read_message()
            if "id" not in message:
                self.notifications.append(message)
