"""Shared-clone slots: each slot a repository of its own, borrowing the mirror's objects.

The rest of the pool suite runs on both kinds of slot (the ``slot_kind`` fixture); these are
the promises only a shared clone makes.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.helpers import Necrod, commit_file, git, pool_config, wait_for


def mirror_of(d: Necrod, pool: str = "repo") -> Path:
    return Path(next(p for p in d.call("pools.list")["pools"] if p["name"] == pool)["mirror"])


def clone_pool(necrod_factory: Callable[..., Necrod], origin: Path, **kw: object) -> Necrod:
    options: dict[str, object] = {"slots": 2, "max_slots": 2, "min_idle": 0, "isolation": "shared-clone"}
    return necrod_factory(pool_config({"repo": origin}, **{**options, **kw}))


def test_what_one_slot_writes_reaches_neither_another_slot_nor_the_mirror(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    d = clone_pool(necrod_factory, origin)
    mirror = mirror_of(d)
    mirror_config = (mirror / "config").read_text()
    with d.client() as c:
        a, b = c.allocate("repo", holder="a"), c.allocate("repo", holder="b")
        slot_a, slot_b = Path(a["path"]), Path(b["path"])
        assert (slot_a / ".git").is_dir() and (slot_b / ".git").is_dir()
        (slot_a / "new.txt").write_text("only in a\n")
        git(slot_a, "add", "new.txt")
        git(slot_a, "commit", "-q", "-m", "a's work")
        made = git(slot_a, "rev-parse", "HEAD")
        git(slot_a, "branch", "a-branch")
        git(slot_a, "config", "core.fsmonitor", "echo planted")
        # The commit is in a's own store, not the mirror's, so b cannot see it either.
        assert not _has(slot_b, made)
        assert not _has(mirror, made)
        assert git(slot_b, "branch", "--list", "a-branch") == ""
        assert git(slot_b, "config", "--get", "core.fsmonitor", check=False) == ""
        assert (mirror / "config").read_text() == mirror_config
        # Reading borrowed history works in both.
        assert git(slot_b, "log", "--oneline", "-2").count("\n") == 1
        c.release(a["lease_id"])
        c.release(b["lease_id"], salvage=False)
        d.wait_slots("repo", "available", 2)
        shown = c.salvage_show(a["lease_id"])
    # Salvage fetched a's commit into the mirror, whole.
    assert _has(mirror, shown["commit"]) and _has(mirror, made)
    assert git(mirror, "fsck", "--connectivity-only", "--no-dangling") == ""
    assert git(slot_a, "config", "--get", "core.fsmonitor", check=False) == ""
    # And slot a's own repository keeps nothing of the lease for the next one: no refs, no
    # objects of its own, no reflog; it still stands whole on the mirror's objects.
    assert git(slot_a, "for-each-ref") == "" and not (slot_a / ".git" / "logs").exists()
    assert "count: 0\nsize: 0\nin-pack: 0" in git(slot_a, "count-objects", "-v")
    assert git(slot_a, "fsck", "--no-dangling") == ""


def _has(repo: Path, sha: str) -> bool:
    return (
        subprocess.run(["git", "-C", str(repo), "cat-file", "-e", sha], capture_output=True).returncode == 0
    )


def test_a_force_push_and_gc_in_the_mirror_do_not_corrupt_a_parked_slot(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    old = commit_file(origin, "doomed.txt", "to be force-pushed away\n")
    d = clone_pool(necrod_factory, origin, slots=1, max_slots=1, fetch_interval_s=3600)
    mirror = mirror_of(d)
    (slot,) = d.wait_slots("repo", "available", 1)
    assert slot["commit"] == old
    assert git(mirror, "rev-parse", "refs/necrod/slots/1") == old
    # History rewritten upstream; the mirror follows, then drops everything unreachable.
    git(origin, "reset", "-q", "--hard", "HEAD~1")
    new = commit_file(origin, "instead.txt", "the rewritten history\n")
    git(mirror, "fetch", "-q", "--prune", "origin")
    git(mirror, "gc", "-q", "--prune=now")
    # The parked slot still stands on whole objects.
    assert git(slot["path"], "fsck", "--no-dangling") == ""
    assert git(slot["path"], "status", "--porcelain") == ""
    assert _has(mirror, old)
    # Once the daemon moves it to the new base, the pin follows and the slot is whole there too.
    assert d.config_path is not None
    d.config_path.write_text(d.config_path.read_text().replace("3600", "1"))  # fetches at once
    wait_for(lambda: d.call("slots.list", {"pool": "repo"})["slots"][0]["commit"] == new, 30,
             what="the slot to move to the new base")  # fmt: skip
    d.wait_slots("repo", "available", 1)
    assert git(mirror, "rev-parse", "refs/necrod/slots/1") == new
    assert git(slot["path"], "rev-parse", "HEAD") == new
    assert git(slot["path"], "fsck", "--no-dangling") == ""


def slot_view(d: Necrod, slot_id: str) -> dict[str, object]:
    return next(s for s in d.call("slots.list", {"pool": "repo"})["slots"] if s["slot_id"] == slot_id)


def test_a_reload_turns_worktree_slots_into_shared_clones_without_losing_work(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    d = necrod_factory(pool_config({"repo": origin}, slots=2, max_slots=2, min_idle=0))
    assert d.config_path is not None
    with d.client() as c:
        held = c.allocate("repo", holder="agent")
        path = Path(held["path"])
        assert (path / ".git").is_file()
        (path / "work.txt").write_text("the agent's work\n")
        d.config_path.write_text(pool_config({"repo": origin}, slots=2, max_slots=2, min_idle=0,
                                             isolation="shared-clone"))  # fmt: skip
        wait_for(lambda: d.call("daemon.status")["config"]["generation"] == 2, 20, what="the reload")
        idle = next(s for s in c.slots("repo")["slots"] if s["slot_id"] != held["slot_id"])
        remade = {"kind": "shared-clone", "state": "available"}
        wait_for(
            lambda: remade.items() <= slot_view(d, idle["slot_id"]).items(), 30, what="the idle slot remade"
        )
        assert (Path(idle["path"]) / ".git").is_dir()
        # The held slot is untouched while held, remade after release, its work salvaged first.
        assert (path / ".git").is_file() and (path / "work.txt").exists()
        c.release(held["lease_id"])
        wait_for(
            lambda: remade.items() <= slot_view(d, held["slot_id"]).items(), 30, what="the held slot remade"
        )
        shown = c.salvage_show(held["lease_id"])
    assert "work.txt" in {f["path"] for f in shown["files"]}
    assert (path / ".git").is_dir() and not (path / "work.txt").exists()
    assert git(path, "status", "--porcelain") == ""
    assert not (mirror_of(d) / "worktrees" / path.name).exists()
