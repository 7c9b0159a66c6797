"""How many slots a pool should have: the rules behind ``slots``, ``min_idle`` and ``max_slots``.

- ``slots`` (plus operator adjustments by ``slots.add`` / ``slots.remove``) is the baseline,
  always kept;
- the pool grows beyond it, up to ``max_slots``, so that ``min_idle`` slots are ready or on
  their way (being created or cleaned) — a burst never waits for a clone;
- a slot above the baseline is removed when it has been idle past ``idle_timeout_s`` and the
  other idle slots still cover ``min_idle``; when the baseline shrinks (reload), idle slots
  above it go at once; allocated slots are never removed, only retired when they come back;
- slots in ``error`` (quarantined or isolated) stay on disk for inspection until an operator
  recovers or removes them, so they take room under ``max_slots``: a slot that keeps failing
  its cleanup is replaced only while there is room, and a pool full of them serves fewer slots
  rather than filling the disk. They never make the pool remove a healthy slot.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PoolCounts:
    #: Slots that count towards the pool's size (not in error, not being removed).
    total: int
    #: Available and not promised to a waiting allocation.
    idle: int
    #: Being created or cleaned: ready soon.
    coming: int
    #: In error: not serving, but still on disk.
    quarantined: int = 0


def slots_to_create(
    counts: PoolCounts, *, baseline: int, min_idle: int, max_slots: int, waiting: int = 0
) -> int:
    """How many new slots to cut now (0 when none)."""
    upper = max(baseline, max_slots)
    want_idle = min_idle + waiting
    grow = max(baseline - counts.total, want_idle - counts.idle - counts.coming)
    return max(0, min(grow, upper - counts.total - counts.quarantined))


def quarantine_shortfall(counts: PoolCounts, *, baseline: int, max_slots: int) -> int:
    """How many slots of its baseline the pool goes without because slots in error take their
    room under ``max_slots``."""
    upper = max(baseline, max_slots)
    return max(0, min(baseline, counts.quarantined - (upper - baseline)))


def idle_to_remove(
    counts: PoolCounts, *, baseline: int, min_idle: int, max_slots: int, shrinking: bool
) -> int:
    """How many idle slots to remove right away: above ``max_slots`` always, above the baseline
    when it was just lowered — keeping ``min_idle`` idle in that second case."""
    upper = max(baseline, max_slots)
    if counts.total > upper:
        return min(counts.idle, counts.total - upper)
    if shrinking and counts.total > baseline:
        return max(0, min(counts.total - baseline, counts.idle - min_idle))
    return 0


def may_retire_idle(counts: PoolCounts, *, baseline: int, min_idle: int) -> bool:
    """Whether one idle slot above the baseline may go (its idle timeout passed)."""
    return counts.total > baseline and counts.idle - 1 >= min_idle
