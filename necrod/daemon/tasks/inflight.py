"""What submits not yet answered hold. A submit's tasks join the index only once committed, and
the index is where the per-uid quota counts tasks and where pruning looks for dependents: until
then both ask here (submits in one loop turn would each pass the quota; an attempt's end could
prune a failed dependency of tasks about to be indexed, and they would run)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from necrod.core.tasks import Task


class InFlight:
    def __init__(self) -> None:
        self._tasks_of: Counter[int] = Counter()
        self._depended_on: Counter[str] = Counter()

    def tasks_of(self, uid: int) -> int:
        return self._tasks_of[uid]

    def depended_on(self, task_id: str) -> bool:
        return self._depended_on[task_id] > 0

    @contextmanager
    def submitting(self, uid: int | None, built: list[Task]) -> Iterator[None]:
        """For as long as ``built`` is being committed."""
        deps = Counter(d for t in built for d in t.depends_on)
        if uid is not None:
            self._tasks_of[uid] += len(built)
        self._depended_on.update(deps)
        try:
            yield
        finally:
            if uid is not None:
                self._tasks_of[uid] -= len(built)
                if self._tasks_of[uid] <= 0:
                    del self._tasks_of[uid]
            self._depended_on.subtract(deps)
            for dep_id in deps:
                if self._depended_on[dep_id] <= 0:
                    del self._depended_on[dep_id]
