"""A lean asyncio JSON-RPC client for timing: one connection, one request at a time.

The bench and the daemon share two cores, so the client must cost as little as possible: this
one is a raw ``asyncio`` stream with orjson (the daemon's own codec: a 3 MB ``tasks.list``
reply costs the client 30 ms with ``json``, a few with orjson) and nothing else
(``necrod.client.AsyncClient`` adds anyio locks and timeouts per call). ``Watch`` reads event
notifications on its own connection and stamps each with the time it arrived.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson

LIMIT = 256 << 20


class RpcError(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message"))
        self.error = error
        self.kind = (error.get("data") or {}).get("kind")


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.next_id = 0
        self.notes: list[dict[str, Any]] = []

    @classmethod
    async def open(cls, path: str) -> Conn:
        reader, writer = await asyncio.open_unix_connection(path, limit=LIMIT)
        return cls(reader, writer)

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        self.next_id += 1
        request = {"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params or {}}
        self.writer.write(orjson.dumps(request, option=orjson.OPT_APPEND_NEWLINE))
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("necrod closed the connection")
            message = orjson.loads(line)
            if "id" not in message:
                self.notes.append(message)
                continue
            if "error" in message:
                raise RpcError(message["error"])
            return message["result"]

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


async def open_many(path: str, count: int) -> list[Conn]:
    return [await Conn.open(path) for _ in range(count)]


async def close_all(conns: list[Conn]) -> None:
    for conn in conns:
        await conn.close()


class Watch:
    """Event notifications on a connection of their own, each stamped with ``perf_counter()``."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.seen: list[tuple[float, dict[str, Any]]] = []
        #: The event the last ``wait`` returned.
        self.last: dict[str, Any] = {}
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, path: str, topics: list[str]) -> Watch:
        watch = cls(await Conn.open(path))
        await watch.conn.call("events.subscribe", {"topics": topics, "snapshot": False})
        watch._task = asyncio.create_task(watch._read())
        return watch

    async def _read(self) -> None:
        while True:
            line = await self.conn.reader.readline()
            if not line:
                return
            at = time.perf_counter()
            message = orjson.loads(line)
            if message.get("method") == "event":
                self.seen.append((at, message["params"]))
                self._changed.set()

    async def wait(self, match: Callable[[dict[str, Any]], bool], timeout: float = 300.0) -> float:
        """The arrival time of the first event, not seen before, that ``match`` accepts."""
        async with asyncio.timeout(timeout):
            while True:
                for i, (at, event) in enumerate(self.seen):
                    if match(event):
                        del self.seen[: i + 1]
                        self.last = event
                        return at
                self._changed.clear()
                await self._changed.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.conn.close()
