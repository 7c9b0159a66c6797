"""The pool size rules (core.sizing), without a daemon: slots in error take room under max_slots."""

from __future__ import annotations

from necrod.core.sizing import PoolCounts, idle_to_remove, quarantine_shortfall, slots_to_create


def test_a_pool_grows_to_its_baseline_and_min_idle_within_max_slots() -> None:
    empty = PoolCounts(total=0, idle=0, coming=0)
    assert slots_to_create(empty, baseline=2, min_idle=1, max_slots=8) == 2
    busy = PoolCounts(total=2, idle=0, coming=0)
    assert slots_to_create(busy, baseline=2, min_idle=1, max_slots=8, waiting=3) == 4
    assert slots_to_create(busy, baseline=2, min_idle=1, max_slots=3, waiting=3) == 1


def test_slots_in_error_take_room_under_max_slots() -> None:
    # slots: 2, max_slots: 2, one slot quarantined: no replacement, and no more when it is two.
    one = PoolCounts(total=1, idle=1, coming=0, quarantined=1)
    assert slots_to_create(one, baseline=2, min_idle=0, max_slots=2) == 0
    both = PoolCounts(total=0, idle=0, coming=0, quarantined=2)
    assert slots_to_create(both, baseline=2, min_idle=1, max_slots=2, waiting=5) == 0
    # Room left under max_slots: replaced up to it, not beyond.
    room = PoolCounts(total=1, idle=0, coming=0, quarantined=2)
    assert slots_to_create(room, baseline=2, min_idle=1, max_slots=4) == 1
    assert slots_to_create(room, baseline=2, min_idle=3, max_slots=4) == 1


def test_slots_in_error_never_make_the_pool_remove_healthy_ones() -> None:
    crowded = PoolCounts(total=2, idle=2, coming=0, quarantined=3)
    assert idle_to_remove(crowded, baseline=2, min_idle=0, max_slots=3, shrinking=False) == 0


def test_the_shortfall_is_what_the_baseline_lacks_for_want_of_room() -> None:
    def short(quarantined: int, baseline: int, max_slots: int) -> int:
        counts = PoolCounts(total=0, idle=0, coming=0, quarantined=quarantined)
        return quarantine_shortfall(counts, baseline=baseline, max_slots=max_slots)

    assert short(0, 2, 2) == 0
    assert short(1, 2, 2) == 1
    assert short(5, 2, 2) == 2  # never more than the baseline
    assert short(2, 2, 4) == 0  # room above the baseline absorbs them
    assert short(3, 2, 4) == 1
    assert short(1, 3, 2) == 1  # max_slots below the baseline: the baseline is the limit
