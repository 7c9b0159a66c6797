"""The world around a running daemon changes: its origin goes away and comes back, its pools.yaml
is deleted or truncated. The daemon keeps serving what it has, says what is wrong, loses no
lease, and recovers on its own when things are back."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from necrod.client import Client
from necrod.proto.errors import NecrodError
from tests.helpers import Necrod, commit_file, git, wait_for
from tests.reliability.conftest import FIGURES, daemon_config, slots_by_id, wait_settled

pytestmark = pytest.mark.reliability


def events_of(c: Client, wanted: set[str], timeout: float = 0.5) -> list[dict[str, Any]]:
    return [e for e in c.events(timeout=timeout) if e["type"] in wanted]


@pytest.mark.timeout(180)
def test_an_unreachable_origin_leaves_the_pool_serving_and_it_recovers_when_back(
    necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path
) -> None:
    d = necrod_factory(daemon_config({"repo": origin}, slots=2, max_slots=2, min_idle=0, fetch_interval_s=1))
    first = git(origin, "rev-parse", "HEAD")
    away = workdir / "origin-away"
    with d.client() as watcher, d.client() as c:
        watcher.subscribe(["pools"], snapshot=False)
        held = c.allocate("repo", holder="keeps-working", ttl_s=600)
        origin.rename(away)
        FIGURES["faults injected"] += 1
        try:
            status = wait_for(
                lambda: (s := c.status())["pools"]["repo"]["fetch"] == "failing" and s,
                60,
                what="the fetch to be reported failing",
            )
            assert status["state"] == "degraded"
            assert any("repo fetch: failing since" in reason for reason in status["degraded"])
            # The pool keeps serving at its last good commit: leases, heartbeats, releases, cleanup.
            assert c.heartbeat(held["lease_id"])["slot_id"] == held["slot_id"]
            other = c.allocate("repo", holder="while-away")
            assert other["commit"] == first and git(other["path"], "rev-parse", "HEAD") == first
            (Path(other["path"]) / "work.txt").write_text("made while the origin was away\n")
            c.release(other["lease_id"])
            wait_for(lambda: slots_by_id(d)[other["slot_id"]]["state"] == "available", 30, what="cleanup")
            # A ref it does not have cannot be fetched: a clear error, soon, and the daemon serves on.
            with pytest.raises(NecrodError) as info:
                c.allocate("repo", ref="not-yet-anywhere", wait_s=5)
            assert info.value.kind in ("not_found", "unavailable", "deadline_exceeded")
            assert info.value.kind != "internal"
        finally:
            away.rename(origin)
        moved = commit_file(origin, "README", "moved on while away\n")
        # Back: the next fetch succeeds, the base moves, idle slots follow it.
        wait_for(lambda: c.status()["state"] == "running", 90, what="the daemon to be healthy again")
        wait_for(
            lambda: c.status()["pools"]["repo"]["base_commit"] == moved,
            60,
            what="the base to move to the new commit",
        )
        wait_for(
            lambda: slots_by_id(d)[other["slot_id"]]["commit"] == moved,
            60,
            what="the idle slot to follow the base",
        )
        assert git(other["path"], "rev-parse", "HEAD") == moved
        assert slots_by_id(d)[held["slot_id"]]["lease_id"] == held["lease_id"]
        fetch_events = events_of(watcher, {"pool.fetch", "pool.base"}, timeout=1)
        oks = [e["ok"] for e in fetch_events if e["type"] == "pool.fetch"]
        assert oks[0] is False and oks[-1] is True, fetch_events
        assert any(e["type"] == "pool.base" and e["commit"] == moved for e in fetch_events)
        assert [f["path"] for f in c.salvage_show(other["lease_id"])["files"]] == ["work.txt"]


def test_pool_fetch_events_mark_the_start_of_a_failure_and_the_recovery(
    necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path
) -> None:
    d = necrod_factory(daemon_config({"repo": origin}, slots=1, min_idle=0, fetch_interval_s=1))
    with d.client() as watcher, d.client() as c:
        watcher.subscribe(["pools"], snapshot=False)
        origin.rename(workdir / "away")
        try:
            wait_for(lambda: c.status()["pools"]["repo"]["fetch"] == "failing", 60, what="failing fetches")
            wait_for(lambda: c.pool("repo")["fetch"]["failures"] >= 2, 60, what="two failed fetches")
        finally:
            (workdir / "away").rename(origin)
        wait_for(lambda: c.status()["pools"]["repo"]["fetch"] == "ok", 60, what="the fetch to recover")
        oks = [e["ok"] for e in events_of(watcher, {"pool.fetch"}, timeout=1)]
    assert oks == [False, True]


@pytest.fixture(scope="module")
def config_daemon(module_daemon: Callable[..., Necrod]) -> Necrod:
    return module_daemon(lambda origin: daemon_config({"repo": origin, "other": origin}, slots=1, min_idle=0))


@pytest.fixture
def watched(config_daemon: Necrod) -> Iterator[tuple[Necrod, Client, Client, dict[str, Any]]]:
    """The shared daemon, a subscriber to config and pool events, and a lease that must survive;
    the good pools.yaml is put back afterwards, whatever the test did to it."""
    d = config_daemon
    assert d.config_path is not None
    good = d.config_path.read_text()
    with d.client() as watcher, d.client() as c:
        watcher.subscribe(["config", "pools"], snapshot=False)
        lease = c.allocate("other", holder="keeps-working", ttl_s=600)
        try:
            yield d, c, watcher, lease
        finally:
            if d.config_path.read_text() != good:
                d.config_path.write_text(good)

            def healthy() -> bool:
                status = c.status()
                pools = status["pools"]
                return (
                    status["config"]["last_reload_error"] is None
                    and sorted(pools) == ["other", "repo"]
                    and all(p["state"] == "ready" for p in pools.values())
                )

            wait_for(healthy, 30, what="the good config and both pools back")
            try:
                c.release(lease["lease_id"], salvage=False)
            except NecrodError:
                pass
    for pool in ("repo", "other"):
        wait_settled(d, pool)


def assert_serving_unchanged(d: Necrod, c: Client, lease: dict[str, Any]) -> None:
    status = c.status()
    assert sorted(status["pools"]) == ["other", "repo"]
    assert all(p["state"] == "ready" for p in status["pools"].values()), status["pools"]
    assert c.heartbeat(lease["lease_id"])["slot_id"] == lease["slot_id"]
    fresh = c.allocate("repo", holder="while-broken")
    c.release(fresh["lease_id"], salvage=False)
    d.wait_slots("repo", "available", 1)


def wait_rejected(c: Client, watcher: Client, path: Path, generation: int) -> dict[str, Any]:
    def noticed() -> bool:
        config = c.status()["config"]
        return config["last_reload_error"] is not None or config["generation"] != generation

    wait_for(noticed, 30, what="the bad config to be noticed")
    status = c.status()
    assert status["config"]["generation"] == generation, f"the bad config was applied: {status['pools']}"
    error = status["config"]["last_reload_error"]
    assert error["file"] == str(path), error
    assert status["state"] == "degraded" and any("config rejected" in r for r in status["degraded"])
    rejected = events_of(watcher, {"config.rejected"}, timeout=1)
    assert rejected and rejected[0]["file"] == str(path)
    assert not events_of(watcher, {"pool.draining", "pool.removed"}, timeout=0.1)
    return error  # type: ignore[no-any-return]


def wait_recovered(c: Client) -> None:
    wait_for(
        lambda: c.status()["config"]["last_reload_error"] is None, 30, what="the good config to be applied"
    )
    assert c.status()["state"] == "running"


def test_a_config_file_deleted_while_running_changes_nothing(
    watched: tuple[Necrod, Client, Client, dict[str, Any]],
) -> None:
    d, c, watcher, lease = watched
    assert d.config_path is not None
    good = d.config_path.read_text()
    generation = c.status()["config"]["generation"]
    d.config_path.unlink()
    FIGURES["faults injected"] += 1
    error = wait_rejected(c, watcher, d.config_path, generation)
    assert "no such file" in error["message"]
    assert_serving_unchanged(d, c, lease)
    # An explicit reload says the same, and changes nothing either.
    with pytest.raises(NecrodError) as info:
        c.reload()
    assert info.value.kind == "failed_precondition"
    d.config_path.write_text(good)
    wait_recovered(c)
    assert_serving_unchanged(d, c, lease)


@pytest.mark.parametrize(
    "cut",
    [
        pytest.param(lambda text: "", id="empty"),
        pytest.param(lambda text: text[: text.index("pools:")], id="before-pools"),
        pytest.param(
            lambda text: text[: text.index("pools:") + len("pools:\n")],
            id="pools-header-only",
        ),
        pytest.param(lambda text: text[: text.index("repo_url") + 5], id="mid-key"),
        pytest.param(lambda text: text[: len(text) // 2], id="half"),
        pytest.param(lambda text: text[: text.rindex("repo_url") + len("repo_url: ") + 4], id="mid-url"),
        pytest.param(lambda text: text[:-3], id="last-bytes-lost"),
        pytest.param(lambda text: "\0" * len(text), id="zeroed"),
    ],
)
def test_a_config_file_truncated_while_running_changes_nothing(
    watched: tuple[Necrod, Client, Client, dict[str, Any]], cut: Callable[[str], str]
) -> None:
    d, c, watcher, lease = watched
    assert d.config_path is not None
    good = d.config_path.read_text()
    bad = cut(good)
    assert bad != good
    generation = c.status()["config"]["generation"]
    with open(d.config_path, "r+") as f:  # in place, as a crashed writer would leave it
        f.truncate(0)
        f.write(bad)
    FIGURES["faults injected"] += 1
    wait_rejected(c, watcher, d.config_path, generation)
    assert_serving_unchanged(d, c, lease)
    d.config_path.write_text(good)
    wait_recovered(c)
    assert_serving_unchanged(d, c, lease)
