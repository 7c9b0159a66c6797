"""Finished tasks beyond ``keep_finished`` are forgotten, oldest first, never one a waiting task
still depends on (the task index keeps them in the order they ended, issue 22)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from necrod.proto.errors import NotFound
from tests.helpers import Necrod, wait_for
from tests.test_dispatcher import config, profile, wait_state


def test_the_oldest_finished_go_first_and_a_needed_dependency_stays(
    necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path
) -> None:
    gate = workdir / "go"
    runners = profile("ok", "true", max_concurrency=1) + profile(
        "wait", f"while [ ! -e {gate} ]; do sleep 0.1; done"
    )
    d = necrod_factory(config(origin, slots=2, runners=runners, dispatcher="  keep_finished: 2\n"))
    with d.client() as c:
        first = c.call("tasks.submit", {"pool": "repo", "runner": "ok"})["task_id"]
        wait_state(d, first, "succeeded")
        # A chain whose head finishes early but whose tail waits on a runner still going.
        submitted = c.call("tasks.submit", {"pool": "repo", "tasks": [
            {"key": "head", "runner": "ok"}, {"key": "mid", "runner": "wait", "depends_on": ["head"]},
            {"key": "tail", "runner": "ok", "depends_on": ["mid"]},
        ]})  # fmt: skip
        head, mid, tail = (t["task_id"] for t in submitted["tasks"])
        wait_state(d, head, "succeeded")
        wait_state(d, mid, "running")
        later = [c.call("tasks.submit", {"pool": "repo", "runner": "ok"})["task_id"] for _ in range(3)]
        for tid in later:
            wait_state(d, tid, "succeeded")
        # Five tasks finished (first, head, later): keep 2. The oldest went; head stays, mid
        # (running) still depends on it.
        wait_for(lambda: d.call("daemon.status")["dispatcher"]["tasks"]["succeeded"] <= 3, what="a prune")
        try:
            c.call("tasks.get", {"task_id": first})
            raise AssertionError(f"{first}, the oldest finished, was kept")
        except NotFound:
            pass
        assert c.call("tasks.get", {"task_id": head})["state"] == "succeeded"
        assert c.call("tasks.get", {"task_id": later[-1]})["state"] == "succeeded"
        counts = d.call("daemon.status")["dispatcher"]["tasks"]
        assert counts["running"] == 1 and counts["blocked"] == 0 and counts["queued"] == 1, counts
        listed = c.call("tasks.list", {"batch": submitted["batch"]})["tasks"]
        assert [t["task_id"] for t in listed] == [head, mid, tail]
        gate.touch()
        wait_state(d, tail, "succeeded")
