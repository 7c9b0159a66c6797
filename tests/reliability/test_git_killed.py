"""A git process killed part-way (mid-clean, mid-checkout, mid-worktree-add, mid-fetch): the slot
or the mirror is healed, or quarantined in ``error``, and never handed out broken.

The daemon's git is the seam from conftest.py: the real git, killed with SIGKILL after a delay
when a trigger names its verb, or left hanging until the daemon kills its process group.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from necrod.proto.errors import DeadlineExceeded, NecrodError, ResourceExhausted, Unavailable
from tests.helpers import Necrod, commit_file, git, wait_for
from tests.reliability.conftest import (
    GitSeam,
    alive,
    daemon_config,
    index_locks,
    slots_by_id,
    wait_settled,
    workspaces_of,
)

pytestmark = pytest.mark.reliability


def assert_clean_at(path: str, commit: str) -> None:
    assert (
        git(path, "--no-optional-locks", "status", "--porcelain", "--ignored", "--untracked-files=all") == ""
    ), path
    assert git(path, "rev-parse", "HEAD") == commit
    assert (Path(path) / "README").read_text() == "origin, second commit\n"


def leave_mess(path: str, files: int = 2000) -> None:
    """What a busy agent leaves: many untracked files, deleted and modified tracked ones."""
    root = Path(path)
    for i in range(files):
        d = root / "generated" / f"d{i % 20}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.txt").write_text("x" * 64)
    for tracked in list(root.glob("pkg*/sub*/*.txt"))[:12]:
        tracked.unlink()
    (root / "README").write_text("scribbled over\n")


@pytest.mark.parametrize("verb", ["checkout", "clean"])
def test_a_git_killed_mid_cleanup_is_retried_and_the_slot_comes_back_clean(
    necrod_factory: Callable[..., Necrod], origin: Path, seam: GitSeam, verb: str
) -> None:
    d = necrod_factory(
        daemon_config({"repo": origin}, {"git": str(seam.path)}, slots=1, max_slots=1, min_idle=0)
    )
    base = git(origin, "rev-parse", "HEAD")
    with d.client() as c:
        lease = c.allocate("repo")
        leave_mess(lease["path"])
        seam.die(verb, after=0.02, once=True)
        c.release(lease["lease_id"], salvage=False)
        wait_for(lambda: seam.fired("die", verb), 20, what=f"git {verb} to be killed")
        # Until it is clean again the slot is not handed out.
        with pytest.raises(ResourceExhausted):
            c.allocate("repo")
        again = c.allocate("repo", wait_s=60)
    assert again["slot_id"] == lease["slot_id"]
    assert_clean_at(again["path"], base)
    assert not index_locks(workspaces_of(d))


@pytest.mark.parametrize("verb", ["checkout", "clean"])
def test_a_cleanup_retried_after_its_salvage_keeps_the_first_salvage(
    necrod_factory: Callable[..., Necrod], origin: Path, seam: GitSeam, verb: str
) -> None:
    d = necrod_factory(
        daemon_config({"repo": origin}, {"git": str(seam.path)}, slots=1, max_slots=1, min_idle=0)
    )
    with d.client() as c:
        lease = c.allocate("repo")
        leave_mess(lease["path"])
        # Salvaged, then the reset fails part-way: the retry finds a half-reset slot.
        seam.fail(verb, "fatal: injected failure", once=True)
        c.release(lease["lease_id"])
        wait_for(lambda: seam.fired("fail", verb), 20, what=f"git {verb} to fail")
        c.allocate("repo", wait_s=60)
        files = {f["path"] for f in c.salvage_show(lease["lease_id"])["files"]}
    assert "README" in files and "generated/d0/f0.txt" in files, sorted(files)[:5]


def test_a_slot_whose_cleanup_is_killed_every_time_is_quarantined_and_replaced(
    necrod_factory: Callable[..., Necrod], origin: Path, seam: GitSeam
) -> None:
    d = necrod_factory(
        daemon_config({"repo": origin}, {"git": str(seam.path)}, slots=1, max_slots=2, min_idle=0)
    )
    base = git(origin, "rev-parse", "HEAD")
    with d.client() as c:
        lease = c.allocate("repo")
        leave_mess(lease["path"], files=50)
        (Path(lease["path"]) / "precious.txt").write_text("the agent's work\n")
        seam.die("checkout", after=0.0, once=False)
        c.release(lease["lease_id"], salvage=True)
        broken = wait_for(
            lambda: slots_by_id(d)[lease["slot_id"]]["state"] == "error" and slots_by_id(d)[lease["slot_id"]],
            40,
            what="the slot to be quarantined",
        )
        seam.clear()
        assert "cleanup failed twice" in broken["error"]
        # Kept as it was, for inspection; its work was salvaged before the reset was tried.
        assert (Path(lease["path"]) / "precious.txt").exists()
        shown = c.salvage_show(lease["lease_id"])
        assert "precious.txt" in [f["path"] for f in shown["files"]]
        status = c.status()
        assert status["state"] == "degraded"
        assert any("slot(s) in error" in reason for reason in status["degraded"])
        # A replacement serves callers; the quarantined slot is never handed out.
        fresh = c.allocate("repo", wait_s=60)
        assert fresh["slot_id"] != lease["slot_id"]
        assert_clean_at(fresh["path"], base)
        assert c.remove_slot(lease["slot_id"])["state"] == "removed"


def test_a_worktree_add_killed_part_way_leaves_no_half_slot(
    necrod_factory: Callable[..., Necrod], origin: Path, seam: GitSeam
) -> None:
    seam.die("worktree", after=0.01, once=True)
    d = necrod_factory(
        daemon_config({"repo": origin}, {"git": str(seam.path)}, slots=2, max_slots=2, min_idle=0),
        start=False,
    )
    d.start(wait=False)
    d.wait_ready(timeout=60)
    assert seam.fired("die", "worktree") == 1
    base = git(origin, "rev-parse", "HEAD")
    slots = wait_settled(d)
    assert sorted(s["state"] for s in slots.values()) == ["available", "available"]
    with d.client() as c:
        leases = [c.allocate("repo"), c.allocate("repo")]
    for lease in leases:
        assert_clean_at(lease["path"], base)
    # Nothing of the killed attempt is left: every admin directory and slot directory is a slot's.
    workspaces = workspaces_of(d)
    admins = sorted(p.name for p in (workspaces / "repo" / "mirror.git" / "worktrees").iterdir())
    dirs = sorted(p.name for p in (workspaces / "repo" / "slots").iterdir())
    numbers = sorted(s["slot_id"].split("/")[1] for s in slots.values())
    assert admins == numbers and dirs == numbers


def test_a_hung_fetch_is_cut_off_with_its_whole_process_group(
    necrod_factory: Callable[..., Necrod], origin: Path, seam: GitSeam
) -> None:
    d = necrod_factory(daemon_config({"repo": origin}, {"git": str(seam.path)}, slots=1, min_idle=0))
    pushed = commit_file(origin, "new.txt", "new\n", branch="pushed-later")
    seam.hang("fetch")
    with d.client() as c:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            c.allocate("repo", ref="pushed-later", wait_s=1.5)
        assert time.monotonic() - started < 30
        hung = seam.hung_pids()
        assert hung
        wait_for(lambda: not any(alive(pid) for pid in hung), 15, what="the hung git and its child to die")
        assert c.status()["git"]["running"] == 0
        seam.clear()
        lease = c.allocate("repo", ref="pushed-later", wait_s=30)
    assert lease["commit"] == pushed
    assert git(lease["path"], "rev-parse", "HEAD") == pushed


def test_a_fetch_killed_part_way_is_retried(
    necrod_factory: Callable[..., Necrod], origin: Path, seam: GitSeam
) -> None:
    d = necrod_factory(daemon_config({"repo": origin}, {"git": str(seam.path)}, slots=1, min_idle=0))
    pushed = commit_file(origin, "new.txt", "new\n", branch="pushed-later")
    seam.die("fetch", after=0.01, once=True)
    with d.client() as c:
        lease = c.allocate("repo", ref="pushed-later", wait_s=60)
    assert seam.fired("die", "fetch") == 1
    assert lease["commit"] == pushed and git(lease["path"], "rev-parse", "HEAD") == pushed


@pytest.mark.parametrize("lock", ["refs/remotes/origin/pushed-later.lock", "refs/tags/v-later.lock"])
def test_a_lock_a_killed_fetch_left_does_not_stop_the_next(
    necrod_factory: Callable[..., Necrod], origin: Path, lock: str
) -> None:
    d = necrod_factory(daemon_config({"repo": origin}, slots=1, min_idle=0))
    pushed = commit_file(origin, "new.txt", "new\n", branch="pushed-later")
    git(origin, "tag", "v-later")
    mirror = workspaces_of(d) / "repo" / "mirror.git"
    (mirror / lock).write_text("")  # what a fetch killed while updating that ref leaves
    with d.client() as c:
        lease = c.allocate("repo", ref="pushed-later", wait_s=60)
    assert lease["commit"] == pushed
    assert not (mirror / lock).exists()


def test_a_fetch_that_keeps_dying_fails_the_call_cleanly_and_the_mirror_recovers(
    necrod_factory: Callable[..., Necrod], origin: Path, seam: GitSeam
) -> None:
    d = necrod_factory(daemon_config({"repo": origin}, {"git": str(seam.path)}, slots=1, min_idle=0))
    pushed = commit_file(origin, "new.txt", "new\n", branch="pushed-later")
    seam.die("fetch", after=0.01, once=False)
    with d.client() as c:
        with pytest.raises(NecrodError) as info:
            c.allocate("repo", ref="pushed-later", wait_s=60)
        seam.clear()
        # "try again later", not a bug report: the fetch failed, the daemon did not.
        assert info.value.kind == "unavailable", info.value.to_error_object()
        assert c.status()["pools"]["repo"]["slots"]["available"] == 1
        lease = c.allocate("repo", ref="pushed-later", wait_s=60)
    assert lease["commit"] == pushed


def test_a_clone_that_keeps_dying_leaves_the_pool_failed_then_it_recovers(
    necrod_factory: Callable[..., Necrod], origin: Path, seam: GitSeam
) -> None:
    seam.die("fetch", after=0.01, once=False)
    d = necrod_factory(
        daemon_config({"repo": origin}, {"git": str(seam.path)}, slots=1, min_idle=0), start=False
    )
    d.start(wait=False)
    wait_for(lambda: d.call("pools.get", {"pool": "repo"})["state"] == "failed", 60, what="pool failed")
    with d.client() as c:
        with pytest.raises(Unavailable, match="failed"):
            c.allocate("repo")
        assert c.status()["state"] == "degraded"
    seam.clear()
    d.wait_ready(timeout=90)
    base = git(origin, "rev-parse", "HEAD")
    with d.client() as c:
        lease = c.allocate("repo")
    assert_clean_at(lease["path"], base)
    leftovers = list((workspaces_of(d) / "repo").glob("mirror.git.new"))
    assert not leftovers
