"""What the dispatcher's rooms share: ``Active``, a task being started or running (the table of
them, task id → ``Active``, is one dict the dispatcher hands to each room that reads or fills
it), and ``Jobs``, the task group in which the rooms' background jobs (starting, watching and
ending attempts) run once the dispatcher runs; and the shapes of two callables rooms are
handed (``Spawn``, ``Release``). Owns no policy and calls no other room."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import structlog
from anyio.abc import TaskGroup

from necrod.core.config import RunnerProfile
from necrod.core.tasks import Attempt, Task
from necrod.io.launchers import Run

log = structlog.get_logger("necrod.dispatch")

#: How long the end of a cancelled attempt waits for its work to be salvaged, so that the cancel
#: answers with the salvage ref in place (a salvage takes well under a second; a slow one is
#: not waited for past this).
SALVAGE_WAIT_S = 10.0

#: ``spawn(func, *args)``: run ``func(*args)`` as a background job (``Jobs.spawn``).
Spawn = Callable[..., None]


class Release(Protocol):
    """Give a task's lease back, here (``host`` None) or on its host (``Attempts.release``)."""

    async def __call__(self, lease_id: str, *, salvage: bool, host: str | None = None) -> None: ...


@dataclass(slots=True)
class Active:
    """A task being started or running."""

    task: Task
    profile: RunnerProfile
    attempt: Attempt | None = None
    #: The host it runs on (None: this one).
    host: str | None = None
    run: Run | None = None
    #: Why we want it stopped: cancelled, timeout, stalled, lease_lost.
    stop_reason: str | None = None
    stop: anyio.Event = field(default_factory=anyio.Event)
    stopped: anyio.Event = field(default_factory=anyio.Event)
    accounted_at: float = 0.0
    #: Stop it with SIGKILL at once, without the profile's grace (``tasks.cancel`` with force).
    force: bool = False

    def request_stop(self, reason: str) -> None:
        # A cancel outranks a stop already under way (a timeout, a lost lease): the attempt then
        # ends cancelled, not retried.
        if self.stop_reason is None or reason == "cancelled":
            self.stop_reason = reason
        self.stop.set()

    def kill_now(self) -> None:
        """SIGKILL the runner now, even if a stop with a grace is already under way."""
        self.force = True
        if self.run is not None:
            self.run.kill()


class Jobs:
    """The dispatcher's task group (``tg``, None until ``Dispatcher.run`` opens it)."""

    def __init__(self) -> None:
        self.tg: TaskGroup | None = None

    def spawn(self, func: Callable[..., Any], *args: Any) -> None:
        assert self.tg is not None

        async def run() -> None:
            structlog.contextvars.clear_contextvars()
            try:
                await func(*args)
            except Exception:
                log.exception("dispatcher_job_crashed", job=getattr(func, "__name__", "?"))

        self.tg.start_soon(run)
