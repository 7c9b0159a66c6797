"""Connections to the daemon for one MCP session: one per call in flight.

``AsyncClient`` answers one call at a time on its connection, and an agent's calls overlap: a
``workspace_allocate`` that waits for a free slot must not hold back the heartbeats that keep the
session's other leases alive. So each call takes an idle connection or opens one (up to
``MAX_CONNECTIONS``), and puts it back when the daemon answered.

Error handling: the daemon's errors come back as the ``necrod.proto.errors`` class of their kind;
no answer within the call's time is ``ReplyTimeout``, no daemon ``DaemonUnreachable``. A
connection that timed out or broke is closed, never reused (a late reply would answer the next
call).
"""

from __future__ import annotations

from typing import Any

import anyio

from necrod.client import AsyncClient
from necrod.proto.errors import DaemonUnreachable, NecrodError, ReplyTimeout

#: Connections to the daemon at once, per session; more calls wait for one.
MAX_CONNECTIONS = 8


class Daemon:
    """The daemon, as one session reaches it (``where`` and ``ssh_options`` as ``AsyncClient``)."""

    def __init__(self, where: str | None, ssh_options: dict[str, Any], *, timeout: float) -> None:
        self.where = where
        self.ssh_options = ssh_options
        #: Seconds a call may take beyond any wait it asks the daemon for.
        self.timeout = timeout
        self._idle: list[AsyncClient] = []
        self._slots = anyio.Semaphore(MAX_CONNECTIONS)

    async def call(self, method: str, params: dict[str, Any], *, wait_s: float = 0.0) -> Any:
        async with self._slots:
            client = self._idle.pop() if self._idle else AsyncClient(self.where, timeout=None,
                                                                     ssh_options=self.ssh_options)  # fmt: skip
            reusable = False
            try:
                with anyio.fail_after(self.timeout + wait_s):
                    result = await client.call(method, params)
                reusable = True
                return result
            except TimeoutError:
                raise ReplyTimeout(
                    f"no reply from {client.path} within {self.timeout + wait_s:g}s (the call may still complete)"
                ) from None
            except DaemonUnreachable:
                raise
            except NecrodError:
                reusable = True
                raise
            finally:
                if reusable:
                    self._idle.append(client)
                else:
                    with anyio.CancelScope(shield=True):
                        await client.aclose()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for client in idle:
            await client.aclose()
