"""The pool engine's background work: one task group, and at most one driver task per slot.

``kick(slot)`` starts the slot's driver unless one runs already; what the driver does follows
from the slot's state (``lifecycle``), so kicking twice is harmless and a slot caught mid-way
by a restart is simply kicked again. Nothing starts once the table says the daemon is stopping.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from anyio.abc import TaskGroup

from necrod.core.slots import Slot
from necrod.daemon.slottable import SlotTable

Driver = Callable[[Slot], Awaitable[None]]


class Jobs:
    def __init__(self, table: SlotTable) -> None:
        self.table = table
        self._tg: TaskGroup | None = None
        self._drive: Driver | None = None
        #: Slots with a driver task running.
        self._active: set[str] = set()
        #: Coalesced work under way, by key: what to run once more when it ends (None: nothing).
        self._again: dict[str, tuple[Callable[..., Awaitable[Any]], tuple[Any, ...]] | None] = {}

    def start(self, tg: TaskGroup, drive: Driver) -> None:
        """Run background work in ``tg`` from now on, slots driven by ``drive``."""
        self._tg = tg
        self._drive = drive

    @property
    def running(self) -> bool:
        return self._tg is not None

    def spawn(self, func: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start background work, free of the request context it may be started from."""
        assert self._tg is not None

        async def run() -> None:
            structlog.contextvars.clear_contextvars()
            await func(*args)

        self._tg.start_soon(run)

    def coalesce(self, key: str, func: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start ``func(*args)`` unless work under ``key`` is under way; it then runs once more
        when that ends (with the last arguments asked for), however many asked meanwhile: a
        burst of cleanups tidies its pool a few times, not once per slot."""
        if key in self._again:
            self._again[key] = (func, args)
            return
        self._again[key] = None
        self.spawn(self._coalesced, key, func, args)

    async def _coalesced(self, key: str, func: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
        try:
            while True:
                await func(*args)
                again = self._again[key]
                if again is None:
                    return
                self._again[key] = None
                func, args = again
        finally:
            del self._again[key]

    def kick(self, slot: Slot) -> None:
        if self._tg is None or self.table.stopping or slot.slot_id in self._active:
            return
        self._active.add(slot.slot_id)
        self.spawn(self._run_driver, slot)

    async def _run_driver(self, slot: Slot) -> None:
        assert self._drive is not None
        try:
            await self._drive(slot)
        finally:
            self._active.discard(slot.slot_id)
