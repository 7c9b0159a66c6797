"""Fan-out of committed events to subscribers, each with a bounded queue, and the replay of
the history to a subscriber that resumes.

Events reach the bus only after the transaction that recorded them committed, in ``seq``
order. A subscriber that falls ``limit`` events behind gets one ``overflow`` event and is
closed: never a silent drop.

Every subscription costs an ``offer`` per event on the loop, so a connection holds at most
``MAX_SUBSCRIPTIONS_PER_CONNECTION`` and a uid that is not an admin at most
``MAX_SUBSCRIPTIONS_PER_UID``, all its connections together. A replay (``since``) reads the
history in pages of ``REPLAY_PAGE_EVENTS`` in a worker thread, and reads the next page only
once the previous one was handed to the connection: a subscriber that does not read holds one
page, not the history. A few replays run at once per uid (per connection for an admin); the
others wait their turn, their live events queued meanwhile as for any subscriber.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping
from typing import Any

import anyio
import anyio.lowlevel

from necrod.io.store import Event, EventReader, StateStore
from necrod.proto.errors import ResourceExhausted

DEFAULT_LIMIT = 10_000
#: A watcher needs a subscription or two; thousands on one connection only cost every event
#: an ``offer`` each, on the loop (100,000 of them made an allocation 50 times slower).
MAX_SUBSCRIPTIONS_PER_CONNECTION = 16
#: The same for a uid that is not an admin, over all its connections (which may be 256).
MAX_SUBSCRIPTIONS_PER_UID = 64
#: Events a replay reads and holds at once: about a megabyte, and a few milliseconds of the
#: loop's time to write out.
REPLAY_PAGE_EVENTS = 1_000
#: Replays that read and write at once per uid (per connection for an admin); more wait. Each
#: holds a page while its client is slow to read, until ``write_timeout_s`` closes it.
REPLAYS_AT_ONCE = 2
#: Worker threads reading replay pages, all replays together: the rest of the daemon keeps the
#: default pool, and the loop competes for the GIL with few threads parsing JSON.
REPLAY_THREADS = 2
#: Between two checkpoints while a page is written out to a client that keeps up.
_EVENTS_PER_TURN = 100


def _lease_shown(entry: Mapping[str, Any], viewer: int) -> bool:
    """As ``Lease.shown_to``: the owner only, never the runner uid a profile's tasks share."""
    return viewer == entry.get("owner_uid")


