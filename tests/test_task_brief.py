"""A task's brief view (``tasks.list``) is encoded once and kept until the task changes: whatever
is assigned to a task, the listing never shows it stale (issue 22)."""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

from necrod.core.taskindex import TaskIndex
from necrod.core.tasks import Attempt, Task, TaskState
from necrod.daemon.tasks.taskbook import TaskBook
from necrod.proto.jsonrpc import dump_json, encode_result

#: A new value for every field of a task, each different from the one ``task()`` gives. A field
#: added to ``Task`` fails ``test_every_field_has_a_change_here`` until it is listed here.
CHANGES: dict[str, Any] = {
    "task_id": "t-99", "seq": 99, "pool": "other", "submitted_at": 5.5, "runner": "r2",
    "command": ["false"], "payload": {"n": 2}, "priority": 7, "labels": ["x", "y"], "skills": ["go"],
    "depends_on": ["t-3"], "max_retries": 4, "timeout_s": 60.0, "env": {"B": "2"}, "ref": "v2",
    "branch": "b2", "sparse": ["lib"], "project": "p2", "batch": "b-9", "key": "k2",
    "failure_strategy": "retry", "state": TaskState.FAILED, "waiting_on": "slot",
    "reason": "attempt 1 failed: exit 3", "retries_used": 1, "next_attempt_at": 123.0,
    "finished_at": 9.5, "attempts": [Attempt(1, 8.0, "r", "process"), Attempt(2, 8.5, "r", "process")],
    "uid": 1001, "cancelled_by": {"uid": 0, "pid": 12, "client": "necroctl"}, "cancel_reason": "stop",
    "resume": "salvage", "non_admin": True,
}  # fmt: skip


def task() -> Task:
    t = Task("t-2", 2, "repo", 1.25, runner="r", command=["true"], payload={"n": 1}, labels=["a"],
             depends_on=["t-1"], env={"A": "1"}, batch="b-1", key="k", uid=1000)  # fmt: skip
    t.waiting_on = "capacity"
    t.cancelled_by, t.cancel_reason = {"uid": 1000, "pid": 1, "client": "c"}, "why"
    t.attempts = [Attempt(1, 3.0, "r", "process", ended_at=4.0, exit_code=1)]
    return t


def fresh(t: Task) -> bytes:
    return dump_json(t.view(brief=True))


def test_every_field_has_a_change_here() -> None:
    assert {f.name for f in fields(Task)} - {"_brief"} == set(CHANGES)


def test_assigning_any_field_drops_the_cached_brief_view() -> None:
    shown = set()
    for name, value in CHANGES.items():
        for state in (TaskState.QUEUED, TaskState.RUNNING):  # waiting_on shows only while queued
            t = task()
            t.state = state
            before = t.brief_json()
            assert t.brief_json() is before  # kept while nothing changes
            setattr(t, name, value)
            assert t.brief_json() == fresh(t), name
            if t.brief_json() != before:
                shown.add(name)
    # The changes above reach every key a brief view has: each was seen to change the listing.
    assert shown >= {"task_id", "state", "pool", "runner", "priority", "labels", "depends_on", "batch", "key",
                     "waiting_on", "reason", "submitted_at", "finished_at", "retries_used", "max_retries",
                     "attempts", "uid", "cancelled_by", "cancel_reason", "next_attempt_at"}  # fmt: skip


def test_an_attempt_appended_in_place_is_listed() -> None:
    t = task()
    t.state = TaskState.RUNNING
    before = json.loads(t.brief_json())
    t.attempts.append(Attempt(2, 7.0, "r", "process"))
    after = json.loads(t.brief_json())
    assert (before["attempts"], before["started_at"]) == (1, 3.0)
    assert (after["attempts"], after["started_at"]) == (2, 7.0)
    assert t.brief_json() == fresh(t)


def test_the_index_changing_a_state_drops_it_too() -> None:
    index = TaskIndex()
    a, b = Task("t-1", 1, "repo", 0.0), Task("t-2", 2, "repo", 0.0, depends_on=["t-1"])
    index.add([a, b])
    assert json.loads(b.brief_json())["waiting_on"] == "dependencies"
    index.set_state(a, TaskState.SUCCEEDED)  # b becomes ready: its waiting_on is cleared
    assert json.loads(a.brief_json())["state"] == "succeeded"
    assert json.loads(b.brief_json())["waiting_on"] is None and b.brief_json() == fresh(b)


def test_a_brief_view_is_the_same_for_every_peer() -> None:
    """One cached encoding serves owners and others: a brief view holds nothing of the owner's."""
    t = task()
    assert t.view(brief=True, owner=False) == t.view(brief=True)
    assert not {"env", "payload", "command"} & set(t.view(brief=True))


def test_what_orjson_refuses_is_still_listed() -> None:
    """A reason carrying an undecodable file name (a lone surrogate) is encoded as the stdlib
    would, not dropped and not a failed listing."""
    t = task()
    t.reason = "could not start: bad\udcff.sh"
    assert json.loads(t.brief_json())["reason"] == "could not start: bad\udcff.sh"


def test_rows_hold_no_cache_and_load_back_the_same() -> None:
    t = task()
    t.brief_json()
    row = t.to_row()
    assert "_brief" not in row and list(row)[:3] == ["task_id", "seq", "pool"]
    back = Task.from_row(json.loads(json.dumps(row)))
    assert back == t and back.brief_json() == t.brief_json()


def test_the_listing_is_the_json_array_of_the_brief_views() -> None:
    tasks = [task(), Task("t-3", 3, "repo", 2.0)]
    for listed in ([], tasks[:1], tasks):
        reply = json.loads(encode_result(1, {"tasks": TaskBook.briefs(listed)}))
        assert reply["result"]["tasks"] == [t.view(brief=True) for t in listed]
