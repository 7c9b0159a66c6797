"""The runner's wrapper (``runshim``) as the launchers start it: lean (``-I -S``, run as a file),
its exit record valid JSON whatever the command was, and found again by that record's path when
a daemon restarted before saving the runner's pid (issue 22)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from necrod.io.cgroups import is_runshim
from necrod.io.launchers import LaunchSpec, _shim, find_runner, process_alive


def _spec(tmp_path: Path, argv: list[str]) -> LaunchSpec:
    return LaunchSpec(name="necro-t-1-1", argv=argv, cwd=str(tmp_path), env={}, log=tmp_path / "1.log")


def _run(tmp_path: Path, argv: list[str]) -> dict[str, object]:
    command = _shim(_spec(tmp_path, argv), None)
    subprocess.run(command, cwd=tmp_path, env={}, capture_output=True, timeout=30, check=False)
    record = json.loads((tmp_path / "1.exit").read_text())
    assert isinstance(record, dict)
    return record


def test_the_wrapper_runs_isolated_from_a_file_and_records_an_exit(tmp_path: Path) -> None:
    command = _shim(_spec(tmp_path, ["true"]), None)
    assert command[:3] == [sys.executable, "-I", "-S"] and command[3].endswith("/necrod/io/runshim.py")
    assert is_runshim([c.encode() for c in command])
    assert not is_runshim([sys.executable.encode(), b"-I", b"-S", b"/tmp/evil/runshim.py.sh"])
    record = _run(tmp_path, ["sh", "-c", "exit 3"])
    assert record["code"] == 3 and record["signal"] is None
    assert isinstance(record["cpu_s"], float) and isinstance(record["peak_rss_bytes"], int)
    assert _run(tmp_path, ["sh", "-c", "kill -9 $$"])["signal"] == 9


def test_a_reason_with_quotes_and_newlines_is_still_json(tmp_path: Path) -> None:
    name = str(tmp_path / 'no "such"\ncommand\\')
    record = _run(tmp_path, [name])
    assert record["code"] == 127 and repr(name) in str(record["start_failed"])


def test_a_runner_is_found_by_its_exit_records_path(tmp_path: Path) -> None:
    exit_file = tmp_path / "1.exit"
    assert find_runner(exit_file) is None
    wrapper = subprocess.Popen(_shim(_spec(tmp_path, ["sleep", "30"]), None), cwd=tmp_path, env={},
                               start_new_session=True)  # fmt: skip
    try:
        # The wrapper, not its command (a child with the same command line until its exec).
        deadline = 50
        while find_runner(exit_file) != wrapper.pid and deadline:
            subprocess.run(["sleep", "0.1"], check=True)
            deadline -= 1
        assert find_runner(exit_file) == wrapper.pid and process_alive(wrapper.pid, exit_file)
        assert find_runner(tmp_path / "2.exit") is None
    finally:
        wrapper.kill()
        wrapper.wait(10)


@pytest.mark.anyio
async def test_a_runner_whose_process_cannot_be_read_in_time_is_not_taken_for_alive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading a command line waits on the process's memory lock (a process stuck in the kernel
    holds it): the check runs off the event loop, and one that does not answer in time is not
    the runner, never signalled or waited on as one. The stuck read is simulated."""
    import os
    import time

    from necrod.io import launchers, procs

    def stuck(pid: int, exit_file: Path) -> bool:
        time.sleep(5.0)
        return True

    monkeypatch.setattr(procs, "SCAN_TIMEOUT_S", 0.2)
    assert await launchers.alive_off_loop(os.getpid(), tmp_path / "1.exit") is False
    monkeypatch.setattr(launchers, "process_alive", stuck)
    started = time.monotonic()
    assert await launchers.alive_off_loop(os.getpid(), tmp_path / "1.exit") is False
    assert time.monotonic() - started < 3.0
