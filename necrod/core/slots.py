"""Slots and leases: the records, their states, and the choice of a slot to hand out.

States::

    creating ──► available ──► allocated ──► cleaning ──► available
                     │                           │
                     └──► removing               └──► error (quarantined, kept for inspection)

Only ``available`` slots are handed out. A slot's ``fencing_token`` only grows: it is bumped
when a lease is granted and again when one expires or is revoked, so a stale holder's token is
always lower than the current one.
"""

from __future__ import annotations

import operator
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any


class SlotState(StrEnum):
    CREATING = "creating"
    AVAILABLE = "available"
    ALLOCATED = "allocated"
    CLEANING = "cleaning"
    ERROR = "error"
    REMOVING = "removing"


def new_lease_id() -> str:
    return "l-" + secrets.token_hex(8)


@dataclass(slots=True)
class Lease:
    lease_id: str
    holder: str | None
    metadata: dict[str, Any]
    ttl_s: float
    granted_at: float
    #: Wall-clock expiry, for people and clients; the daemon times leases with ``deadline``.
    expires_at: float
    fencing_token: int
    start_commit: str | None
    branch: str | None = None
    task_id: str | None = None
    #: The uid that took the lease (SO_PEERCRED; a task's submitter for a dispatched task).
    #: None on leases recorded before owners were: only an admin may act on those.
    uid: int | None = None
    #: A dispatched task's runner uid (a container's or pod's ``user``), which heartbeats from
    #: inside the slot as someone else than the submitter.
    runner_uid: int | None = None
    #: The caller's affinity key: the slot remembers it when released, and the next
    #: allocation with the same key prefers it (warm build caches).
    affinity: str | None = None
    #: TCP ports the lease holds (``ports:``), consecutive; given back with the lease.
    ports: list[int] = field(default_factory=list)
    #: The directories its slot was handed out holding (``sparse``; ``[]``: all of it).
    sparse: list[str] | None = None
    #: The lost lease whose salvage this one started from (``from_salvage``, ``resume: salvage``).
    resumed_from: str | None = None
    #: Monotonic deadline; not persisted (after a restart every lease gets a fresh ttl_s).
    deadline: float = 0.0

    def held_by(self, uid: int) -> bool:
        """Whether ``uid`` may act on the lease without being an admin (knowing its id)."""
        return uid in (self.uid, self.runner_uid)

    def shown_to(self, uid: int) -> bool:
        """Whether ``uid``, not an admin, is shown the lease's id: its owner only. A contained
        runner's uid is every task's of its profile, whoever submitted them: its runner has its
        own lease's id (``NECROD_LEASE_ID``), and the others' are not to be learnt."""
        return uid == self.uid

    def to_row(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _LEASE_PERSISTED}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Lease:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in known})

    def renew(self, now_mono: float, now_wall: float, ttl_s: float | None = None) -> None:
        if ttl_s is not None:
            self.ttl_s = ttl_s
        self.deadline = now_mono + self.ttl_s
        self.expires_at = now_wall + self.ttl_s


#: What a lease's row holds: every field but its monotonic deadline (computed once, not per row).
_LEASE_PERSISTED = tuple(f.name for f in fields(Lease) if f.name != "deadline")
_LEASE_FIELDS = operator.attrgetter(*(f.name for f in fields(Lease)))

_PERSISTED = (
    "slot_id",
    "pool",
    "number",
    "path",
    "admin",
    "state",
    "commit",
    "branch",
    "fencing_token",
    "error",
    "cleanup_failures",
    "allocations",
    "created_at",
    "last_released_at",
    "salvage_as",
    "salvage_commit",
    "salvage_note",
    "salvage_uid",
    "retire",
    "disk_bytes",
    "kind",
    "layers",
    "prepared",
    "affinity",
    "held_s",
)


