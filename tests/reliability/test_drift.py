"""Every reset is verified: a slot that still differs from its base after cleanup is isolated
with the evidence; one written to while it waits for its next lease is salvaged and reset. Neither
is handed out."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from necrod.proto.errors import ResourceExhausted
from tests.helpers import Necrod, git, wait_for
from tests.reliability.conftest import GitSeam, daemon_config, slots_by_id

pytestmark = pytest.mark.reliability


def isolated(d: Necrod, slot_id: str) -> dict[str, object]:
    return wait_for(lambda: (s := slots_by_id(d)[slot_id])["state"] == "error" and s, 30,  # type: ignore[no-any-return]
                    what=f"slot {slot_id} to be isolated")  # fmt: skip


@pytest.mark.parametrize("kind", ["worktree", "shared-clone"])
def test_a_drift_planted_after_the_reset_is_caught_before_the_slot_is_offered(
    necrod_factory: Callable[..., Necrod], origin: Path, seam: GitSeam, kind: str
) -> None:
    d = necrod_factory(daemon_config({"repo": origin}, {"git": str(seam.path)}, slots=1, max_slots=1,
                                     min_idle=0, isolation=kind))  # fmt: skip
    with d.client() as c:
        lease = c.allocate("repo")
        # Right after git clean: a file appears, and a tracked one changes (what a process
        # outside the slot, or a misbehaving filesystem, would do).
        seam.after("clean", "echo planted > planted.txt && echo changed > README")
        c.release(lease["lease_id"], salvage=False)
        slot = isolated(d, lease["slot_id"])
        with pytest.raises(ResourceExhausted):
            c.allocate("repo")
    error = str(slot["error"])
    assert error.startswith("isolated: its reset left it different from the base: 2 path(s)"), error
    assert "planted.txt" in error and "README" in error
    # The evidence is kept where it was found.
    assert (Path(lease["path"]) / "planted.txt").read_text() == "planted\n"
    logged = [e for e in d.log_events() if e.get("event") == "slot_isolated"]
    assert logged and "planted.txt" in logged[-1]["reason"]


def test_a_drift_of_more_paths_than_are_read_is_still_caught(
    necrod_factory: Callable[..., Necrod], origin: Path, seam: GitSeam
) -> None:
    """How much ``git status`` prints is up to what is in the slot: the drift check reads its
    first megabyte, which is evidence enough."""
    d = necrod_factory(daemon_config({"repo": origin}, {"git": str(seam.path)}, slots=1, max_slots=1,
                                     min_idle=0))  # fmt: skip
    with d.client() as c:
        lease = c.allocate("repo")
        # 6,000 names of 200 characters: over 1.2 MB of listing.
        seam.after("clean", "for i in $(seq 6000); do : > $(printf 'planted-%0192d' $i); done")
        c.release(lease["lease_id"], salvage=False)
        slot = isolated(d, lease["slot_id"])
    error = str(slot["error"])
    assert re.match(r"isolated: its reset left it different from the base: over (\d+) path\(s\)", error), (
        error
    )
    listed = int(error.split("over ")[1].split(" ")[0])
    assert 4000 < listed < 6000 and "planted-" in error and f"and {listed - 10} more" in error
    assert len(list(Path(lease["path"]).glob("planted-*"))) == 6000


def test_an_overlay_written_to_while_idle_is_not_handed_out(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    d = necrod_factory(daemon_config({"repo": origin}, slots=2, max_slots=2, min_idle=0, isolation="overlay"))
    with d.client() as c:
        lease = c.allocate("repo")
        c.release(lease["lease_id"])
    d.wait_slots("repo", "available", 2)
    # Planted between cleanup and grant, into the idle slot's upper, from outside the slot.
    slot_dir = Path(lease["path"])
    upper = slot_dir.parent.parent / "uppers" / slot_dir.name / "upper"
    assert upper.is_dir() and not any(upper.iterdir())
    (upper / "planted.txt").write_text("planted\n")
    with d.client() as c:
        granted = [c.allocate("repo")]
        with pytest.raises(ResourceExhausted):
            granted.append(c.allocate("repo"))
        assert all(g["slot_id"] != lease["slot_id"] for g in granted)
        assert not (Path(granted[0]["path"]) / "planted.txt").exists()
        # What was planted is kept as a stray salvage, and the slot comes back clean.
        d.wait_slots("repo", "available", 1)
        strays = [s for s in c.salvage_list("repo")["salvage"] if s["lease_id"].startswith("stray-")]
        assert len(strays) == 1
        assert c.salvage_show(strays[0]["lease_id"])["files"] == [{"status": "A", "path": "planted.txt"}]
        again = c.allocate("repo")
    assert again["slot_id"] == lease["slot_id"] and not (Path(again["path"]) / "planted.txt").exists()


def test_a_clean_reset_is_not_drift(necrod_factory: Callable[..., Necrod], origin: Path) -> None:
    """Ignored files a keep-ignored cleanup leaves, and a lease's full mess, are no drift."""
    d = necrod_factory(
        daemon_config({"repo": origin}, slots=1, max_slots=1, min_idle=0, cleanup="keep-ignored")
    )
    with d.client() as c:
        for _ in range(3):
            lease = c.allocate("repo", wait_s=30)
            path = Path(lease["path"])
            (path / "build").mkdir(exist_ok=True)
            (path / "build" / "out.o").write_text("kept build output\n")
            (path / "README").write_text("scribbled\n")
            (path / "untracked.txt").write_text("x\n")
            c.release(lease["lease_id"])
    d.wait_slots("repo", "available", 1)
    assert git(path, "status", "--porcelain") == ""
