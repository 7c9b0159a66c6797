"""Running one step of the daemon's own (a pool's prepare command) to its end, with a time limit.

The step runs in a session and process group of its own, with exactly the environment given,
under the runners' wrapper (``runshim``): its output is appended to a log file, 256 MiB of it at
most, and its end recorded beside it. At its end, or at its time limit, whatever is left of its
process group gets SIGTERM, a grace, then SIGKILL: nothing it started keeps working in the
directory that is about to become a layer or a slot.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

from necrod.io.attemptlog import MAX_LOG_BYTES
from necrod.io.launchers import read_exit, runner_files, stop_group, wrapped

#: Between SIGTERM and SIGKILL for a step that ran out of time.
STEP_GRACE_S = 5.0
#: Environment passed from the daemon to what it runs for others (runners, prepare steps):
#: nothing else of the daemon's leaks through.
PASSTHROUGH_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "TERM")


def passed_through() -> dict[str, str]:
    """The daemon's own values of ``PASSTHROUGH_ENV``."""
    return {k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ}


@dataclass(frozen=True, slots=True)
class StepResult:
    code: int | None
    signal: int | None
    timed_out: bool
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.code == 0 and not self.timed_out

    def describe(self, timeout: float) -> str:
        if self.timed_out:
            return f"ran longer than its timeout_s ({timeout:g}s)"
        if self.signal is not None:
            return f"killed by signal {self.signal}"
        return f"exited with {self.code}"


async def run_step(
    argv: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    log: Path,
    timeout: float,
    log_limit: int = MAX_LOG_BYTES,
) -> StepResult:
    """Run ``argv`` in ``cwd`` until it ends or ``timeout`` passes; its output goes to ``log``,
    at most ``log_limit`` bytes of it: the step runs the origin's code, whose output must not
    fill the disk the daemon's state is on. The wrapper (``runshim``) copies it and records the
    step's end beside the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    exit_file = runner_files(log)[2]
    exit_file.unlink(missing_ok=True)
    command, wrapper_env = wrapped(argv, env, exit_file, log_limit=log_limit)
    started = time.monotonic()
    with open(log, "ab") as out:  # noqa: ASYNC230 (opened for the child, not read here)
        process = await anyio.open_process(
            command, cwd=cwd, env=wrapper_env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    timed_out = False
    try:
        with anyio.move_on_after(timeout) as scope:
            await process.wait()
        timed_out = scope.cancelled_caught
    finally:
        # Ended, timed out or cancelled: nothing of its group stays (the wrapper leads it).
        await stop_group(process.pid, STEP_GRACE_S)
        with anyio.CancelScope(shield=True), anyio.move_on_after(STEP_GRACE_S):
            await process.wait()
    duration = time.monotonic() - started
    ended = read_exit(exit_file, None)
    exit_file.unlink(missing_ok=True)
    if ended is not None:
        return StepResult(ended.code, ended.signal, timed_out, duration)
    code = process.returncode  # the wrapper itself was killed (SIGKILL after the grace)
    sig = -code if code is not None and code < 0 else None
    return StepResult(None if sig else code, sig, timed_out, duration)


def log_tail(log: Path, limit: int = 2048) -> str:
    """The end of a step's log, for an error message (decoded leniently, at most ``limit`` bytes)."""
    try:
        with open(log, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def read_chunk(log: str | os.PathLike[str], offset: int, limit: int) -> bytes:
    """Up to ``limit`` bytes of a step's log from ``offset`` (nothing past its end)."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            return f.read(limit)
    except FileNotFoundError:
        return b""
