"""Sparse checkouts (``sparse:`` on a pool, ``sparse`` on a lease) and partial mirrors
(``filter:``), on real repositories and the real daemon: what a slot holds, what a cleanup puts
back whatever the agent did, what salvage keeps, and the blobs a partial mirror lacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from necrod.client import Client
from necrod.proto.errors import InvalidParams
from tests.helpers import Necrod, git, pool_config, wait_for

KINDS = ["worktree", "shared-clone"]


def files(slot: str) -> set[str]:
    """Every file in a slot's work tree, but its .git."""
    out = set()
    for root, dirs, names in os.walk(slot):
        dirs[:] = [d for d in dirs if d != ".git"]
        out |= {os.path.relpath(os.path.join(root, n), slot) for n in names if n != ".git"}
    return out


def tops(slot: str) -> set[str]:
    """The top-level directories of a slot's work tree that hold anything."""
    return {f.split("/")[0] for f in files(slot) if "/" in f}


def released_and_clean(d: Necrod, lease: dict[str, Any]) -> None:
    d.call("slots.release", {"lease_id": lease["lease_id"]})
    d.wait_slots("repo", "available", 1)


def in_slot(slot: str, *args: str) -> str:
    """git as the agent runs it in its slot (its own config, not necrod's)."""
    return git(slot, *args)


