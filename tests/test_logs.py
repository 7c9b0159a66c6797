"""Logs as an operator reads them: under journald one entry per event, with its fields and
without a second timestamp or level; on a terminal, colours unless NO_COLOR; JSON otherwise."""

from __future__ import annotations

import array
import fcntl
import json
import os
import re
import shutil
import socket
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import structlog

from necrod.io import logs
from necrod.io.journal import field_name
from tests.helpers import Necrod, pool_config, short_tmpdir, wait_for

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def parse_entry(data: bytes) -> dict[str, str]:
    """The native journal protocol, read back: ``NAME=value`` lines and binary-safe fields."""
    fields: dict[str, str] = {}
    i = 0
    while i < len(data):
        end = data.index(b"\n", i)
        line = data[i:end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            fields[name.decode()] = value.decode()
            i = end + 1
        else:
            (size,) = struct.unpack("<Q", data[end + 1 : end + 9])
            fields[line.decode()] = data[end + 9 : end + 9 + size].decode()
            assert data[end + 9 + size : end + 10 + size] == b"\n"
            i = end + 10 + size
    return fields


class FakeJournald:
    """A datagram socket where journald's would be; receives entries as journald does."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(2)

    def close(self) -> None:
        self.sock.close()

    def entry(self) -> dict[str, str]:
        data, ancillary, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(4))
        if not data:  # the entry came in a memfd
            ((level, kind, fd_data),) = ancillary
            assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
            fd = array.array("i", fd_data[:4])[0]
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SHRINK, (
                "journald takes sealed memfds only"
            )
            with os.fdopen(fd, "rb") as memfd:
                memfd.seek(0)
                data = memfd.read()
        return parse_entry(data)


@pytest.fixture
def tmp() -> Iterator[Path]:
    path = short_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    yield
    logs.close()
    structlog.reset_defaults()


@pytest.fixture
def journald(tmp: Path) -> Iterator[FakeJournald]:
    listener = FakeJournald(tmp / "journal.sock")
    yield listener
    listener.close()


def journal_stream(path: Path, monkeypatch: pytest.MonkeyPatch) -> IO[str]:
    """A file that ``$JOURNAL_STREAM`` names, as systemd names the service's stderr."""
    stream = open(path, "w+")  # noqa: SIM115 (closed by the test)
    st = os.fstat(stream.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    return stream


def test_under_journald_each_event_is_one_native_entry_with_its_fields(
    tmp: Path, journald: FakeJournald, monkeypatch: pytest.MonkeyPatch
) -> None:
    with journal_stream(tmp / "stderr", monkeypatch) as stderr:
        assert logs.configure(None, "info", stderr, journal_socket=tmp / "journal.sock") == "journal"
        log = structlog.get_logger("necrod.test")
        log.warning("fetch_failed", pool="repo", retry_in_s=2.5, error="fatal: no such\nremote", message="x")
        entry = journald.entry()
        assert entry["PRIORITY"] == "4" and entry["SYSLOG_IDENTIFIER"] == "necrod"
        assert entry["EVENT"] == "fetch_failed" and entry["POOL"] == "repo" and entry["RETRY_IN_S"] == "2.5"
        assert entry["ERROR"] == "fatal: no such\nremote"  # a newline: sent binary-safe
        assert entry["NECROD_MESSAGE"] == "x"  # a key that is a journal field of its own
        # journald stamps time and priority itself: none in the message.
        assert (
            entry["MESSAGE"]
            == 'fetch_failed pool=repo retry_in_s=2.5 error="fatal: no such\\nremote" message=x'
        )
        assert "TIMESTAMP" not in entry and "LEVEL" not in entry
        log.info("ready", pools=["a", "b"], socket="/run/necrod/necrod.sock")
        entry = journald.entry()
        assert entry["PRIORITY"] == "6" and entry["POOLS"] == '["a","b"]'
        assert entry["MESSAGE"] == 'ready pools=["a","b"] socket=/run/necrod/necrod.sock'
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("reload_crashed", reason="SIGHUP")
        entry = journald.entry()
        assert entry["PRIORITY"] == "3"
        assert (
            "Traceback (most recent call last)" in entry["EXCEPTION"]
            and "ValueError: boom" in entry["EXCEPTION"]
        )
        assert entry["MESSAGE"].startswith("reload_crashed reason=SIGHUP\nTraceback")
        stderr.seek(0)
        assert stderr.read() == "", "an entry the journal took was written to stderr too"


def test_an_entry_too_big_for_a_datagram_goes_in_a_sealed_memfd(
    tmp: Path, journald: FakeJournald, monkeypatch: pytest.MonkeyPatch
) -> None:
    with journal_stream(tmp / "stderr", monkeypatch) as stderr:
        logs.configure(None, "info", stderr, journal_socket=tmp / "journal.sock")
        big = "x" * (4 << 20)
        structlog.get_logger().info("big", output=big)
        entry = journald.entry()
        assert entry["OUTPUT"] == big and entry["EVENT"] == "big"


def test_without_the_journal_socket_the_message_goes_to_stderr_with_its_priority(
    tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with journal_stream(tmp / "stderr", monkeypatch) as stderr:
        logs.configure(None, "info", stderr, journal_socket=tmp / "no-journal.sock")
        log = structlog.get_logger()
        log.warning("disk_low", free_bytes=1024)
        try:
            raise RuntimeError("oops")
        except RuntimeError:
            log.exception("crashed")
        stderr.seek(0)
        lines = stderr.read().splitlines()
    assert lines[0] == "<4>disk_low free_bytes=1024"
    assert lines[1] == "<3>crashed" and all(line.startswith("<3>") for line in lines[1:])
    assert any("RuntimeError: oops" in line for line in lines)


def test_the_journal_field_names_are_what_journald_accepts() -> None:
    assert field_name("lease_id") == "LEASE_ID"
    assert field_name("git.version") == "GIT_VERSION"
    assert field_name("priority") == "NECROD_PRIORITY"
    assert field_name("_pid") == "PID"
    assert field_name("2fa") == "NECROD_2FA"
    assert len(field_name("k" * 100)) == 64
    for key in ("lease_id", "message", "__x", "9", "é", "a-b c"):
        assert re.fullmatch(r"[A-Z][A-Z0-9_]{0,63}", field_name(key)), key


def terminal() -> tuple[IO[str], int]:
    """A real terminal: the stream necrod writes to, and the other end to read what it wrote."""
    controller, tty = os.openpty()
    return os.fdopen(tty, "w"), controller


def read_all(fd: int) -> str:
    os.set_blocking(fd, False)
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return out.decode()
        if not chunk:
            return out.decode()
        out += chunk


@pytest.mark.parametrize("no_color", [None, "1"])
def test_a_terminal_gets_colours_unless_no_color_is_set(
    no_color: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    if no_color is None:
        monkeypatch.delenv("NO_COLOR", raising=False)
    else:
        monkeypatch.setenv("NO_COLOR", no_color)
    stream, controller = terminal()
    try:
        assert logs.configure(None, "info", stream) == "console"
        structlog.get_logger().info("ready", pools=1)
        stream.flush()
        written = read_all(controller)
    finally:
        stream.close()
        os.close(controller)
    assert "ready" in written
    assert bool(ANSI.search(written)) == (no_color is None), repr(written)


def test_a_daemon_under_journald_writes_no_timestamp_or_level_in_its_messages(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    d = necrod_factory(pool_config({"repo": origin}, slots=1, min_idle=0), start=False)
    d.log_path.touch()
    st = d.log_path.stat()
    # stderr (the log file) is the journal's stream; no journal socket here: the fallback.
    d.env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    d.command = lambda: [sys.executable, "-m", "necrod", "--socket", str(d.socket), "--state-dir",  # type: ignore[method-assign]
                         str(d.state_dir), "--config", str(d.config_path)]  # fmt: skip
    d.start()
    wait_for(lambda: "<6>ready " in d.log(), 10, what="the ready line")
    lines = [line for line in d.log().splitlines() if line]
    assert lines and all(re.match(r"<[0-7]>[a-z_]+( |$)", line) for line in lines), lines[:5]
    assert not any(re.search(r"\d{4}-\d\d-\d\dT\d\d:|\"level\"|\"timestamp\"", line) for line in lines), (
        lines[:5]
    )
    ready = next(line for line in lines if line.startswith("<6>ready "))
    assert f"socket={d.socket}" in ready
    assert d.terminate() == 0


def test_json_lines_keep_their_timestamp_and_level(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    with open(tmp / "out", "w+") as stream:
        assert logs.configure(None, "info", stream) == "json"
        structlog.get_logger().info("ready", pools=1)
        stream.seek(0)
        line: dict[str, Any] = json.loads(stream.readline())
    assert line["event"] == "ready" and line["level"] == "info" and line["timestamp"]


# --- attempt logs (tasks.logs) ------------------------------------------------------------------


def test_tasks_logs_reads_in_pieces_and_does_not_follow_a_log_replaced_by_a_symlink(
    necrod_factory: Callable[..., Necrod], origin: Path, tmp: Path
) -> None:
    d = necrod_factory(pool_config({"repo": origin}, slots=1, min_idle=0))
    with d.client() as c:
        task_id = c.submit("repo", command=["sh", "-c", "for i in 1 2 3 4 5; do echo line-$i; done"])[
            "task_id"
        ]
        wait_for(lambda: c.task(task_id)["state"] == "succeeded", 30, what="the task")
        first = c.logs(task_id, offset=0, limit=12)
        assert first["data"] == "line-1\nline-" and first["offset"] == 12 and not first["eof"]
        rest = c.logs(task_id, offset=first["offset"])
        assert first["data"] + rest["data"] == "".join(f"line-{i}\n" for i in range(1, 6)) and rest["eof"]
        # Something replaces the log with a link to a file it may not show: not followed.
        secret = tmp / "secret"
        secret.write_text("not for the log reader\n")
        log_path = Path(rest["path"])
        log_path.unlink()
        log_path.symlink_to(secret)
        with pytest.raises(Exception, match="cannot read the log") as refused:
            c.logs(task_id)
        assert "not for the log reader" not in str(refused.value)