@dataclass(slots=True)
class Slot:
    slot_id: str
    pool: str
    number: int
    path: str
    #: Name of the worktree's admin directory under ``mirror.git/worktrees/`` (and of the slot's pin).
    admin: str
    state: SlotState
    #: ``worktree``, ``shared-clone`` or ``overlay`` (``slotkinds``): what is on disk, which may lag the pool's
    #: ``isolation`` after a reload until the slot is rebuilt.
    kind: str = "worktree"
    commit: str | None = None
    branch: str | None = None
    fencing_token: int = 0
    lease: Lease | None = None
    error: str | None = None
    cleanup_failures: int = 0
    allocations: int = 0
    created_at: float = 0.0
    last_released_at: float = 0.0
    #: Lease id whose leftover work the next cleanup must salvage (kept across a restart).
    salvage_as: str | None = None
    #: Commit the slot's last lease started from (to tell agent commits from the base).
    salvage_commit: str | None = None
    #: Who held the lease being salvaged, for the salvage commit's message.
    salvage_note: str | None = None
    #: The uid that owned it: the salvage is theirs to list and read (``Necrod-Uid`` trailer).
    salvage_uid: int | None = None
    #: Remove the slot instead of making it available when it comes back.
    retire: bool = False
    #: Rebuild the worktree (remove and add) instead of resetting it in place.
    rebuild: bool = False
    #: Quarantine the slot, untouched, when its lease ends (an operator isolated it).
    isolate: str | None = None
    disk_bytes: int | None = None
    #: An ``overlay`` slot's read-only layers, topmost first (``daemon/layers``); () otherwise.
    layers: tuple[str, ...] = ()
    #: The prepare key whose output a ``worktree`` or ``shared-clone`` slot holds (None: none).
    prepared: str | None = None
    #: The affinity key of the lease it was last released from (``slots.allocate`` ``affinity``).
    affinity: str | None = None
    #: Seconds it was held by leases that have ended, all together.
    held_s: float = 0.0
    # In memory only:
    version: int = 0
    #: A git process of ours is working in this slot right now.
    busy: bool = False
    #: Handed to a waiting allocation that has not yet taken it.
    reserved: bool = False
    #: Monotonic time the slot was last known clean (cleaned, created, or checked).
    verified_at: float = 0.0

    def to_row(self) -> dict[str, Any]:
        row = {name: getattr(self, name) for name in _PERSISTED}
        row["state"] = str(self.state)
        row["lease"] = self.lease.to_row() if self.lease else None
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Slot:
        values = {k: row[k] for k in _PERSISTED if k in row}
        values["state"] = SlotState(row["state"])
        values["layers"] = tuple(row.get("layers") or ())
        slot = cls(**values)
        if row.get("lease"):
            slot.lease = Lease.from_row(row["lease"])
        return slot

    def snapshot(self) -> Slot:
        """A copy to restore when the change made after it fails to become durable. Shallow is
        enough: every field but the lease is immutable, and a lease's fields are replaced, never
        changed in place."""
        # Built from its fields in order (copy.copy of a slots class goes through __reduce_ex__:
        # 5x slower, and this runs at every grant).
        snap = Slot(*_SLOT_FIELDS(self))
        if self.lease is not None:
            snap.lease = Lease(*_LEASE_FIELDS(self.lease))
        return snap

    def restore(self, snap: Slot, version: int) -> bool:
        """Undo to ``snap`` if nothing changed the slot since the change at ``version``."""
        if self.version != version:
            return False
        for f in fields(self):
            if f.name not in ("version", "busy", "reserved"):
                setattr(self, f.name, getattr(snap, f.name))
        self.version += 1
        return True

    def view(self, viewer: int | None = None, now: float | None = None) -> dict[str, Any]:
        """What clients see of a slot. ``viewer`` is the uid of a non-admin peer: the lease id
        is shown only to its owner (None: an admin, who sees them all). ``now``
        (wall time) counts the current lease into the time held."""
        lease = self.lease
        held = self.held_s + (
            max(0.0, now - lease.granted_at) if lease is not None and now is not None else 0.0
        )
        shown = lease is not None and (viewer is None or lease.shown_to(viewer))
        return {
            "slot_id": self.slot_id,
            "pool": self.pool,
            "state": str(self.state),
            "path": self.path,
            "commit": self.commit,
            "branch": self.branch,
            "fencing_token": self.fencing_token,
            "lease_id": lease.lease_id if lease and shown else None,
            "holder": lease.holder if lease else None,
            "owner_uid": lease.uid if lease else None,
            "expires_at": lease.expires_at if lease else None,
            "granted_at": lease.granted_at if lease else None,
            "task_id": lease.task_id if lease else None,
            "ports": list(lease.ports) if lease else [],
            "sparse": lease.sparse if lease else None,
            "error": self.error,
            "allocations": self.allocations,
            "last_released_at": self.last_released_at or None,
            "disk_bytes": self.disk_bytes,
            "kind": self.kind,
            "layers": list(self.layers),
            "prepared": self.prepared,
            "created_at": self.created_at or None,
            "held_s": round(held, 3),
            "affinity": self.affinity,
        }


_SLOT_FIELDS = operator.attrgetter(*(f.name for f in fields(Slot)))


def choose_slot(
    slots: Iterable[Slot],
    commit: str | None,
    affinity: str | None = None,
    layers: tuple[str, ...] | None = None,
) -> Slot | None:
    """The slot to hand out: an idle available one, last released under ``affinity`` if any
    is, then at ``commit`` if any is, then standing on ``layers`` (an overlay pool's current
    ones: a slot not moved onto a new prepare output yet comes last), else the least recently
    used (ties by number, so the choice is stable)."""
    available = SlotState.AVAILABLE
    # It runs at every allocation over every slot of the pool, so each preference narrows the
    # candidates in a list pass and the last choice is one ``min`` in C: the same slot as the
    # smallest key (other affinity, other commit, other layers, last released, number).
    # A slot marked to retire (the pool shrinks) is still available until its driver runs.
    idle = [s for s in slots if s.state is available and not (s.busy or s.reserved or s.retire)]
    if affinity is not None:
        idle = [s for s in idle if s.affinity == affinity] or idle
    if commit is not None:
        idle = [s for s in idle if s.commit == commit] or idle
    if layers is not None:
        idle = [s for s in idle if s.layers == layers] or idle
    return min(idle, key=_LEAST_RECENTLY_USED, default=None)


_LEAST_RECENTLY_USED = operator.attrgetter("last_released_at", "number")


def branch_holder(slots: Iterable[Slot], branch: str) -> Slot | None:
    """The slot that has ``branch``: leased with it (a grant whose checkout still runs has it on
    its lease, not yet on its slot), or checked out there and not yet cleaned away."""
    for s in slots:
        if (s.lease is not None and s.lease.branch == branch) or (
            s.branch == branch and s.state in (SlotState.ALLOCATED, SlotState.CLEANING)
        ):
            return s
    return None
