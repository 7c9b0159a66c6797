"""The background side: fetching, live config, self-healing, the disk guard, metrics."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from necrod.proto.errors import ResourceExhausted
from tests.helpers import Necrod, commit_file, delete_slot, git, pool_config, wait_for

pytestmark = pytest.mark.usefixtures("slot_kind")


def pool_view(d: Necrod, name: str) -> dict[str, Any]:
    return next(p for p in d.call("pools.list")["pools"] if p["name"] == name)


def test_a_pushed_commit_reaches_idle_slots_within_one_interval(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    d = necrod_factory(pool_config({"repo": origin}, slots=3, min_idle=0, fetch_interval_s=2))
    with d.client() as c:
        held = c.allocate("repo")
        old = held["commit"]
        new = commit_file(origin, "fresh.txt", "fresh\n")
        wait_for(lambda: pool_view(d, "repo")["base_commit"] == new, 10, what="the fetch to see the commit")
        wait_for(lambda: all(s["commit"] == new for s in c.slots("repo", "available")["slots"]), 10,
                 what="idle slots to move")  # fmt: skip
        moved = c.allocate("repo")
        assert moved["commit"] == new and (Path(moved["path"]) / "fresh.txt").exists()
        assert git(moved["path"], "status", "--porcelain") == ""
        # The held slot was left alone ...
        assert (
            git(held["path"], "rev-parse", "HEAD") == old and not (Path(held["path"]) / "fresh.txt").exists()
        )
        # ... and comes back at the new base once released.
        c.release(held["lease_id"])
        wait_for(lambda: next(s for s in c.slots("repo")["slots"] if s["slot_id"] == held["slot_id"])["commit"]
                 == new and True, 10, what="the released slot at the new base")  # fmt: skip


def test_one_fetch_per_pool_whatever_the_number_of_slots(
    necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path
) -> None:
    other = workdir / "other-origin"
    shutil.copytree(origin, other)
    config = (
        "pools:\n"
        f"  small:\n    repo_url: {origin}\n    slots: 1\n    min_idle: 0\n    fetch_interval_s: 1\n"
        f"  large:\n    repo_url: {other}\n    slots: 6\n    min_idle: 0\n    fetch_interval_s: 1\n"
    )
    d = necrod_factory(config)
    with d.client() as c:
        before = c.status()["git"]["started_by_verb"].get("fetch", 0)
        start = {p["name"]: p["fetch"]["fetches"] for p in c.pools()["pools"]}
        time.sleep(6)
        after = c.status()["git"]["started_by_verb"].get("fetch", 0)
        end = {p["name"]: p["fetch"]["fetches"] for p in c.pools()["pools"]}
    per_pool = {name: end[name] - start[name] for name in end}
    # One fetch per pool per interval (±1 for jitter and the window's edges), not one per slot.
    assert 3 <= per_pool["small"] <= 8 and 3 <= per_pool["large"] <= 8, per_pool
    assert abs(per_pool["large"] - per_pool["small"]) <= 2, per_pool
    # git's count grows when a fetch starts, a pool's when it ends: a fetch under way at either
    # edge of the window is in one count and not the other (one per pool at most, each pool
    # fetches one at a time; a loaded machine makes fetches long enough to straddle an edge).
    assert abs((after - before) - sum(per_pool.values())) <= len(per_pool), (after - before, per_pool)


def test_an_unreachable_origin_is_reported_and_allocation_goes_on(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    d = necrod_factory(pool_config({"repo": origin}, slots=2, min_idle=0, fetch_interval_s=1))
    hidden = origin.with_name("origin-away")
    origin.rename(hidden)
    try:
        with d.client() as c:
            status = wait_for(lambda: c.status() if c.status()["state"] == "degraded" else None, 20,
                              what="a degraded status")  # fmt: skip
            assert any("fetch: failing since" in r for r in status["degraded"])
            assert pool_view(d, "repo")["fetch"]["state"] == "failing"
            lease = c.allocate("repo")
            assert (Path(lease["path"]) / "README").exists()
            c.release(lease["lease_id"])
    finally:
        hidden.rename(origin)
    with d.client() as c:
        wait_for(lambda: c.status()["state"] == "running", 30, what="fetching to recover")
        assert pool_view(d, "repo")["fetch"]["state"] == "ok"


def test_pools_yaml_changes_apply_without_a_restart(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    d = necrod_factory(pool_config({"repo": origin}, slots=2, min_idle=0))
    assert d.config_path is not None
    # Add a pool and grow the first, just by writing the file.
    d.config_path.write_text(pool_config({"repo": origin, "extra": origin}, slots=3, min_idle=0))
    wait_for(lambda: "extra" in d.call("daemon.status")["pools"], 20, what="the new pool")
    d.wait_slots("repo", "available", 3)
    d.wait_slots("extra", "available", 3)
    # Shrink: idle slots go.
    d.config_path.write_text(pool_config({"repo": origin, "extra": origin}, slots=1, min_idle=0))
    wait_for(lambda: len(d.call("slots.list", {"pool": "repo"})["slots"]) == 1, 20, what="repo to shrink")
    wait_for(lambda: len(d.call("slots.list", {"pool": "extra"})["slots"]) == 1, 20, what="extra to shrink")
    # Remove a pool: it drains and goes.
    d.config_path.write_text(pool_config({"repo": origin}, slots=1, min_idle=0))
    wait_for(lambda: "extra" not in d.call("daemon.status")["pools"], 20, what="the removed pool to go")
    status = d.call("daemon.status")
    assert status["config"]["generation"] == 4 and status["config"]["last_reload_error"] is None


def test_an_invalid_file_changes_nothing_and_is_reported_with_its_line(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    d = necrod_factory(pool_config({"repo": origin}, slots=2, min_idle=0))
    assert d.config_path is not None
    good = d.config_path.read_text()
    bad = good.replace("slots: 2", "slots: 2\n  colour: blue")
    d.config_path.write_text(bad)
    status = wait_for(lambda: (s := d.call("daemon.status"))["config"]["last_reload_error"] and s, 20,
                      what="the rejection")  # fmt: skip
    error = status["config"]["last_reload_error"]
    assert (
        error["line"] == bad.splitlines().index("  colour: blue") + 1
        and "unknown key 'colour'" in error["message"]
        and error["file"] == str(d.config_path)
    )
    assert status["state"] == "degraded" and status["config"]["generation"] == 1
    assert len(d.call("slots.list")["slots"]) == 2
    # Truncated, then deleted: still the old config, still reported.
    d.config_path.write_text("")
    wait_for(lambda: "empty" in (d.call("daemon.status")["config"]["last_reload_error"] or {}).get("message", ""),
             20, what="the empty file to be rejected")  # fmt: skip
    d.config_path.unlink()
    wait_for(lambda: "no such file" in (d.call("daemon.status")["config"]["last_reload_error"] or {}).get(
        "message", ""), 20, what="the missing file to be rejected")  # fmt: skip
    d.config_path.write_text(good.replace("slots: 2", "slots: 3"))
    wait_for(lambda: d.call("daemon.status")["config"]["last_reload_error"] is None, 20, what="recovery")
    d.wait_slots("repo", "available", 3)


def test_a_configmap_style_symlink_swap_is_seen(necrod_factory: Callable[..., Necrod], origin: Path) -> None:
    d = necrod_factory(start=False)
    cfg = d.root / "configmap"
    (cfg / "..2026_11_23_01").mkdir(parents=True)
    (cfg / "..2026_11_23_01" / "pools.yaml").write_text(pool_config({"repo": origin}, slots=1, min_idle=0))
    (cfg / "..data").symlink_to("..2026_11_23_01")
    (cfg / "pools.yaml").symlink_to("..data/pools.yaml")
    d.config_path = cfg / "pools.yaml"
    d.start()
    (cfg / "..2026_11_23_02").mkdir()
    (cfg / "..2026_11_23_02" / "pools.yaml").write_text(pool_config({"repo": origin}, slots=2, min_idle=0))
    (cfg / "..data_tmp").symlink_to("..2026_11_23_02")
    os.rename(cfg / "..data_tmp", cfg / "..data")
    shutil.rmtree(cfg / "..2026_11_23_01")
    d.wait_slots("repo", "available", 2)
    assert d.call("daemon.status")["config"]["generation"] == 2


def anomalies(d: Necrod, **kw: Any) -> list[dict[str, Any]]:
    return d.call("anomalies.list", kw)["anomalies"]  # type: ignore[no-any-return]


def kinds(found: list[dict[str, Any]]) -> set[str]:
    return {a["kind"] for a in found}


def test_corruption_is_detected_and_healed(
    necrod_factory: Callable[..., Necrod], origin: Path, slot_kind: str
) -> None:
    d = necrod_factory(pool_config({"repo": origin}, slots=5, max_slots=5, min_idle=0, fetch_interval_s=0))
    slots = d.wait_slots("repo", "available", 5)
    paths = {s["slot_id"]: Path(s["path"]) for s in slots}
    mirror = Path(pool_view(d, "repo")["mirror"])

    def git_dir(n: int) -> Path:
        return mirror / "worktrees" / str(n) if slot_kind == "worktree" else paths[f"repo/{n}"] / ".git"

    assert anomalies(d, deep=True) == []
    # 1: directory gone; 2: its pointer to the mirror broken; 3: git status fails; 4: index.lock
    # with no git.
    delete_slot(paths["repo/1"])
    if slot_kind == "worktree":
        (paths["repo/2"] / ".git").write_text("gitdir: /nowhere\n")
    else:
        (paths["repo/2"] / ".git" / "objects" / "info" / "alternates").write_text("/nowhere\n")
    (git_dir(3) / "index").write_bytes(b"garbage, not an index")
    (git_dir(4) / "index.lock").write_text("")
    # 5: an idle slot written to.
    (paths["repo/5"] / "stray.txt").write_text("someone wrote here after release\n")
    # Things no slot owns, and a stale lock in the mirror.
    (paths["repo/1"].parent / "junk").mkdir()
    (mirror / "packed-refs.lock").write_text("")
    found = anomalies(d, deep=True)
    by_kind = {(a["kind"], a["slot_id"]) for a in found}
    assert ("slot_broken", "repo/1") in by_kind
    assert ("status_failed", "repo/3") in by_kind
    assert ("stale_lock", "repo/4") in by_kind
    assert ("dirty_while_idle", "repo/5") in by_kind
    assert {"unknown_directory", "stale_mirror_lock"} <= kinds(found)
    # The .git file of slot 2 is restored before any git runs there (tamper protection), so it
    # reads as healthy to git; its pointer is fixed by the next git operation in the slot.
    assert all(a["action"] is None for a in found)
    healed = d.call("anomalies.list", {"heal": True, "deep": True})["anomalies"]
    assert {a["action"] for a in healed} - {None}
    d.wait_slots("repo", "available", 5, timeout=60)
    for slot in d.call("slots.list", {"pool": "repo"})["slots"]:
        assert git(slot["path"], "status", "--porcelain", "--untracked-files=all") == "", slot["slot_id"]
    assert not (mirror / "packed-refs.lock").exists()
    assert not (paths["repo/1"].parent / "junk").exists() and list((mirror.parent / "orphans").iterdir())
    assert "stray.txt" in {f["path"] for s in d.call("salvage.list")["salvage"]
                           for f in d.call("salvage.show", {"lease_id": s["lease_id"]})["files"]}  # fmt: skip
    wait_for(lambda: anomalies(d, deep=True) == [], 30, what="a clean scan")


def test_a_mirror_missing_an_object_is_refetched(necrod_factory: Callable[..., Necrod], origin: Path) -> None:
    d = necrod_factory(pool_config({"repo": origin}, slots=1, min_idle=0, fetch_interval_s=0))
    mirror = Path(pool_view(d, "repo")["mirror"])
    blob = git(mirror, "rev-parse", "HEAD~0:README" if False else "refs/remotes/origin/main:README")
    loose = mirror / "objects" / blob[:2] / blob[2:]
    if not loose.exists():
        pytest.skip("the mirror's objects are packed; this test needs a loose object to remove")
    loose.unlink()
    found = anomalies(d, deep=True)
    assert "mirror_objects_missing" in kinds(found)
    healed = d.call("anomalies.list", {"heal": True, "deep": True})["anomalies"]
    assert next(a for a in healed if a["kind"] == "mirror_objects_missing")["action"] == "refetched"
    assert git(mirror, "cat-file", "-t", blob) == "blob"


def test_recover_and_isolate(necrod: Necrod) -> None:
    with necrod.client() as c:
        idle = c.slots("repo", "available")["slots"][0]
        isolated = c.isolate(idle["slot_id"], "looks odd")
        assert isolated["state"] == "error" and "looks odd" in isolated["error"]
        held = c.allocate("repo", wait_s=10)
        (Path(held["path"]) / "evidence.txt").write_text("keep me as I am\n")
        assert c.isolate(held["slot_id"], "agent misbehaved")["state"] == "allocated"
        c.release(held["lease_id"])
        wait_for(lambda: next(s for s in c.slots("repo")["slots"] if s["slot_id"] == held["slot_id"])["state"]
                 == "error", what="the isolated slot to be quarantined")  # fmt: skip
        assert (Path(held["path"]) / "evidence.txt").exists()  # untouched, for inspection
        assert "quarantined" in kinds(c.anomalies()["anomalies"])
        recovered = c.recover(held["slot_id"])
        assert recovered["state"] == "available" and not (Path(held["path"]) / "evidence.txt").exists()
        assert [f["path"] for f in c.salvage_show(held["lease_id"])["files"]] == ["evidence.txt"]
        assert c.recover(idle["slot_id"])["state"] == "available"


def test_the_disk_guard(necrod_factory: Callable[..., Necrod], origin: Path) -> None:
    pools = pool_config({"repo": origin}, slots=2, min_idle=1, max_slots=4)
    d = necrod_factory("daemon:\n  disk_check_interval_s: 1\n" + pools)
    assert d.config_path is not None
    with d.client() as c:
        leases = [c.allocate("repo"), c.allocate("repo")]
        wait_for(
            lambda: len(c.slots("repo", "available")["slots"]) == 1, 20, what="min_idle to cut a third slot"
        )
        for lease in leases:
            c.release(lease["lease_id"])
        d.wait_slots("repo", "available", 3)  # one above the baseline of 2
        d.config_path.write_text("daemon:\n  min_free_disk: 100000TiB\n  disk_check_interval_s: 1\n" + pools)
        status = wait_for(
            lambda: (s := c.status())["state"] == "degraded" and s, 30, what="a degraded status"
        )
        assert any(r.startswith("disk:") for r in status["degraded"]) and status["disk"]["low"] is True
        # Idle slots above the baseline go; none are cut, whatever min_idle wants.
        wait_for(lambda: len(c.slots("repo")["slots"]) == 2, 20, what="the extra idle slot to go")
        with pytest.raises(ResourceExhausted, match="min_free_disk"):
            c.add_slot("repo")
        first = c.allocate("repo")  # clean slots are still handed out
        second = c.allocate("repo")
        time.sleep(1.5)
        assert len(c.slots("repo")["slots"]) == 2
        c.release(first["lease_id"])
        c.release(second["lease_id"])
        d.config_path.write_text("daemon:\n  disk_check_interval_s: 1\n" + pools)
        wait_for(lambda: c.status()["state"] == "running", 30, what="the guard to lift")


def test_idle_slots_above_the_baseline_are_removed(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    d = necrod_factory(pool_config({"repo": origin}, slots=1, min_idle=1, max_slots=3, idle_timeout_s=1))
    with d.client() as c:
        first = c.allocate("repo")
        wait_for(lambda: len(c.slots("repo", "available")["slots"]) == 1, 20, what="a pre-warmed slot")
        second = c.allocate("repo")  # never waits: min_idle kept one ready
        wait_for(lambda: len(c.slots("repo")["slots"]) == 3, 20, what="the pool to grow to max_slots")
        c.release(first["lease_id"])
        c.release(second["lease_id"])
        wait_for(lambda: len(c.slots("repo")["slots"]) == 1, 30, what="idle extra slots to go")


def test_metrics_parse_as_prometheus_text(necrod: Necrod) -> None:
    with necrod.client() as c:
        lease = c.allocate("repo")
        c.release(lease["lease_id"])
        necrod.wait_slots("repo", "available", 2)
        text = c.metrics()["text"]
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("necrod_slots", "necrod_allocations", "necrod_allocation_seconds", "necrod_cleanup_seconds",
                 "necrod_waiting_allocations", "necrod_git_processes", "necrod_fetch_failures",
                 "necrod_lease_expiries", "necrod_config_reloads", "necrod_fetch_seconds"):  # fmt: skip
        assert name in families, name
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples
    }
    assert samples[("necrod_allocations_total", (("pool", "repo"),))] == 1
    assert samples[("necrod_slots", (("pool", "repo"), ("state", "available")))] == 2
    assert samples[("necrod_cleanup_seconds_count", (("pool", "repo"),))] == 1


def test_metrics_over_http(necrod_factory: Callable[..., Necrod], origin: Path) -> None:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = necrod_factory(f"daemon:\n  metrics_listen: 127.0.0.1:{port}\n" + pool_config({"repo": origin}))
    assert d.proc is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        body = reply.read().decode()
        assert reply.headers["Content-Type"].startswith("text/plain")
    assert any(f.name == "necrod_slots" for f in text_string_to_metric_families(body))


def test_overdue_leases_are_reported_or_ended(necrod_factory: Callable[..., Necrod], origin: Path) -> None:
    d = necrod_factory(pool_config({"repo": origin}, slots=2, min_idle=0, max_lease_s=1))
    assert d.config_path is not None
    with d.client() as c:
        lease = c.allocate("repo", ttl_s=600)
        time.sleep(1.5)
        found = c.anomalies(heal=True)["anomalies"]
        overdue = next(a for a in found if a["kind"] == "lease_overdue")
        assert overdue["slot_id"] == lease["slot_id"] and overdue["action"] is None  # reported only
        assert c.heartbeat(lease["lease_id"])["lease_id"] == lease["lease_id"]
        d.config_path.write_text(
            "daemon:\n  release_overdue_leases: true\n  heal_interval_s: 1\n"
            + pool_config({"repo": origin}, slots=2, min_idle=0, max_lease_s=1)
        )
        wait_for(lambda: c.status()["config"]["generation"] == 2, 20, what="the reload")
        with pytest.raises(Exception, match="overdue"):
            wait_for(lambda: c.heartbeat(lease["lease_id"]) and False, 20, what="the lease to be ended")
