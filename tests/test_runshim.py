"""The runner's wrapper (``runshim``) as the launchers start it, in Perl where perl is installed
and in Python elsewhere (both are tested): lean (Perl; Python ``-I -S``, run as a file),
its exit record valid JSON whatever the command was, and found again by that record's path when
a daemon restarted before saving the runner's pid (issue 22)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from necrod.io.attemptlog import cut_line
from necrod.io.cgroups import is_runshim
from necrod.io.launchers import PERL, RUNSHIM_PL, LaunchSpec, _shim, find_runner, process_alive, read_exit

WRAPPERS = ["python", pytest.param("perl", marks=pytest.mark.skipif(PERL is None, reason="no perl here"))]


def _spec(tmp_path: Path, argv: list[str], env: dict[str, str] | None = None) -> LaunchSpec:
    return LaunchSpec(name="necro-t-1-1", argv=argv, cwd=str(tmp_path), env=env or {}, log=tmp_path / "1.log")


def _wrapped(tmp_path: Path, argv: list[str], wrapper: str, env: dict[str, str] | None = None
             ) -> tuple[list[str], dict[str, str]]:  # fmt: skip
    return _shim(_spec(tmp_path, argv, env), None, perl=PERL if wrapper == "perl" else None)


def _run(
    tmp_path: Path, argv: list[str], wrapper: str, env: dict[str, str] | None = None
) -> dict[str, object]:
    command, environment = _wrapped(tmp_path, argv, wrapper, env)
    subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, timeout=30, check=False)
    record = json.loads((tmp_path / "1.exit").read_text())
    assert isinstance(record, dict)
    return record


def test_the_launchers_use_the_perl_wrapper_where_perl_is_installed() -> None:
    if Path("/usr/bin/perl").exists():
        assert PERL == "/usr/bin/perl"


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_the_wrapper_runs_from_a_file_and_records_an_exit(tmp_path: Path, wrapper: str) -> None:
    command, _ = _wrapped(tmp_path, ["true"], wrapper)
    if wrapper == "python":
        assert command[:3] == [sys.executable, "-I", "-S"] and command[3].endswith("/necrod/io/runshim.py")
    else:
        assert command[0] == PERL and command[1].endswith("/necrod/io/runshim.pl")
    assert is_runshim([c.encode() for c in command])
    assert not is_runshim([sys.executable.encode(), b"-I", b"-S", b"/tmp/evil/runshim.py.sh"])
    assert not is_runshim([b"/usr/bin/perl", b"/tmp/evil/runshim.pl.sh"])
    record = _run(tmp_path, ["sh", "-c", "exit 3"], wrapper)
    assert record["code"] == 3 and record["signal"] is None
    assert isinstance(record["cpu_s"], float)
    assert _run(tmp_path, ["sh", "-c", "kill -9 $$"], wrapper)["signal"] == 9
    # An exit status above 128 is an exit status, not a signal.
    assert _run(tmp_path, ["sh", "-c", "exit 137"], wrapper) | {"cpu_s": 0, "peak_rss_bytes": 0} == {
        "code": 137, "signal": None, "cpu_s": 0, "peak_rss_bytes": 0,
    }  # fmt: skip
    exit = read_exit(tmp_path / "1.exit", None)
    assert exit is not None and exit.code == 137 and exit.signal is None


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_a_reason_with_quotes_and_newlines_is_still_json(tmp_path: Path, wrapper: str) -> None:
    name = str(tmp_path / 'no "such"\ncommand\\')
    record = _run(tmp_path, [name], wrapper)
    assert record["code"] == 127
    assert (repr(name) if wrapper == "python" else f"'{name}'") in str(record["start_failed"])
    exit = read_exit(tmp_path / "1.exit", None)
    assert exit is not None and exit.start_failed == record["start_failed"]


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_the_command_gets_the_default_signal_dispositions(tmp_path: Path, wrapper: str) -> None:
    """The wrapper ignores SIGTERM, SIGINT and SIGHUP, and Python ignores SIGPIPE from its
    start: none of it may reach the command (``yes | head`` ends on SIGPIPE)."""
    _run(tmp_path, ["sh", "-c", "grep '^SigIgn' /proc/self/status > sigs"], wrapper)
    for line in (tmp_path / "sigs").read_text().splitlines():
        assert int(line.split()[1], 16) == 0, line


@pytest.mark.skipif(PERL is None, reason="no perl here")
def test_perl_variables_reach_the_command_but_not_the_wrapper(tmp_path: Path) -> None:
    """``PERL5OPT`` would load a module into the wrapper itself: it gets the runner's ``PERL*``
    variables under another name and names them back for the command alone."""
    env = {"PERL5OPT": "-MNo::Such::Module", "PERL5LIB": "/nowhere", "OTHER": "a=b\nc"}
    command, environment = _wrapped(
        tmp_path, ["sh", "-c", 'printf "%s|%s|%s" "$PERL5OPT" "$PERL5LIB" "$OTHER" > seen'], "perl", env
    )
    assert not any(k.startswith("PERL") for k in environment)
    # Nor on the wrapper's command line, which any user can read.
    assert not any("/nowhere" in arg or "No::Such" in arg for arg in command)
    subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, timeout=30, check=False)
    assert json.loads((tmp_path / "1.exit").read_text())["code"] == 0
    assert (tmp_path / "seen").read_text() == "-MNo::Such::Module|/nowhere|a=b\nc"


@pytest.mark.skipif(PERL is None, reason="no perl here")
def test_a_cgroup_that_cannot_be_joined_is_a_failed_start(tmp_path: Path) -> None:
    command = [PERL or "", RUNSHIM_PL, "--exit-file", str(tmp_path / "1.exit"), "--cgroup",
               str(tmp_path / "gone"), "--", "touch", "ran"]  # fmt: skip
    subprocess.run(command, cwd=tmp_path, env={}, capture_output=True, timeout=30, check=False)
    record = json.loads((tmp_path / "1.exit").read_text())
    assert record["code"] == 127 and "cannot join the cgroup" in str(record["start_failed"])
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_a_runner_is_found_by_its_exit_records_path(tmp_path: Path, wrapper: str) -> None:
    exit_file = tmp_path / "1.exit"
    assert find_runner(exit_file) is None
    command, environment = _wrapped(tmp_path, ["sleep", "30"], wrapper)
    wrapper_process = subprocess.Popen(command, cwd=tmp_path, env=environment, start_new_session=True)
    try:
        # The wrapper, not its command (a child with the same command line until its exec).
        deadline = 50
        while find_runner(exit_file) != wrapper_process.pid and deadline:
            subprocess.run(["sleep", "0.1"], check=True)
            deadline -= 1
        assert find_runner(exit_file) == wrapper_process.pid and process_alive(wrapper_process.pid, exit_file)
        assert find_runner(tmp_path / "2.exit") is None
    finally:
        wrapper_process.kill()
        wrapper_process.wait(10)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs another uid to start a process as")
def test_another_users_process_that_names_the_exit_record_is_not_the_runner(tmp_path: Path) -> None:
    """An attempt's log path is in every peer's ``tasks.get``: a local user's process started
    with ``--exit-file <that path>`` ahead of a restart was adopted as an admin's runner (and its
    end taken for the runner's, and the real runner's cgroup killed)."""
    exit_file = tmp_path / "1.exit"
    wait = [
        "sh",
        "-c",
        "sleep 30; :",
    ]  # arguments after the script are its $0, $1...: kept in its command line
    impostor = subprocess.Popen([*wait, "--exit-file", str(exit_file)], user=65534, start_new_session=True)
    mine = subprocess.Popen([*wait, "--exit-file-not", str(exit_file)], start_new_session=True)
    try:
        deadline = 50
        while not Path(f"/proc/{impostor.pid}/cmdline").read_bytes().count(b"--exit-file") and deadline:
            subprocess.run(["sleep", "0.1"], check=True)
            deadline -= 1
        assert not process_alive(impostor.pid, exit_file) and find_runner(exit_file) is None
        assert not process_alive(mine.pid, exit_file), "the path must follow --exit-file"
    finally:
        for p in (impostor, mine):
            p.kill()
            p.wait(10)


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


# --- the log's limit (--log-limit): an agent's output must not fill the state directory's disk ---


def _limited(tmp_path: Path, argv: list[str], wrapper: str, limit: int) -> tuple[list[str], dict[str, str]]:
    spec = _spec(tmp_path, argv)
    return _shim(spec, None, perl=PERL if wrapper == "perl" else None, log_limit=limit)


def _run_limited(tmp_path: Path, argv: list[str], wrapper: str, limit: int, timeout: float = 30) -> float:
    """Run the wrapper with its stdout appended to the log, as the process launcher does; the
    seconds it took."""
    command, environment = _limited(tmp_path, argv, wrapper, limit)
    started = time.monotonic()
    with open(tmp_path / "1.log", "ab") as log:
        subprocess.run(
            command, cwd=tmp_path, env=environment, stdout=log, stderr=log, timeout=timeout, check=False
        )
    return time.monotonic() - started


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_a_log_keeps_the_limit_what_it_held_counted_then_says_it_was_cut(
    tmp_path: Path, wrapper: str
) -> None:
    (tmp_path / "1.log").write_bytes(b"before\n")
    # 5 MB through a pipe the command cannot fill: past the limit, output is read and dropped,
    # so the command runs to its end (it writes "done" after) and its status is recorded.
    script = "head -c 5000000 /dev/zero | tr '\\0' x; echo; echo to-stderr >&2; touch done; exit 3"
    _run_limited(tmp_path, ["sh", "-c", script], wrapper, 1000)
    log = (tmp_path / "1.log").read_bytes()
    assert log == b"before\n" + b"x" * (1000 - 7) + cut_line(1000)
    assert (tmp_path / "done").exists()
    record = json.loads((tmp_path / "1.exit").read_text())
    assert record["code"] == 3 and record["signal"] is None


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_output_under_the_limit_is_kept_whole_in_order(tmp_path: Path, wrapper: str) -> None:
    script = "for i in 1 2 3; do echo out-$i; echo err-$i >&2; done; printf 'no newline'"
    _run_limited(tmp_path, ["sh", "-c", script], wrapper, 10_000)
    expected = "".join(f"out-{i}\nerr-{i}\n" for i in (1, 2, 3)) + "no newline"
    assert (tmp_path / "1.log").read_text() == expected
    assert json.loads((tmp_path / "1.exit").read_text())["code"] == 0


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_a_background_child_holding_the_output_does_not_hold_back_the_end(
    tmp_path: Path, wrapper: str
) -> None:
    """The command ends while a child it left keeps the pipe open (and keeps writing): the end
    is recorded at once, not when the child lets go."""
    script = "(while :; do echo noise; sleep 0.01; done &) ; (sleep 60 &) ; echo last; exit 4"
    try:
        took = _run_limited(tmp_path, ["sh", "-c", script], wrapper, 1 << 20)
        assert took < 10
        assert json.loads((tmp_path / "1.exit").read_text())["code"] == 4
        assert b"last\n" in (tmp_path / "1.log").read_bytes()
    finally:
        subprocess.run(["pkill", "-f", "while :; do echo noise"], check=False)
        subprocess.run(["pkill", "-x", "-f", "sleep 60"], check=False)


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_a_stop_while_output_flows_is_recorded_as_the_signal(tmp_path: Path, wrapper: str) -> None:
    command, environment = _limited(tmp_path, ["sh", "-c", "exec yes"], wrapper, 4096)
    with open(tmp_path / "1.log", "ab") as log:
        process = subprocess.Popen(command, cwd=tmp_path, env=environment, stdout=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while (tmp_path / "1.log").stat().st_size < 4096 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGTERM)  # as a stop does: the wrapper rides it out
        assert process.wait(10) == 128 + signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
    assert json.loads((tmp_path / "1.exit").read_text())["signal"] == signal.SIGTERM
    assert (tmp_path / "1.log").read_bytes() == b"y\n" * 2048 + cut_line(4096)


def test_the_exit_record_is_read_only_from_a_regular_file_and_only_its_head(tmp_path: Path) -> None:
    """The runner (or a prepare step) can write where its record lies: a symlink to a record
    elsewhere, a FIFO nobody writes, a record padded to 16 GiB read as nothing, at once."""
    real = tmp_path / "real.exit"
    real.write_text('{"code": 0}')
    assert read_exit(real, None) is not None and read_exit(real, None).code == 0  # type: ignore[union-attr]
    link = tmp_path / "link.exit"
    link.symlink_to(real)
    fifo = tmp_path / "fifo.exit"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.exit"
    with open(huge, "wb") as f:
        f.write(b'{"code": 0' + b" " * 8192 + b"}")
        f.truncate(16 << 30)
    started = time.monotonic()
    assert [read_exit(p, None) for p in (link, fifo, huge, tmp_path)] == [None, None, None, None]
    assert time.monotonic() - started < 1
