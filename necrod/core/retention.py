"""Which salvage refs a pool keeps (``salvage_keep_days``, ``_count``, ``_bytes``): pure policy.

Newest first, a salvage is kept while it is younger than ``days``, among the ``count`` newest,
and within ``bytes`` counted from the newest; everything after the first one that fails is
pruned, oldest work first. A limit of 0 turns that limit off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from necrod.core.config import SalvageRetention


@dataclass(frozen=True, slots=True)
class SalvageRef:
    """One salvage as the mirror lists it (``refs/necrod/salvage/<lease_id>`` and its trailers)."""

    ref: str
    lease_id: str
    commit: str
    #: Commit time, seconds since the epoch.
    date: int
    subject: str
    #: Bytes of work-tree files the salvage took (its ``Necrod-Bytes`` trailer; 0 when absent).
    bytes: int = 0
    #: The uid whose lease it was (``Necrod-Uid``); None: only admins may see it.
    uid: int | None = None

    def view(self) -> dict[str, Any]:
        return asdict(self)


def to_prune(items: Sequence[SalvageRef], retention: SalvageRetention, now: float) -> list[str]:
    """The refs past ``retention``, oldest last as given (``items`` newest first)."""
    out: list[str] = []
    total = 0
    for n, item in enumerate(sorted(items, key=lambda i: -i.date)):
        total += item.bytes
        if (
            (retention.count and n >= retention.count)
            or (retention.days and now - item.date > retention.days * 86400)
            or (retention.bytes and total > retention.bytes)
        ):
            out.append(item.ref)
    return out
