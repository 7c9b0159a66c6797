"""Resume from salvage: a lease (or a task's retry) that starts where a lost one stopped."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from necrod.proto.errors import FailedPrecondition, InvalidParams, NotFound
from tests.helpers import Necrod, git
from tests.test_dispatcher import config, profile, submit, wait_state

pytestmark = pytest.mark.usefixtures("slot_kind")


def leave_work(path: Path) -> str:
    """Commit, then leave a change, a deletion and an untracked file uncommitted; the commit."""
    (path / "README").write_text("committed by the agent\n")
    git(path, "commit", "-q", "-am", "agent commit")
    (path / "pkg1" / "sub1" / "file1.txt").write_text("changed, not committed\n")
    (path / "pkg2" / "sub2" / "file2.txt").unlink()
    (path / "notes.txt").write_text("untracked\n")
    return git(path, "rev-parse", "HEAD")


def status(path: Path) -> list[str]:
    return sorted(
        line.strip() for line in git(path, "status", "--porcelain", "--untracked-files=all").splitlines()
    )


def test_from_salvage_starts_where_the_lost_lease_stopped(necrod: Necrod) -> None:
    with necrod.client() as c:
        lost = c.allocate("repo")
        commit = leave_work(Path(lost["path"]))
        left = status(Path(lost["path"]))
        c.release(lost["lease_id"])
        lease = c.allocate("repo", from_salvage=lost["lease_id"])
    path = Path(lease["path"])
    assert lease["resumed_from"] == lost["lease_id"]
    assert lease["commit"] == commit == git(path, "rev-parse", "HEAD")
    assert status(path) == left == ["?? notes.txt", "D pkg2/sub2/file2.txt", "M pkg1/sub1/file1.txt"]
    assert (path / "README").read_text() == "committed by the agent\n"
    # What the resumed lease leaves is salvaged against where it started.
    (path / "more.txt").write_text("second lease\n")
    with necrod.client() as c:
        c.release(lease["lease_id"])
        necrod.wait_slots("repo", "available", 2)
        shown = c.salvage_show(lease["lease_id"])
    assert shown["start"] == commit
    assert {f["path"] for f in shown["files"]} == {"more.txt", "notes.txt", "pkg1/sub1/file1.txt",
                                                    "pkg2/sub2/file2.txt"}  # fmt: skip


def test_from_salvage_with_a_branch(necrod: Necrod) -> None:
    with necrod.client() as c:
        lost = c.allocate("repo")
        commit = leave_work(Path(lost["path"]))
        c.release(lost["lease_id"])
        lease = c.allocate("repo", from_salvage=lost["lease_id"], branch="picked-up")
    path = Path(lease["path"])
    assert git(path, "symbolic-ref", "--short", "HEAD") == "picked-up"
    assert git(path, "rev-parse", "HEAD") == commit
    assert "M pkg1/sub1/file1.txt" in status(path)


def test_from_salvage_refusals(necrod: Necrod) -> None:
    with necrod.client() as c:
        held = c.allocate("repo")
        with pytest.raises(FailedPrecondition, match="still held"):
            c.allocate("repo", from_salvage=held["lease_id"])
        with pytest.raises(NotFound, match="no salvage"):
            c.allocate("repo", from_salvage="l-0000000000000000")
        with pytest.raises(InvalidParams):
            c.allocate("repo", from_salvage="../../etc")
        with pytest.raises(InvalidParams, match="no ref"):
            c.allocate("repo", from_salvage=held["lease_id"], ref="main")
        # A lease that changed nothing left no salvage: nothing to resume from.
        c.release(held["lease_id"])
        with pytest.raises(NotFound, match="no salvage"):
            c.allocate("repo", from_salvage=held["lease_id"])


# A task that commits and edits, then fails; its retry checks it starts from that work.
WORK_THEN_FAIL = (
    'if [ "$NECROD_ATTEMPT" = 1 ]; then '
    "echo one > one.txt && git add one.txt && git -c user.name=a -c user.email=a@b commit -qm 'attempt one' "
    "&& echo edited > README && echo kept > untracked.txt; exit 3; fi; "
    'echo "resumed from $NECROD_RESUMED_FROM"; git log -1 --format=%s; cat README untracked.txt; '
    "git status --porcelain"
)


def test_a_retry_with_resume_salvage_starts_from_the_failed_attempt(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    d = necrod_factory(config(origin, runners=profile("sh", WORK_THEN_FAIL, resume="salvage"),
                              dispatcher="  retry_backoff_s: 0.2\n"))  # fmt: skip
    tid = submit(d, pool="repo", runner="sh", max_retries=1)
    done = wait_state(d, tid, "succeeded", "failed")
    first, second = done["attempts"]
    assert done["state"] == "succeeded", d.call("tasks.logs", {"task_id": tid, "attempt": 2})
    assert first["outcome"] == "failed" and second["resumed_from"] == first["lease_id"]
    out = d.call("tasks.logs", {"task_id": tid, "attempt": 2})["data"]
    assert f"resumed from {first['lease_id']}" in out
    assert "attempt one\nedited\nkept\n M README\n?? untracked.txt" in out


def test_resume_base_is_the_default_and_a_task_can_ask_for_salvage(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    d = necrod_factory(
        config(origin, runners=profile("sh", WORK_THEN_FAIL), dispatcher="  retry_backoff_s: 0.2\n")
    )
    base = submit(d, pool="repo", runner="sh", max_retries=1)
    retried = wait_state(d, base, "succeeded", "failed")
    assert retried["attempts"][1]["resumed_from"] is None
    out = d.call("tasks.logs", {"task_id": base, "attempt": 2})["data"]
    assert "resumed from \n" in out and "edited" not in out
    asked = submit(d, pool="repo", runner="sh", max_retries=1, resume="salvage")
    assert wait_state(d, asked, "succeeded", "failed")["state"] == "succeeded"
    with pytest.raises(InvalidParams):
        submit(d, pool="repo", runner="sh", resume="sideways")


def test_salvage_always_keeps_the_work_of_a_task_that_succeeded(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    d = necrod_factory(config(origin, runners=profile("ok", "echo result > result.txt", salvage="always")
                              + profile("plain", "echo result > result.txt")))  # fmt: skip
    kept = wait_state(d, submit(d, pool="repo", runner="ok"), "succeeded")
    plain = wait_state(d, submit(d, pool="repo", runner="plain"), "succeeded")
    d.wait_slots("repo", "available", 2)
    salvaged = {s["lease_id"] for s in d.call("salvage.list")["salvage"]}
    assert kept["attempts"][0]["lease_id"] in salvaged
    assert plain["attempts"][0]["lease_id"] not in salvaged
    files = d.call("salvage.show", {"lease_id": kept["attempts"][0]["lease_id"]})["files"]
    assert files == [{"status": "A", "path": "result.txt"}]
