"""``tasks.list`` over the real socket shows every task as ``tasks.get`` does, at every step of
its life (issue 22 keeps each task's brief view encoded until the task changes: a stale one
would show here), in submission order, after a restart too."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.helpers import Necrod, wait_for
from tests.test_dispatcher import config, profile, submit, task, wait_state

#: What ``tasks.get`` shows and a brief view does not (``attempts`` is a count there).
FULL_ONLY = {"command", "payload", "skills", "project", "timeout_s", "env", "ref", "branch", "sparse",
             "failure_strategy", "resume", "dependents"}  # fmt: skip


def brief(full: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in full.items() if k not in FULL_ONLY}
    out["attempts"] = len(full["attempts"])
    return out


def assert_listed_as_they_are(d: Necrod) -> list[dict[str, Any]]:
    """tasks.list against each task's tasks.get, read while nothing changed in between."""

    def steady() -> list[dict[str, Any]] | None:
        listed = d.call("tasks.list")["tasks"]
        ids = [t["task_id"] for t in listed]
        before = [task(d, i) for i in ids]
        again = d.call("tasks.list")["tasks"]
        after = [task(d, i) for i in ids]
        return listed if before == after and listed == again else None

    listed = wait_for(steady, 20, what="the tasks to hold still")
    assert listed == [brief(task(d, t["task_id"])) for t in listed]
    assert [int(t["task_id"][2:]) for t in listed] == sorted(int(t["task_id"][2:]) for t in listed)
    return listed  # type: ignore[no-any-return]


def release(gate: Path, code: int) -> None:
    """Let the runners end with ``code``, written whole (a runner may read it at once)."""
    tmp = gate.with_suffix(".tmp")
    tmp.write_text(str(code))
    os.replace(tmp, gate)


def test_the_listing_follows_each_change_of_a_task(
    necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path
) -> None:
    gate = workdir / "gate"
    script = f"while [ ! -e {gate} ]; do sleep 0.05; done; exit $(cat {gate})"
    d = necrod_factory(config(origin, runners=profile("p", script, grace_s=1),
                              dispatcher="  max_running: 1\n  retry_backoff_s: 30\n"))  # fmt: skip
    batch = d.call("tasks.submit", {"pool": "repo", "runner": "p", "labels": ["l1"], "tasks": [
        {"key": "a", "max_retries": 1}, {"key": "b", "depends_on": ["a"]}]})  # fmt: skip
    a, b = (t["task_id"] for t in batch["tasks"])
    c = submit(d, pool="repo", runner="p", priority=-5)
    wait_state(d, a, "running")
    listed = assert_listed_as_they_are(d)
    assert [t["state"] for t in listed] == ["running", "queued", "queued"] and listed[0]["attempts"] == 1
    assert listed[1]["waiting_on"] == "dependencies" and listed[2]["waiting_on"] == "capacity"

    d.call("tasks.update", {"task_id": c, "priority": 3, "labels": ["x"]})
    assert assert_listed_as_they_are(d)[2]["labels"] == ["x"]
    d.call("tasks.cancel", {"task_id": c, "reason": "not now"})
    listed = assert_listed_as_they_are(d)
    assert listed[2]["state"] == "cancelled" and listed[2]["cancel_reason"] == "not now"

    release(gate, 1)  # a's first attempt fails: back in the queue, in backoff
    wait_for(
        lambda: (t := task(d, a))["state"] == "queued" and t["retries_used"] == 1, 20, what=f"{a} to back off"
    )
    listed = assert_listed_as_they_are(d)
    assert listed[0]["waiting_on"] == "backoff" and listed[0]["next_attempt_at"] and listed[0]["reason"]

    release(gate, 0)
    d.call("tasks.cancel", {"task_id": a})  # blocks b
    assert [t["state"] for t in assert_listed_as_they_are(d)] == ["cancelled", "blocked", "cancelled"]
    d.call("tasks.retry", {"batch": batch["batch"]})
    wait_state(d, b, "succeeded")
    d.call("tasks.retry", {"task_id": c})
    wait_state(d, c, "succeeded")
    listed = assert_listed_as_they_are(d)
    assert [(t["state"], t["attempts"]) for t in listed] == [
        ("succeeded", 2),
        ("succeeded", 1),
        ("succeeded", 1),
    ]


def test_the_listing_is_in_submission_order_after_a_restart(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    d = necrod_factory(config(origin, runners=profile("p", "true")))
    d.call("runners.pause", {"runner": "p"})
    ids = [submit(d, pool="repo", runner="p") for _ in range(12)]
    # Rewriting a row moves it in the state store: it no longer loads in submission order.
    d.call("tasks.update", {"task_id": ids[1], "priority": 2})
    before = assert_listed_as_they_are(d)
    assert d.terminate() == 0
    d.start()
    after = assert_listed_as_they_are(d)
    assert [t["task_id"] for t in after] == ids and after == before
    assert [t["task_id"] for t in d.call("tasks.list", {"state": "queued"})["tasks"]] == ids
