"""Issue 16 #11: slots in ``error`` count against ``max_slots``. A pool whose every cleanup fails
quarantines its slots one by one and replaces them only while there is room: it never holds more
than ``max_slots`` slots on disk, says so in ``daemon.status``, and serves again once an operator
recovers a slot.

Every cleanup fails through the git seam (``git clean`` answers like a broken repository).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from necrod.proto.errors import ResourceExhausted
from tests.helpers import Necrod, git, wait_for
from tests.reliability.conftest import FIGURES, GitSeam, daemon_config, slots_by_id, workspaces_of

pytestmark = pytest.mark.reliability


class SlotCensus:
    """The pool's slots as the daemon lists them and as they are on disk, with the most seen."""

    def __init__(self, d: Necrod, pool: str = "repo") -> None:
        self.d = d
        self.pool = pool
        self.slots_dir = workspaces_of(d) / pool / "slots"
        self.most = 0

    def take(self) -> dict[str, dict[str, Any]]:
        slots = slots_by_id(self.d, self.pool)
        on_disk = [p for p in self.slots_dir.iterdir() if p.is_dir()] if self.slots_dir.is_dir() else []
        self.most = max(self.most, len(slots), len(on_disk))
        return slots

    def wait(self, predicate: Callable[[dict[str, dict[str, Any]]], bool], what: str) -> dict[str, Any]:
        return wait_for(lambda: s if predicate(s := self.take()) else None, 60, 0.1, what)  # type: ignore[no-any-return]


def _states(slots: dict[str, dict[str, Any]]) -> list[str]:
    return sorted(s["state"] for s in slots.values())


@pytest.mark.parametrize(
    ("slots", "max_slots", "min_idle"),
    [(2, 2, 0), (1, 3, 1)],
    ids=["baseline-at-max-slots", "grows-to-max-slots"],
)
def test_a_pool_whose_cleanups_always_fail_stays_within_max_slots(
    necrod_factory: Callable[..., Necrod],
    origin: Path,
    seam: GitSeam,
    slots: int,
    max_slots: int,
    min_idle: int,
) -> None:
    d = necrod_factory(
        daemon_config({"repo": origin}, {"git": str(seam.path)}, slots=slots, max_slots=max_slots,
                      min_idle=min_idle)
    )  # fmt: skip
    seam.fail("clean", "fatal: cannot clean (injected by the test)")
    census = SlotCensus(d)
    released = 0
    with d.client() as c:
        # Twice over: without the bound, each of these leases would leave one more slot on disk.
        while released < 2 * max_slots:
            try:
                lease = c.allocate("repo", wait_s=5)
            except ResourceExhausted:
                break
            c.release(lease["lease_id"], salvage=False)
            released += 1
            census.wait(
                lambda s, sid=lease["slot_id"]: s[sid]["state"] == "error", "the slot to be quarantined"
            )
        FIGURES["cleanups failed on purpose (quarantine bound)"] += 2 * released
        assert released == max_slots, "every slot was used once, then the pool had none to give"
        settled = census.wait(
            lambda s: not any(x["state"] in ("creating", "cleaning") for x in s.values()),
            "the pool to settle",
        )
        assert _states(settled) == ["error"] * max_slots
        assert all("cleanup failed twice" in s["error"] for s in settled.values())
        with pytest.raises(ResourceExhausted):
            c.allocate("repo", wait_s=2)
        with pytest.raises(ResourceExhausted, match="in error"):
            c.call("slots.add", {"pool": "repo"})
        status = c.status()
        assert status["state"] == "degraded"
        reason = next(r for r in status["degraded"] if "in error" in r)
        assert (
            f"{max_slots} slot(s) in error" in reason and f"counted against max_slots {max_slots}" in reason
        )
        assert f"{slots} of its {slots} slot(s) cannot be replaced" in reason
    assert census.most == max_slots

    # A restart loads the quarantined slots and creates no more.
    d.terminate()
    d.start(wait=False)
    wait_for(
        lambda: d.call("pools.get", {"pool": "repo"})["state"] == "ready", 30, what="the pool to be ready"
    )
    census.wait(lambda s: len(s) == max_slots, "the slots to be loaded")
    assert _states(census.take()) == ["error"] * max_slots and census.most == max_slots

    # The operator mends the cause and recovers one: it serves again, clean.
    seam.clear()
    first = sorted(census.take())[0]
    assert d.call("slots.recover", {"slot_id": first})["state"] == "available"
    with d.client() as c:
        again = c.allocate("repo")
        assert again["slot_id"] == first
        assert git(again["path"], "status", "--porcelain", "--untracked-files=all") == ""
    assert census.most == max_slots