@pytest.mark.parametrize("kind", KINDS)
def test_a_sparse_pool_hands_out_its_cone_and_the_top_level_files(
    necrod_factory: Callable[..., Necrod], origin: Path, kind: str
) -> None:
    d = necrod_factory(
        pool_config({"repo": origin}, slots=1, min_idle=0, isolation=kind, sparse=["pkg1/sub0", "pkg2"])
    )
    lease = d.call("slots.allocate", {"pool": "repo"})
    assert lease["sparse"] == ["pkg1/sub0", "pkg2"]
    got = files(lease["path"])
    assert {"README", ".gitignore"} <= got
    assert tops(lease["path"]) == {"pkg1", "pkg2"}
    assert {f.rsplit("/", 1)[0] for f in got if f.startswith("pkg1/")} == {"pkg1/sub0"}
    assert any(f.startswith("pkg2/sub1/") for f in got)
    # The agent's git sees a clean slot: the directories outside the cone are not deletions.
    assert in_slot(lease["path"], "status", "--porcelain") == ""
    assert d.call("pools.get", {"pool": "repo"})["sparse"] == ["pkg1/sub0", "pkg2"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_lease_narrows_or_widens_its_slot_and_cleanup_restores_the_pools_set(
    necrod_factory: Callable[..., Necrod], origin: Path, kind: str
) -> None:
    d = necrod_factory(pool_config({"repo": origin}, slots=1, min_idle=0, isolation=kind, sparse=["pkg1"]))
    narrowed = d.call("slots.allocate", {"pool": "repo", "sparse": ["pkg3/"]})
    assert narrowed["sparse"] == ["pkg3"] and tops(narrowed["path"]) == {"pkg3"}
    assert in_slot(narrowed["path"], "status", "--porcelain") == ""
    released_and_clean(d, narrowed)
    plain = d.call("slots.allocate", {"pool": "repo"})
    assert plain["slot_id"] == narrowed["slot_id"] and tops(plain["path"]) == {"pkg1"}
    released_and_clean(d, plain)
    whole = d.call("slots.allocate", {"pool": "repo", "sparse": []})
    assert whole["sparse"] == [] and tops(whole["path"]) == {"pkg0", "pkg1", "pkg2", "pkg3"}
    released_and_clean(d, whole)
    assert tops(d.call("slots.allocate", {"pool": "repo"})["path"]) == {"pkg1"}


def test_a_lease_on_a_full_pool_is_widened_back_to_everything(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    # min_idle 0: the pool stays one slot, so the next lease gets the one this lease narrowed.
    d = necrod_factory(pool_config({"repo": origin}, slots=1, min_idle=0))
    lease = d.call(
        "slots.allocate",
        {"pool": "repo", "sparse": ["pkg0"], "ref": git(origin, "rev-parse", "main~1"), "branch": "work"},
    )
    assert tops(lease["path"]) == {"pkg0"} and lease["branch"] == "work"
    assert (Path(lease["path"]) / "README").read_text() == "origin\n"
    released_and_clean(d, lease)
    again = d.call("slots.allocate", {"pool": "repo"})
    assert again["sparse"] == [] and tops(again["path"]) == {"pkg0", "pkg1", "pkg2", "pkg3"}
    assert in_slot(again["path"], "status", "--porcelain") == ""


@pytest.mark.parametrize("kind", KINDS)
def test_an_agent_undoing_the_sparse_set_is_undone_at_cleanup(
    necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path, kind: str
) -> None:
    d = necrod_factory(pool_config({"repo": origin}, slots=1, min_idle=0, isolation=kind, sparse=["pkg1"]))
    lease = d.call("slots.allocate", {"pool": "repo"})
    slot = lease["path"]
    # The agent widens the slot its own way, then plants a symlink where necrod writes its
    # patterns: the daemon must replace the link, not write through it.
    in_slot(slot, "sparse-checkout", "disable")
    assert tops(slot) == {"pkg0", "pkg1", "pkg2", "pkg3"}
    git_dir = Path(in_slot(slot, "rev-parse", "--absolute-git-dir"))
    victim = workdir / "victim"
    victim.write_text("keep me\n")
    (git_dir / "info").mkdir(exist_ok=True)
    pattern_file = git_dir / "info" / "sparse-checkout"
    pattern_file.unlink(missing_ok=True)
    pattern_file.symlink_to(victim)
    released_and_clean(d, lease)
    assert victim.read_text() == "keep me\n"
    again = d.call("slots.allocate", {"pool": "repo"})
    assert tops(again["path"]) == {"pkg1"} and in_slot(again["path"], "status", "--porcelain") == ""


@pytest.mark.parametrize("kind", KINDS)
def test_salvage_in_a_sparse_slot_keeps_the_work_and_records_no_absent_directory_as_deleted(
    necrod_factory: Callable[..., Necrod], origin: Path, kind: str
) -> None:
    d = necrod_factory(pool_config({"repo": origin}, slots=1, min_idle=0, isolation=kind, sparse=["pkg1"]))
    lease = d.call("slots.allocate", {"pool": "repo"})
    slot = Path(lease["path"])
    edited = next(f for f in sorted(files(str(slot))) if f.startswith("pkg1/"))
    (slot / edited).write_text("the agent's edit\n")
    (slot / "pkg1" / "new.txt").write_text("a new file\n")
    # A file outside the cone the agent wrote all the same is its work too.
    outside = git(origin, "ls-files", "pkg0").splitlines()[0]
    (slot / outside).parent.mkdir(parents=True, exist_ok=True)
    (slot / outside).write_text("written outside the cone\n")
    released_and_clean(d, lease)
    shown = d.call("salvage.show", {"lease_id": lease["lease_id"]})
    changes = {(f["status"], f["path"]) for f in shown["files"]}
    assert changes == {("M", edited), ("A", "pkg1/new.txt"), ("M", outside)}
    mirror = d.call("pools.get", {"pool": "repo"})["mirror"]
    assert git(mirror, "show", f"{shown['commit']}:{edited}") == "the agent's edit"


@pytest.mark.parametrize("kind", KINDS)
def test_salvage_of_a_sparse_slot_whose_index_the_agent_removed_records_no_absent_directory(
    necrod_factory: Callable[..., Necrod], origin: Path, kind: str
) -> None:
    d = necrod_factory(
        pool_config({"repo": origin}, slots=1, min_idle=0, isolation=kind, sparse=["pkg1/sub0"])
    )
    lease = d.call("slots.allocate", {"pool": "repo"})
    slot = Path(lease["path"])
    inside = sorted(f for f in files(str(slot)) if f.startswith("pkg1/sub0/"))
    (slot / inside[0]).write_text("edited\n")
    (slot / inside[1]).unlink()  # a real deletion, in a directory that is there
    (Path(in_slot(str(slot), "rev-parse", "--absolute-git-dir")) / "index").unlink()
    released_and_clean(d, lease)
    shown = d.call("salvage.show", {"lease_id": lease["lease_id"]})
    assert {(f["status"], f["path"]) for f in shown["files"]} == {("M", inside[0]), ("D", inside[1])}
    again = d.call("slots.allocate", {"pool": "repo"})
    assert {f.rsplit("/", 1)[0] for f in files(again["path"]) if "/" in f} == {"pkg1/sub0"}


def test_sparse_is_refused_for_an_overlay_pool_and_checked_on_a_lease(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    d = necrod_factory(pool_config({"repo": origin}, slots=1))
    for bad in (["../x"], ["-x"], [".git"], ["a/*"], ["/abs"]):
        with pytest.raises(InvalidParams, match="sparse"):
            d.call("slots.allocate", {"pool": "repo", "sparse": bad})
        with pytest.raises(InvalidParams, match="sparse"):
            d.call("tasks.submit", {"pool": "repo", "command": ["true"], "sparse": bad})
    assert d.call("slots.list", {"pool": "repo", "state": "allocated"})["slots"] == []
    overlay = origin.parent / "overlay.yaml"
    overlay.write_text(pool_config({"repo": origin}, isolation="overlay") + "    sparse: [pkg1]\n")
    result = subprocess.run([sys.executable, "-m", "necrod", "--check-config", str(overlay)], capture_output=True,
                            text=True, check=False)  # fmt: skip
    assert result.returncode == 1 and "sparse does not apply to overlay slots" in result.stderr


def test_a_task_gets_its_sparse_slot_from_itself_or_its_runner_profile(
    necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path
) -> None:
    seen = workdir / "seen"
    seen.mkdir()
    lister = f"ls -d pkg* > {seen}/$NECROD_TASK_ID"
    config = pool_config({"repo": origin}, slots=1, min_idle=0)
    config += f"runners:\n  lister:\n    command: {json.dumps(lister)}\n    sparse: [pkg3]\n"
    d = necrod_factory(config)

    def run(spec: dict[str, Any]) -> list[str]:
        task = d.call("tasks.submit", {"pool": "repo", **spec})
        wait_for(lambda: d.call("tasks.get", {"task_id": task["task_id"]})["state"] == "succeeded", 30,
                 what="the task")  # fmt: skip
        return (seen / task["task_id"]).read_text().split()

    assert run({"command": lister, "sparse": ["pkg2"]}) == ["pkg2"]
    assert run({"runner": "lister"}) == ["pkg3"]
    assert run({"runner": "lister", "sparse": []}) == ["pkg0", "pkg1", "pkg2", "pkg3"]


# --- partial mirrors ---------------------------------------------------------------------------


def big_history(path: Path, commits: int = 6) -> Path:
    """An origin whose history holds many blobs no checkout of main needs."""
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    for c in range(commits):
        for d in ("app", "lib", "docs"):
            for i in range(5):
                f = path / d / f"f{i}.txt"
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_text(f"{d} {i} version {c}\n" * 50)
        (path / "README").write_text(f"readme {c}\n")
        git(path, "add", "-A")
        git(path, "commit", "-q", "-m", f"commit {c}")
    return path


def missing_blobs(mirror: str, *revs: str) -> set[str]:
    listed = git(mirror, "rev-list", "--objects", "--missing=print", *revs)
    return {line[1:] for line in listed.splitlines() if line.startswith("?")}


@pytest.mark.parametrize("kind", [*KINDS, "overlay"])
def test_a_partial_mirror_serves_slots_before_every_blob_is_local(
    necrod_factory: Callable[..., Necrod], workdir: Path, kind: str
) -> None:
    origin = big_history(workdir / "big")
    d = necrod_factory(
        pool_config({"repo": f"file://{origin}"}, slots=1, min_idle=0, isolation=kind, filter="blob:none")
    )
    pool = d.call("pools.get", {"pool": "repo"})
    assert pool["filter"] == "blob:none"
    mirror = pool["mirror"]
    assert git(mirror, "config", "remote.origin.promisor") == "true"
    assert missing_blobs(mirror, "--all"), "a partial mirror has every blob of history"
    assert missing_blobs(mirror, "--no-walk", pool["base_commit"]) == set()
    lease = d.call("slots.allocate", {"pool": "repo"})
    assert (Path(lease["path"]) / "app" / "f0.txt").read_text().startswith("app 0 version 5\n")
    assert in_slot(lease["path"], "status", "--porcelain") == ""
    released_and_clean(d, lease)
    # An older commit's blobs are fetched into the mirror before the checkout needs them.
    old = d.call("slots.allocate", {"pool": "repo", "ref": git(origin, "rev-parse", "main~4")})
    assert (Path(old["path"]) / "lib" / "f1.txt").read_text().startswith("lib 1 version 1\n")
    assert in_slot(old["path"], "status", "--porcelain") == ""
    assert missing_blobs(mirror, "--all"), "only what was checked out was fetched"


def test_a_partial_sparse_pool_fetches_only_its_cones_blobs(
    necrod_factory: Callable[..., Necrod], workdir: Path
) -> None:
    origin = big_history(workdir / "big")
    d = necrod_factory(
        pool_config({"repo": f"file://{origin}"}, slots=1, min_idle=0, filter="blob:none", sparse=["app"])
    )
    pool = d.call("pools.get", {"pool": "repo"})
    mirror, base = pool["mirror"], pool["base_commit"]
    missing = missing_blobs(mirror, "--no-walk", base)
    tree = {line.split()[2]: line.split()[3] for line in git(mirror, "ls-tree", "-r", base).splitlines()}
    assert {tree[oid].split("/")[0] for oid in missing} == {"lib", "docs"}
    lease = d.call("slots.allocate", {"pool": "repo", "sparse": ["docs"]})
    assert tops(lease["path"]) == {"docs"}
    assert {tree[oid].split("/")[0] for oid in missing_blobs(mirror, "--no-walk", base)} == {"lib"}


def test_the_first_clone_reports_its_progress(necrod_factory: Callable[..., Necrod], workdir: Path) -> None:
    origin = big_history(workdir / "big", commits=3)
    d = necrod_factory("pools: {}\n")
    seen: list[dict[str, Any]] = []
    subscribed = threading.Event()

    def watch() -> None:
        with Client(d.socket, timeout=60) as c:
            c.call("events.subscribe", {"topics": ["pools"], "snapshot": False})
            subscribed.set()
            for event in c.events():
                seen.append(event)
                if event["type"] == "pool.progress" and event["stage"] == "slots" and event["percent"] == 100:
                    return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert subscribed.wait(10)
    assert d.config_path is not None
    d.config_path.write_text(pool_config({"repo": f"file://{origin}"}, slots=2, filter="blob:none"))
    d.call("daemon.reload")
    watcher.join(60)
    progress = [e for e in seen if e["type"] == "pool.progress"]
    stages = [e["stage"] for e in progress]
    assert stages[0] == "mirror" and stages[-1] == "slots" and "blobs" in stages
    assert any(e["phase"] == "receiving objects" and e["percent"] == 100 for e in progress)
    assert progress[-1]["done"] == progress[-1]["total"] == 2
    assert all({"pool", "phase", "percent", "done", "total"} <= set(e) for e in progress)
    # Over once the pool is up.
    assert wait_for(
        lambda: d.call("pools.get", {"pool": "repo"})["progress"] is None, 10, what="progress over"
    )


def test_a_reload_moves_idle_slots_onto_a_new_sparse_set(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    d = necrod_factory(pool_config({"repo": origin}, slots=1, min_idle=0, sparse=["pkg1"]))
    assert d.config_path is not None
    d.config_path.write_text(pool_config({"repo": origin}, slots=1, min_idle=0, sparse=["pkg2"]))
    d.call("daemon.reload")
    slot = d.call("slots.list", {"pool": "repo"})["slots"][0]["path"]
    wait_for(lambda: tops(slot) == {"pkg2"} and d.wait_slots("repo", "available", 1), 20, what="the new set")


def ctl(d: Necrod, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "necrod.ctl.main", "--socket", str(d.socket), *args],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip


def test_necroctl_allocate_and_run_take_sparse_and_pools_shows_the_set(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    d = necrod_factory(pool_config({"repo": origin}, slots=1, min_idle=0, sparse=["pkg1"]))
    r = ctl(d, "allocate", "repo", "--sparse", "pkg2", "--sparse", "pkg3", "--json")
    assert r.returncode == 0, r.stderr
    lease = json.loads(r.stdout)
    assert lease["sparse"] == ["pkg2", "pkg3"] and tops(lease["path"]) == {"pkg2", "pkg3"}
    released_and_clean(d, lease)
    r = ctl(d, "run", "--pool", "repo", "--no-sparse", "--", "sh", "-c", "ls -d pkg*")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["pkg0", "pkg1", "pkg2", "pkg3"]
    d.wait_slots("repo", "available", 1)
    r = ctl(d, "run", "--pool", "repo", "--sparse", "pkg0", "--", "sh", "-c", "ls -d pkg*")
    assert r.stdout.split() == ["pkg0"]
    r = ctl(d, "allocate", "repo", "--sparse", "../etc")
    assert r.returncode != 0 and "sparse" in r.stderr
    r = ctl(d, "pools")
    assert r.returncode == 0 and "ready" in r.stdout
