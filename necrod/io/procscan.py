"""Passes over /proc shared by every caller that asks at about the same time, and stopping what
they find.

Each reset of a git slot asks twice which processes work in it (before it, to stop them; after
it, for any started meanwhile), and one pass reads every process on the host: with many slots
cleaned at once, most of those passes would read the same processes for different directories.
So a ``ProcScanner`` (one per daemon) gathers askers: a caller registers its directories and
waits; when no pass is running one starts at once with every directory registered, and callers
that arrive during a pass wait for the next, which serves all of them together. Each gets only
the holders of its own directories, less its own ``skip`` pids.

The rule that keeps it correct: an answer always comes from a pass that started after its caller
asked. A pass already running may have read a process before it entered the caller's slot, so
it answers nobody who asked after it began.

Resource handling: a pass runs in one of ``procs``' scan threads (the limiter is shared with
the other readers of /proc). Each caller keeps its own deadline (``ScanStuck``); the pass runs
under the deadline of the caller that started it, and when that caller leaves (its deadline, or
its task cancelled), the pass is abandoned to its thread and the callers it was serving are
served by the next one, which starts at once.

Error handling: an unexpected error of a pass is raised to every caller it was serving.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable, Sequence

import anyio

from necrod.io.procs import (
    KILL_ROUNDS,
    KILL_WAIT_S,
    POLL_S,
    SCAN_TIMEOUT_S,
    Holder,
    ScanStuck,
    Stop,
    holders_of,
    in_scan_thread,
    scan_off_loop,
    signal_holders,
)


class _Ask:
    """One caller's question, and its answer once a pass gave one."""

    __slots__ = ("answer", "directories", "error", "left", "skip")

    def __init__(self, directories: tuple[str, ...], skip: frozenset[int]) -> None:
        self.directories = directories
        self.skip = skip
        self.answer: list[Holder] | None = None
        self.error: Exception | None = None
        #: The caller stopped waiting: a pass that is abandoned does not hand it on.
        self.left = False

    @property
    def done(self) -> bool:
        return self.answer is not None or self.error is not None


#: One pass: for each asker's (directories, skip pids), the processes working there. Blocking.
Pass = Callable[[Sequence[tuple[Sequence[str], frozenset[int]]]], list[list[Holder]]]


class ProcScanner:
    """The daemon's passes over /proc: ``holders`` asks, ``stop`` stops what is found.
    ``scan`` is the pass (``procs.holders_of``; tests hand in one they hold back)."""

    def __init__(self, timeout: float = SCAN_TIMEOUT_S, scan: Pass = holders_of) -> None:
        self.timeout = timeout
        self._scan = scan
        self._asked: list[_Ask] = []
        #: Set when the running pass ends (answered, failed or abandoned); None when none runs.
        self._running: anyio.Event | None = None
        self._passes = 0
        self._asks = 0
        self._stuck = 0

    def statistics(self) -> dict[str, int]:
        """Passes started, answers asked for, and askers that met their deadline, since start."""
        return {"passes": self._passes, "asks": self._asks, "stuck": self._stuck}

    async def holders(self, directories: Sequence[str], skip: Iterable[int] = ()) -> list[Holder]:
        """Processes working in any of ``directories`` (absolute paths as the kernel names
        them), from a pass that started after this call; ``ScanStuck`` past the deadline."""
        ask = _Ask(tuple(directories), frozenset(skip))
        self._asks += 1
        self._asked.append(ask)
        try:
            with anyio.move_on_after(self.timeout):
                while not ask.done:
                    running = self._running
                    if running is None:
                        await self._run_pass()
                    else:
                        await running.wait()
                if ask.error is not None:
                    raise ask.error
                assert ask.answer is not None
                return ask.answer
            self._stuck += 1
            raise ScanStuck(self.timeout)
        finally:
            ask.left = True
            if ask in self._asked:
                self._asked.remove(ask)

    async def _run_pass(self) -> None:
        batch, self._asked = self._asked, []
        ended = self._running = anyio.Event()
        self._passes += 1
        try:
            answers = await in_scan_thread(self._scan, [(a.directories, a.skip) for a in batch])
        except Exception as exc:
            for a in batch:
                a.error = exc
        else:
            for a, answer in zip(batch, answers, strict=True):
                a.answer = answer
        finally:
            # Abandoned (its caller left): those it served, still waiting, go to the next pass,
            # which starts after they asked as well.
            self._asked[:0] = [a for a in batch if not a.done and not a.left]
            self._running = None
            ended.set()

    async def stop(self, directories: Sequence[str], grace: float, skip: Iterable[int] = ()) -> Stop:
        """Stop everything working in ``directories``: SIGTERM, up to ``grace`` for it to go,
        then SIGKILL (a few rounds, which also catch processes that came since), looking again
        each time. Raises ``ScanStuck`` when /proc cannot be read in time."""
        skipped = tuple(skip)
        seen: dict[int, Holder] = {}
        found = await self.holders(directories, skipped)
        if not found:
            return Stop([], [])
        seen.update((h.pid, h) for h in found)
        refused = await scan_off_loop(signal_holders, found, directories, signal.SIGTERM)
        found = await self._wait_gone(directories, grace, skipped, seen)
        for _ in range(KILL_ROUNDS):
            if not found:
                break
            refused += await scan_off_loop(signal_holders, found, directories, signal.SIGKILL)
            found = await self._wait_gone(directories, KILL_WAIT_S, skipped, seen)
        left = {h.pid: h for h in [*found, *refused]}
        return Stop(list(seen.values()), list(left.values()))

    async def _wait_gone(
        self, directories: Sequence[str], timeout: float, skip: tuple[int, ...], seen: dict[int, Holder]
    ) -> list[Holder]:
        deadline = anyio.current_time() + timeout
        while True:
            await anyio.sleep(POLL_S)
            found = await self.holders(directories, skip)
            seen.update((h.pid, h) for h in found if h.pid not in seen)
            if not found or anyio.current_time() >= deadline:
                return found
