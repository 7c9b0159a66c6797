"""Calls about one lease that outlive a daemon restart, for ``necroctl run``.

necrod keeps every lease across a restart (with a fresh TTL of grace), so a broken connection
does not mean a lost lease: the call is retried on a new connection, with backoff, for a bounded
time. ``not_found`` and ``failed_precondition`` do mean it: the lease was released, expired or
revoked, and ``LeaseLost`` says why.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from necrod.client import AsyncClient
from necrod.proto.errors import DaemonUnreachable, FailedPrecondition, NotFound, Unavailable

FIRST_RETRY_S = 0.05


class LeaseLost(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Reconnecting:
    """One connection at a time to the daemon at ``socket``, opened again when it breaks.

    ``unavailable`` (a daemon that is stopping, or could not save) is retried like a broken
    connection. After ``reconnect_for`` seconds without an answer, the last ``DaemonUnreachable``
    is raised. ``say`` reports the outage and the recovery, once each.
    """

    def __init__(self, socket: Path, *, timeout: float, reconnect_for: float, backoff_cap: float,
                 say: Callable[[str], None]) -> None:  # fmt: skip
        self.socket = socket
        self.timeout = timeout
        self.reconnect_for = reconnect_for
        self.backoff_cap = max(backoff_cap, FIRST_RETRY_S)
        self.say = say
        self._client: AsyncClient | None = None

    async def call(self, method: str, params: dict[str, Any]) -> Any:
        delay, deadline = FIRST_RETRY_S, None
        while True:
            try:
                if self._client is None:
                    self._client = AsyncClient(self.socket, timeout=self.timeout)
                result = await self._client.call(method, params)
            except (NotFound, FailedPrecondition) as exc:
                raise LeaseLost(exc.message) from None
            except (DaemonUnreachable, Unavailable) as exc:
                # A fresh client: the old one may hold half a line from the dead connection.
                await self.aclose()
                now = anyio.current_time()
                if deadline is None:
                    deadline = now + self.reconnect_for
                    self.say(f"{exc.message}; retrying for up to {self.reconnect_for:g}s")
                if now >= deadline:
                    raise DaemonUnreachable(
                        f"no answer from necrod at {self.socket} for {self.reconnect_for:g}s "
                        f"(last: {exc.message})"
                    ) from None
                await anyio.sleep(min(delay, deadline - now))
                delay = min(delay * 2, self.backoff_cap)
                continue
            if deadline is not None:
                self.say(f"necrod at {self.socket} answers again")
            return result

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            with anyio.CancelScope(shield=True):
                await client.aclose()
