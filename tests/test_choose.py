"""Which idle slot an allocation gets (``core.slots.choose_slot``): pure, no daemon."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from necrod.core.slots import Lease, Slot, SlotState, choose_slot


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
    retiring = slot(5, retire=True)  # the pool shrinks: it goes as soon as its driver runs
    assert choose_slot([busy, reserved, held, retiring], "c1") is None
    assert choose_slot([busy, reserved, held, retiring, slot(4, released=9.0)], "c1").number == 4


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


_STATES = [SlotState.AVAILABLE, SlotState.AVAILABLE, SlotState.ALLOCATED, SlotState.CLEANING]


_ROW = st.tuples(
    st.sampled_from(_STATES), st.booleans(), st.booleans(), st.sampled_from(["c1", "c2", "c3"]),
    st.sampled_from([None, "a", "b"]), st.sampled_from([(), ("l1",), ("l2",)]), st.sampled_from([0.0, 1.0, 2.0]),
)  # fmt: skip


@given(
    st.lists(_ROW, max_size=12),
    st.sampled_from([None, "c1", "c2"]),
    st.sampled_from([None, "a", "b"]),
    st.sampled_from([None, ("l1",), ("l2",)]),
)
def test_the_choice_is_the_slot_with_the_smallest_preference_key(
    rows: list[tuple[SlotState, bool, bool, str, str | None, tuple[str, ...], float]],
    commit: str | None,
    affinity: str | None,
    layers: tuple[str, ...] | None,
) -> None:
    """The narrowing passes choose what one ``min`` over the whole preference key chooses."""
    slots = [
        slot(
            n,
            commit=c,
            released=released,
            layers=lay,
            state=state,
            busy=busy,
            reserved=reserved,
            affinity=aff,
        )
        for n, (state, busy, reserved, c, aff, lay, released) in enumerate(rows)
    ]

    def key(s: Slot) -> tuple[bool, bool, bool, float, int]:
        return (affinity is None or s.affinity != affinity, commit is None or s.commit != commit,
                layers is not None and s.layers != layers, s.last_released_at, s.number)  # fmt: skip

    idle = [s for s in slots if s.state is SlotState.AVAILABLE and not s.busy and not s.reserved]
    expected = min(idle, key=key, default=None)
    assert choose_slot(slots, commit, affinity, layers) is expected


def test_a_snapshot_is_an_equal_copy_with_its_own_lease() -> None:
    s = slot(3, released=2.0, layers=("l1",), affinity="a", fencing_token=7, error="x", busy=True)
    s.lease = Lease(lease_id="L1", holder="h", metadata={"k": 1}, ttl_s=30.0, granted_at=1.0, expires_at=31.0,
                    fencing_token=7, start_commit="c1", ports=[5000], deadline=99.0)  # fmt: skip
    snap = s.snapshot()
    assert snap == s and snap is not s
    assert snap.lease == s.lease and snap.lease is not s.lease
    s.lease.expires_at = 60.0
    s.state = SlotState.ALLOCATED
    assert snap.lease.expires_at == 31.0 and snap.state is SlotState.AVAILABLE
    assert s.restore(snap, s.version)
    assert s.state is SlotState.AVAILABLE and s.lease is not None and s.lease.expires_at == 31.0
