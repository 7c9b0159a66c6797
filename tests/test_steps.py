"""A pool's prepare step (``necrod.io.steps.run_step``), run for real: it runs the origin's code,
so its output is bounded like a runner's, and how it ended is read from the wrapper's record."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from necrod.io.attemptlog import cut_line
from necrod.io.steps import StepResult, passed_through, run_step

pytestmark = pytest.mark.anyio


async def step(
    tmp_path: Path, script: str, timeout: float = 30, limit: int = 1 << 20
) -> tuple[StepResult, str]:
    log = tmp_path / "prepare" / "key.log"
    result = await run_step(["sh", "-c", script], cwd=tmp_path, env=passed_through(), log=log,
                            timeout=timeout, log_limit=limit)  # fmt: skip
    assert not (tmp_path / "prepare" / "key.exit").exists()  # the record is read and removed
    return result, log.read_bytes().decode(errors="replace")


async def test_a_flooding_step_keeps_at_most_its_limit_and_still_ends_as_it_did(tmp_path: Path) -> None:
    limit = 64 * 1024
    result, out = await step(tmp_path, "echo first; yes | head -c 5000000; exit 0", limit=limit)
    assert result.ok, result
    assert out.startswith("first\ny\n")
    assert out.endswith(cut_line(limit).decode()) and len(out.encode()) == limit + len(cut_line(limit))


@pytest.mark.parametrize(
    ("script", "code", "sig"), [("echo out; exit 3", 3, None), ("echo out; kill -9 $$", None, 9)]
)
async def test_the_step_ends_with_its_own_status(
    tmp_path: Path, script: str, code: int | None, sig: int | None
) -> None:
    result, out = await step(tmp_path, script)
    assert (result.code, result.signal, result.timed_out) == (code, sig, False)
    assert out == "out\n"


async def test_a_step_past_its_timeout_is_stopped_and_says_so(tmp_path: Path) -> None:
    result, out = await step(tmp_path, "echo begun; exec sleep 30", timeout=0.5)
    assert result.timed_out and result.signal == 15 and not result.ok, result
    assert out == "begun\n"


async def test_a_step_that_cannot_start_says_why_in_its_log(tmp_path: Path) -> None:
    log = tmp_path / "key.log"
    result = await run_step(
        [str(tmp_path / "missing")], cwd=tmp_path, env=passed_through(), log=log, timeout=10
    )
    assert result.code == 127 and not result.ok
    assert "cannot run" in log.read_text()


async def test_a_background_child_holding_the_output_neither_holds_the_end_nor_outlives_it(
    tmp_path: Path,
) -> None:
    pidfile = tmp_path / "child.pid"
    started = time.monotonic()
    result, out = await step(tmp_path, f"sleep 60 & echo $! > {pidfile}; echo done")
    assert result.ok and out == "done\n", (result, out)
    assert time.monotonic() - started < 20
    assert gone(int(pidfile.read_text()))


def gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] in "ZX"
