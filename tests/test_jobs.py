"""The pool engine's background work: coalesced jobs (a burst of cleanups tidies its pool a few
times, not once per slot)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from necrod.daemon.jobs import Jobs


@pytest.mark.anyio
async def test_work_asked_for_while_it_runs_runs_once_more_with_the_last_arguments() -> None:
    jobs = Jobs(SimpleNamespace(stopping=False))  # type: ignore[arg-type]
    ran: list[Any] = []
    release = anyio.Event()

    async def tidy(n: int) -> None:
        ran.append(n)
        if n == 0:
            await release.wait()

    async with anyio.create_task_group() as tg:
        jobs.start(tg, lambda slot: anyio.sleep(0))
        jobs.coalesce("tidy p", tidy, 0)
        await anyio.wait_all_tasks_blocked()
        for n in range(1, 6):
            jobs.coalesce("tidy p", tidy, n)
        jobs.coalesce("tidy q", tidy, 10)  # another key runs at once
        await anyio.wait_all_tasks_blocked()
        assert ran == [0, 10]
        release.set()
    assert ran == [0, 10, 5]
    # Nothing under way any more: the next ask starts at once.
    async with anyio.create_task_group() as tg:
        jobs.start(tg, lambda slot: anyio.sleep(0))
        jobs.coalesce("tidy p", tidy, 7)
    assert ran[-1] == 7