def as_seen_by(event: Event, viewer: int | None) -> dict[str, Any]:
    """The event as a subscriber sees it: a non-admin ``viewer`` (uid) does not see the ids of
    live leases it does not own (in ``lease.*`` events and in a tamper report). Events
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
    def __init__(
        self, topics: frozenset[str] | None, limit: int, connection: Hashable = None, uid: int | None = None
    ) -> None:
        self.topics = topics
        self.limit = limit
        #: Whose it is, for the caps: a connection, and a uid held to the per-uid cap (or None).
        self.connection = connection
        self.uid = uid
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
        self._by_connection: Counter[Hashable] = Counter()
        self._by_uid: Counter[int] = Counter()
        #: Replay turns by key (a uid, or an admin's connection): the semaphore and its users.
        self._turns: dict[Hashable, tuple[anyio.Semaphore, list[int]]] = {}
        self._threads: anyio.CapacityLimiter | None = None
        self.published = 0

    def publish(self, events: Iterable[Event]) -> None:
        for event in events:
            self.published += 1
            for sub in self._subs:
                sub.offer(event)

    def subscribe(
        self,
        topics: Iterable[str] | None = None,
        limit: int = DEFAULT_LIMIT,
        *,
        connection: Hashable = None,
        uid: int | None = None,
    ) -> Subscription:
        """A new subscription of ``connection`` (held to ``MAX_SUBSCRIPTIONS_PER_CONNECTION``)
        for ``uid`` (held to ``MAX_SUBSCRIPTIONS_PER_UID``; None for an admin); past either cap,
        ``ResourceExhausted``."""
        if connection is not None and self._by_connection[connection] >= MAX_SUBSCRIPTIONS_PER_CONNECTION:
            raise ResourceExhausted(
                f"this connection already holds {MAX_SUBSCRIPTIONS_PER_CONNECTION} subscriptions, "
                "the most one connection may; subscribe to several topics at once, or close the "
                "connection to free them",
                limit=MAX_SUBSCRIPTIONS_PER_CONNECTION,
            )
        if uid is not None and self._by_uid[uid] >= MAX_SUBSCRIPTIONS_PER_UID:
            raise ResourceExhausted(
                f"uid {uid} already holds {MAX_SUBSCRIPTIONS_PER_UID} subscriptions on its "
                "connections, the most one uid may; close some to free them",
                limit=MAX_SUBSCRIPTIONS_PER_UID,
            )
        sub = Subscription(frozenset(topics) if topics is not None else None, limit, connection, uid)
        self._subs.add(sub)
        if connection is not None:
            self._by_connection[connection] += 1
        if uid is not None:
            self._by_uid[uid] += 1
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        sub.close()
        if sub not in self._subs:
            return
        self._subs.discard(sub)
        if sub.connection is not None:
            self._by_connection[sub.connection] -= 1
            if self._by_connection[sub.connection] <= 0:
                del self._by_connection[sub.connection]
        if sub.uid is not None:
            self._by_uid[sub.uid] -= 1
            if self._by_uid[sub.uid] <= 0:
                del self._by_uid[sub.uid]

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    async def replay(
        self,
        store: StateStore,
        sub: Subscription,
        *,
        turn: Hashable,
        since: int,
        until: int,
        viewer: int | None,
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> bool:
        """Send ``sub`` the kept events after ``since`` up to ``until`` (as ``viewer`` sees
        them), in ``seq`` order, a page at a time, once ``turn`` (a uid, or an admin's
        connection) has a free replay. False when it could not be whole: the subscription
        overflowed or closed meanwhile, or the history was pruned past where the replay had got
        to (a slow replay near the end of ``daemon.event_history``).

        Resource handling: one page is held at a time; the next is read (in a worker thread, on
        the reader's own connection) only once ``send`` has taken every event of this one."""
        if since >= until:
            return True
        if self._threads is None:
            self._threads = anyio.CapacityLimiter(REPLAY_THREADS)
        threads = self._threads
        semaphore, users = self._turns.setdefault(turn, (anyio.Semaphore(REPLAYS_AT_ONCE), [0]))
        users[0] += 1
        reader = store.reader()
        try:
            async with semaphore:
                cursor = since
                while cursor < until:
                    if sub.overflowed or sub.closed:
                        return False
                    first, page, cursor = await anyio.to_thread.run_sync(
                        _read_page, reader, cursor, until, sub.topics, viewer, limiter=threads
                    )
                    if first is None:
                        return False
                    for i, event in enumerate(page, 1):
                        await send(event)
                        if i % _EVENTS_PER_TURN == 0:
                            await anyio.lowlevel.checkpoint()
                return True
        finally:
            reader.close()
            users[0] -= 1
            if not users[0]:
                del self._turns[turn]


def _read_page(
    reader: EventReader, cursor: int, until: int, topics: frozenset[str] | None, viewer: int | None
) -> tuple[int | None, list[dict[str, Any]], int]:
    """One page after ``cursor`` (worker thread): (None, [], cursor) when events after
    ``cursor`` were pruned, else (the oldest kept seq, the events as ``viewer`` sees them,
    the seq the next page starts after)."""
    first, events = reader.page(cursor, until=until, topics=topics, limit=REPLAY_PAGE_EVENTS)
    if first > cursor + 1:
        return None, [], cursor
    after = events[-1].seq if len(events) == REPLAY_PAGE_EVENTS else until
    return first, [as_seen_by(event, viewer) for event in events], after
