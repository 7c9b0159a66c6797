"""Which idle slot an allocation gets (``core.slots.choose_slot``): pure, no daemon."""

from __future__ import annotations

from necrod.core.slots import Slot, SlotState, choose_slot


def slot(
    n: int, *, commit: str = "c1", released: float = 0.0, layers: tuple[str, ...] = (), **kw: object
) -> Slot:
    s = Slot(slot_id=f"p/{n}", pool="p", number=n, path=f"/s/{n}", admin=str(n), state=SlotState.AVAILABLE,
             commit=commit, last_released_at=released, layers=layers)  # fmt: skip
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def test_least_recently_used_then_number() -> None:
    assert (
        choose_slot([slot(1, released=5.0), slot(2, released=3.0), slot(3, released=3.0)], "c1").number == 2
    )


def test_only_idle_available_slots() -> None:
    busy, reserved, held = slot(1, busy=True), slot(2, reserved=True), slot(3, state=SlotState.ALLOCATED)
    assert choose_slot([busy, reserved, held], "c1") is None
    assert choose_slot([busy, reserved, held, slot(4, released=9.0)], "c1").number == 4


def test_affinity_then_commit_then_current_layers() -> None:
    new = ("prepared-k2", "base-c1")
    old = slot(1, layers=("prepared-k1", "base-c1"))
    current = slot(2, released=9.0, layers=new)
    assert choose_slot([old, current], "c1", layers=new) is current  # the output moved on
    assert choose_slot([old, current], "c1") is old  # not an overlay pool: least recently used
    elsewhere = slot(3, commit="c0", layers=new)
    assert choose_slot([elsewhere, old], "c1", layers=new) is old  # the commit comes first
    warm = slot(4, commit="c0", affinity="build-a")
    assert choose_slot([old, current, warm], "c1", affinity="build-a", layers=new) is warm
