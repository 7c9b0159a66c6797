"""The dispatcher's tasks, indexed so that a scheduling pass looks only at tasks that could start.

With ten thousand tasks queued in chains, nearly all of them wait on a dependency; a pass that
walked every task and its dependencies on every wake-up cost more than running the tasks did.
The index keeps the set of *ready* tasks (queued, every dependency succeeded) up to date as
states change, and a task's dependents are looked at again only when its success changes.

It also keeps what would otherwise cost a walk of every task at each task's end or each status
call (issue 22): the finished tasks in the order they finished (pruning takes the oldest), the
count of tasks in each state, and each batch's tasks. ``tasks`` (and each batch) iterate in
submission order (``seq``), so that a listing needs no sort.

Every state change goes through ``set_state``. Pure: no I/O.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from necrod.core.tasks import FINISHED, Task, TaskState


class TaskIndex:
    def __init__(self) -> None:
        self.tasks: dict[str, Task] = {}
        #: task id → ids of the tasks that depend on it.
        self.dependents: dict[str, set[str]] = {}
        #: Queued tasks whose dependencies have all succeeded, in the order they became ready.
        self.ready: dict[str, Task] = {}
        #: Finished tasks, oldest end first.
        self.finished: dict[str, Task] = {}
        #: How many tasks are in each state.
        self.counts: Counter[TaskState] = Counter()
        #: batch → its tasks, in submission order.
        self.batches: dict[str, dict[str, Task]] = {}
        #: The highest ``seq`` added so far.
        self._last_seq = 0

    def __len__(self) -> int:
        return len(self.tasks)

    def add(self, tasks: Iterable[Task]) -> None:
        """Add tasks that may depend on each other: all are known before any is judged ready
        (a dependency not known counts as pruned, hence done)."""
        added = sorted(tasks, key=lambda t: t.seq)
        if not added:
            return
        behind = added[0].seq <= self._last_seq
        self._last_seq = max(self._last_seq, added[-1].seq)
        for task in added:
            self.tasks[task.task_id] = task
            self.counts[task.state] += 1
            if task.batch is not None:
                self.batches.setdefault(task.batch, {})[task.task_id] = task
            for dep in task.depends_on:
                self.dependents.setdefault(dep, set()).add(task.task_id)
        for task in sorted((t for t in added if t.state in FINISHED), key=lambda t: t.finished_at or 0.0):
            self.finished[task.task_id] = task
        if behind:
            # Not at submit, which numbers upwards: put the orders back.
            _by_seq(self.tasks)
            for batch in self.batches.values():
                _by_seq(batch)
        for task in added:
            self._update(task)

    def remove(self, task_id: str) -> None:
        """Forget a finished task (pruned). Its dependents count it as done from now on."""
        task = self.tasks.pop(task_id, None)
        if task is not None:
            self.counts[task.state] -= 1
            self.finished.pop(task_id, None)
            if task.batch is not None and (batch := self.batches.get(task.batch)) is not None:
                batch.pop(task_id, None)
                if not batch:
                    del self.batches[task.batch]
        self.ready.pop(task_id, None)
        for dep_id in self.dependents.pop(task_id, ()):
            if (dep := self.tasks.get(dep_id)) is not None:
                self._update(dep)

    def set_state(self, task: Task, state: TaskState) -> None:
        was_done = task.state is TaskState.SUCCEEDED
        if task.task_id in self.tasks:
            self.counts[task.state] -= 1
            self.counts[state] += 1
            if state not in FINISHED:
                self.finished.pop(task.task_id, None)
            elif task.state not in FINISHED:
                self.finished[task.task_id] = task
        task.state = state
        self._update(task)
        if was_done != (state is TaskState.SUCCEEDED):
            for dep_id in self.dependents.get(task.task_id, ()):
                if (dep := self.tasks.get(dep_id)) is not None:
                    self._update(dep)

    def dependencies_done(self, task: Task) -> bool:
        """Every dependency succeeded (one no longer known was pruned after it finished)."""
        for dep_id in task.depends_on:
            dep = self.tasks.get(dep_id)
            if dep is not None and dep.state is not TaskState.SUCCEEDED:
                return False
        return True

    def _update(self, task: Task) -> None:
        if task.state is not TaskState.QUEUED or task.task_id not in self.tasks:
            self.ready.pop(task.task_id, None)
        elif self.dependencies_done(task):
            if task.waiting_on == "dependencies":
                task.waiting_on = None
            self.ready.setdefault(task.task_id, task)
        else:
            self.ready.pop(task.task_id, None)
            task.waiting_on, task.reason = "dependencies", None


def _by_seq(tasks: dict[str, Task]) -> None:
    """Reorder ``tasks`` in place (it is shared) by submission order."""
    ordered = sorted(tasks.values(), key=lambda t: t.seq)
    tasks.clear()
    tasks.update((t.task_id, t) for t in ordered)
