"""The index of ready tasks always agrees with the definition it caches."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from necrod.core.taskindex import TaskIndex
from necrod.core.tasks import FINISHED, Task, TaskState


def task(n: int, *deps: int) -> Task:
    return Task(f"t-{n}", n, "repo", 0.0, depends_on=[f"t-{d}" for d in deps], batch=f"b-{n % 3}")


def truly_ready(index: TaskIndex) -> set[str]:
    """The definition: queued, and every dependency still known has succeeded."""
    return {
        t.task_id
        for t in index.tasks.values()
        if t.state is TaskState.QUEUED
        and all(index.tasks[d].state is TaskState.SUCCEEDED for d in t.depends_on if d in index.tasks)
    }


def test_a_batch_may_name_a_later_member_as_a_dependency() -> None:
    index = TaskIndex()
    later, first = task(2), task(1, 2)  # t-1 depends on t-2, listed after it
    index.add([first, later])
    assert set(index.ready) == {"t-2"}
    assert first.waiting_on == "dependencies"


def test_success_readies_dependents_and_failure_does_not() -> None:
    index = TaskIndex()
    a, b, c = task(1), task(2, 1), task(3, 1)
    index.add([a, b, c])
    index.set_state(a, TaskState.RUNNING)
    assert set(index.ready) == set()
    index.set_state(a, TaskState.FAILED)
    assert set(index.ready) == set()
    index.set_state(a, TaskState.QUEUED)  # retried
    index.set_state(a, TaskState.SUCCEEDED)
    assert set(index.ready) == {"t-2", "t-3"}
    assert b.waiting_on is None


def test_a_pruned_dependency_counts_as_done() -> None:
    index = TaskIndex()
    a, b = task(1), task(2, 1)
    index.add([a, b])
    index.set_state(a, TaskState.CANCELLED)
    index.set_state(b, TaskState.BLOCKED)
    index.remove("t-1")
    assert "t-1" not in index.tasks and set(index.ready) == set()
    index.set_state(b, TaskState.QUEUED)
    assert set(index.ready) == {"t-2"}


def assert_bookkeeping(index: TaskIndex) -> None:
    """The finished tasks, the counts per state and the batches agree with the tasks."""
    tasks = index.tasks.values()
    assert set(index.finished) == {t.task_id for t in tasks if t.state in FINISHED}
    assert +index.counts == Counter(t.state for t in tasks)
    batches: dict[str, list[str]] = {}
    for t in tasks:
        if t.batch is not None:
            batches.setdefault(t.batch, []).append(t.task_id)
    assert {b: sorted(ids) for b, ids in batches.items()} == {b: sorted(m) for b, m in index.batches.items()}
    # Listings walk these without sorting: both stay in submission order.
    for members in (index.tasks, *index.batches.values()):
        assert [t.seq for t in members.values()] == sorted(t.seq for t in members.values())


def test_tasks_and_batches_iterate_in_submission_order_however_added() -> None:
    index = TaskIndex()
    index.add([task(5), task(3, 5)])  # a batch naming a later member, added as it came
    index.add([task(9)])
    index.add([task(1), task(7)])  # older than some known (not at submit): put back in order
    assert list(index.tasks) == ["t-1", "t-3", "t-5", "t-7", "t-9"]
    assert {b: list(m) for b, m in index.batches.items()} == {"b-0": ["t-3", "t-9"], "b-1": ["t-1", "t-7"],
                                                              "b-2": ["t-5"]}  # fmt: skip
    assert set(index.ready) == truly_ready(index)
    assert_bookkeeping(index)
    index.remove("t-3")
    index.add([task(10)])
    assert list(index.tasks) == ["t-1", "t-5", "t-7", "t-9", "t-10"]


def test_finished_tasks_are_kept_in_the_order_they_ended() -> None:
    index = TaskIndex()
    a, b, c = task(1), task(2), task(3)
    b.state, b.finished_at = TaskState.SUCCEEDED, 5.0  # loaded: ordered by when they finished
    c.state, c.finished_at = TaskState.FAILED, 2.0
    index.add([a, b, c])
    assert list(index.finished) == ["t-3", "t-2"]
    index.set_state(a, TaskState.CANCELLED)
    index.set_state(c, TaskState.QUEUED)  # retried: not finished any more
    index.set_state(c, TaskState.SUCCEEDED)  # and finished again, last
    assert list(index.finished) == ["t-2", "t-1", "t-3"]
    assert index.counts[TaskState.SUCCEEDED] == 2 and index.counts[TaskState.CANCELLED] == 1
    index.remove("t-2")
    assert list(index.finished) == ["t-1", "t-3"] and index.counts[TaskState.SUCCEEDED] == 1


STATES: list[TaskState | str] = list(TaskState)


@settings(max_examples=300, deadline=None)
@given(
    deps=st.lists(st.lists(st.integers(0, 11), max_size=3), min_size=1, max_size=12),
    moves=st.lists(st.tuples(st.integers(0, 11), st.sampled_from([*STATES, "remove"])), max_size=60),
)
def test_ready_matches_the_definition_after_any_changes(
    deps: list[list[int]], moves: list[tuple[int, TaskState | str]]
) -> None:
    # Dependencies only on earlier tasks, as submit guarantees (no cycles); some on tasks that
    # were never added (already pruned).
    tasks = [task(n, *(d for d in ds if d < n or d >= len(deps))) for n, ds in enumerate(deps)]
    index = TaskIndex()
    index.add(reversed(tasks))
    assert set(index.ready) == truly_ready(index)
    assert_bookkeeping(index)
    for n, move in moves:
        t = index.tasks.get(f"t-{n}")
        if t is None:
            continue
        if move == "remove":
            index.remove(t.task_id)
        else:
            assert isinstance(move, TaskState)
            index.set_state(t, move)
        assert set(index.ready) == truly_ready(index)
        assert_bookkeeping(index)
    for t in index.tasks.values():
        if t.state is TaskState.QUEUED and t.task_id not in index.ready:
            assert t.waiting_on == "dependencies"
