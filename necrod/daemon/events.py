"""Fan-out of committed events to subscribers, each with a bounded queue.

Events reach the bus only after the transaction that recorded them committed, in ``seq``
order. A subscriber that falls ``limit`` events behind gets one ``overflow`` event and is
closed: never a silent drop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import anyio

from necrod.io.store import Event

DEFAULT_LIMIT = 10_000


def _lease_shown(entry: Mapping[str, Any], viewer: int) -> bool:
    return viewer in (entry.get("owner_uid"), entry.get("runner_uid"))


def as_seen_by(event: Event, viewer: int | None) -> dict[str, Any]:
    """The event as a subscriber sees it: a non-admin ``viewer`` (uid) does not see the ids of
    live leases it may not act on (in ``lease.*`` events and in a tamper report). Events
    recorded before leases had owners carry none, and are shown without their lease ids."""
    out = event.to_dict()
    if viewer is None:
        return out
    if event.topic == "leases" and "lease_id" in out and not _lease_shown(out, viewer):
        out["lease_id"] = None
    if event.type == "tamper" and isinstance(out.get("leases"), list):
        out["leases"] = [
            {**held, "lease_id": None} if isinstance(held, dict) and not _lease_shown(held, viewer) else held
            for held in out["leases"]
        ]
    return out


class Subscription:
    def __init__(self, topics: frozenset[str] | None, limit: int) -> None:
        self.topics = topics
        self.limit = limit
        self.queue: deque[Event] = deque()
        self.overflowed = False
        self.closed = False
        self._wake = anyio.Event()

    def wants(self, event: Event) -> bool:
        return self.topics is None or event.topic in self.topics

    def offer(self, event: Event) -> None:
        if self.closed or self.overflowed or not self.wants(event):
            return
        if len(self.queue) >= self.limit:
            self.overflowed = True
        else:
            self.queue.append(event)
        self._wake.set()

    async def next_batch(self) -> list[Event]:
        """Events queued so far (waiting for at least one); empty once closed or overflowed."""
        while not self.queue and not self.overflowed and not self.closed:
            await self._wake.wait()
            self._wake = anyio.Event()
        batch = list(self.queue)
        self.queue.clear()
        return batch

    def close(self) -> None:
        self.closed = True
        self._wake.set()


class EventBus:
    def __init__(self) -> None:
        self._subs: set[Subscription] = set()
        self.published = 0

    def publish(self, events: Iterable[Event]) -> None:
        for event in events:
            self.published += 1
            for sub in self._subs:
                sub.offer(event)

    def subscribe(self, topics: Iterable[str] | None = None, limit: int = DEFAULT_LIMIT) -> Subscription:
        sub = Subscription(frozenset(topics) if topics is not None else None, limit)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        sub.close()
        self._subs.discard(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subs)
