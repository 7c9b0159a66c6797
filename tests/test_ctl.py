"""necroctl as scripts and people use it: output, --json, exit codes."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from necrod.ctl import render
from tests.helpers import Necrod, pool_config, wait_for

ROOT = Path(__file__).parent.parent


def ctl(d: Necrod | None, *args: str, socket: Path | None = None) -> subprocess.CompletedProcess[str]:
    sock = socket or (d.socket if d else Path("/nonexistent.sock"))
    return subprocess.run(
        [sys.executable, "-m", "necrod.ctl.main", "--socket", str(sock), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_lease_round_trip(necrod: Necrod) -> None:
    r = ctl(necrod, "allocate", "repo", "--holder", "ci-job-1", "--ttl", "120", "--metadata", '{"job": 1}')
    assert r.returncode == 0, r.stderr
    path = r.stdout.strip()
    assert Path(path, "README").exists() and "lease l-" in r.stderr
    slots = json.loads(ctl(necrod, "slots", "--json").stdout)["slots"]
    held = next(s for s in slots if s["path"] == path)
    assert held["holder"] == "ci-job-1"
    table = ctl(necrod, "slots", "-l").stdout
    assert "ci-job-1" in table and "SLOT" in table and path in table
    beat = ctl(necrod, "heartbeat", held["lease_id"], "--ttl", "300")
    assert beat.returncode == 0 and "expires in" in beat.stdout
    rel = ctl(necrod, "release", held["lease_id"], "--json")
    assert json.loads(rel.stdout)["state"] == "cleaning"


def test_status_pools_and_reload(necrod: Necrod) -> None:
    r = ctl(necrod, "status")
    assert r.returncode == 0 and "running" in r.stdout and "repo" in r.stdout
    assert json.loads(ctl(necrod, "--json", "status").stdout)["state"] == "running"
    assert json.loads(ctl(necrod, "status", "--json").stdout)["state"] == "running"
    assert "main" in ctl(necrod, "pools").stdout
    reload = ctl(necrod, "reload")
    assert reload.returncode == 0 and "generation 2" in reload.stdout


def test_errors_exit_1_with_their_kind(necrod: Necrod) -> None:
    r = ctl(necrod, "allocate", "nope")
    assert r.returncode == 1 and "necroctl: not_found: no pool named 'nope'" in r.stderr
    r = ctl(necrod, "release", "l-0000", "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["error"]["kind"] == "not_found"
    r = ctl(necrod, "allocate", "repo", "--ref", "--upload-pack=x")
    assert r.returncode in (1, 2)


def test_invalid_config_on_reload_exits_1_and_status_is_degraded(necrod: Necrod) -> None:
    assert necrod.config_path is not None
    good = necrod.config_path.read_text()
    necrod.config_path.write_text(good + "    slots: zero\n")
    r = ctl(necrod, "reload")
    assert r.returncode == 1 and "failed_precondition" in r.stderr and "pools.yaml:" in r.stderr
    status = ctl(necrod, "status")
    assert status.returncode == 1 and "degraded" in status.stdout and "config rejected" in status.stdout
    assert "whole number" in status.stdout
    necrod.config_path.write_text(good)
    assert ctl(necrod, "reload").returncode == 0
    assert ctl(necrod, "status").returncode == 0


def test_usage_and_unreachable_exit_codes(workdir: Path) -> None:
    assert ctl(None, "frobnicate").returncode == 2
    r = ctl(None, "status", socket=workdir / "none.sock")
    assert r.returncode == 3 and "no necrod answers" in r.stderr
    assert ctl(None, "pools", socket=workdir / "none.sock").returncode == 3


def test_watch_prints_events(necrod: Necrod) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "necrod.ctl.main",
            "--socket",
            str(necrod.socket),
            "watch",
            "--json",
            "--topic",
            "leases",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        import time

        time.sleep(1.0)
        lease = json.loads(ctl(necrod, "allocate", "repo", "--json").stdout)
        line = proc.stdout.readline() if proc.stdout else ""
        event = json.loads(line)
        assert event["type"] == "lease.granted" and event["lease_id"] == lease["lease_id"]
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout:
            proc.stdout.close()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = (ROOT / "systemd" / "necrod.service").read_text()
    for name in ("necrod", "necroctl"):
        exe = tmp_path / name
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
        unit = unit.replace(f"/usr/local/bin/{name}", str(exe))
    (tmp_path / "necrod.service").write_text(unit)
    r = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "necrod.service")], capture_output=True, text=True
    )
    assert r.returncode == 0 and "necrod.service" not in r.stderr, r.stderr
    for directive in (
        "Type=notify",
        "WatchdogSec=",
        "RuntimeDirectory=necrod",
        "StateDirectory=necrod",
        "ConfigurationDirectory=necrod",
        "User=necrod",
        # Not ProtectSystem=strict: overlay slots keep the unit out of a mount namespace
        # (tests/test_systemd.py says which settings and why).
        "SystemCallFilter=~@privileged",
        "NoNewPrivileges=yes",
    ):
        assert directive in unit


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0, "0s"), (0.4, "0s"), (59.4, "59s"), (59.6, "1m00s"), (60, "1m00s"), (119.9, "2m00s"),
     (3599.7, "1h00m"), (3659.6, "1h01m"), (86399.6, "1d00h"), (90061, "1d01h"), (-75, "1m15s")],
)  # fmt: skip
def test_durations_carry_their_rounding(seconds: float, shown: str) -> None:
    assert render.duration(seconds) == shown


def test_no_duration_shows_a_full_unit() -> None:
    for tenths in range(0, 200_000, 7):
        text = render.duration(tenths / 10)
        assert not re.search(r"(?<!\d)(60[sm]|24h)", text), (tenths / 10, text)


# --- exit codes, --json errors, pipes (issue 20) ---------------------------------------------------


def test_status_exit_codes_for_each_state(necrod: Necrod, workdir: Path) -> None:
    assert ctl(necrod, "status").returncode == 0  # healthy
    assert necrod.config_path is not None
    necrod.config_path.write_text(necrod.config_path.read_text() + "    slots: -1\n")
    ctl(necrod, "reload")
    degraded = ctl(necrod, "status", "--json")
    assert degraded.returncode == 1 and json.loads(degraded.stdout)["state"] == "degraded"
    gone = ctl(None, "status", socket=workdir / "none.sock")
    assert gone.returncode == 3 and "no necrod answers" in gone.stderr


def _silent_socket(path: Path) -> socket.socket:
    """A socket that accepts connections and never answers: a wedged daemon."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)
    return server


def test_a_client_timeout_has_its_own_exit_code(workdir: Path) -> None:
    server = _silent_socket(workdir / "silent.sock")
    try:
        for command in ("status", "pools"):
            r = ctl(None, "--timeout", "0.5", command, socket=workdir / "silent.sock")
            assert r.returncode == 124, (command, r.returncode, r.stderr)
            assert "within 0.5s" in r.stderr and "may still complete" in r.stderr
        r = ctl(None, "--timeout", "0.5", "allocate", "repo", "--json", socket=workdir / "silent.sock")
        error = json.loads(r.stdout)["error"]
        assert r.returncode == 124 and error["kind"] == "timeout" and error["exit_code"] == 124
    finally:
        server.close()


def test_an_unreachable_daemon_is_a_json_error_under_json(workdir: Path) -> None:
    for command in (["status"], ["tasks"], ["logs", "t-1"], ["top"], ["watch"]):
        r = ctl(None, *command, "--json", socket=workdir / "none.sock")
        error = json.loads(r.stdout)["error"]
        assert (
            r.returncode == 3 and error["kind"] == "unreachable" and "no necrod answers" in error["message"]
        )
        assert error["exit_code"] == 3


def test_logs_json_prints_chunk_objects(necrod_factory: Any, origin: Path) -> None:
    d = necrod_factory(
        pool_config({"repo": origin}, slots=1, min_idle=0) + "runners:\n  sh:\n    launcher: process\n"
    )
    task = d.call("tasks.submit", {"pool": "repo", "command": ["echo", "hello from the task"]})
    wait_for(
        lambda: d.call("tasks.get", {"task_id": task["task_id"]})["state"] == "succeeded", what="the task"
    )
    r = ctl(d, "logs", task["task_id"], "--json")
    chunk = json.loads(r.stdout.splitlines()[0])
    assert r.returncode == 0 and "hello from the task" in chunk["data"] and chunk["eof"] is True


@pytest.mark.parametrize("command", ["status", "tasks", "pools"])
def test_a_closed_pipe_ends_quietly(necrod: Necrod, command: str) -> None:
    # The reader is gone before necroctl writes: what `necroctl tasks | head -1` meets at scale.
    read, write = os.pipe()
    os.close(read)
    proc = subprocess.run([sys.executable, "-m", "necrod.ctl.main", "--socket", str(necrod.socket), command],
                          stdout=write, stderr=subprocess.PIPE, text=True, timeout=60)  # fmt: skip
    os.close(write)
    assert proc.stderr == "" and proc.returncode == 0, proc.stderr
    shell = subprocess.run(f"{sys.executable} -m necrod.ctl.main --socket {necrod.socket} {command} | head -1",
                           shell=True, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert shell.stderr == "" and len(shell.stdout.splitlines()) == 1


def test_status_imports_only_what_it_needs(necrod: Necrod) -> None:
    probe = (
        "import sys, runpy\n"
        f"sys.argv = ['necroctl', '--socket', {str(necrod.socket)!r}, 'status']\n"
        "try:\n    runpy.run_module('necrod.ctl.main', run_name='__main__')\n"
        "except SystemExit as exc:\n    code = exc.code\n"
        "heavy = ['yaml', 'anyio', 'asyncio', 'asyncssh', 'rich', 'shtab', 'orjson', 'structlog',\n"
        "         'necrod.core.config', 'necrod.io.ssh']\n"
        "print('LOADED', [m for m in heavy if m in sys.modules], code)\n"
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert "LOADED [] 0" in r.stdout, r.stdout + r.stderr


# --- a CLI that feels native ----------------------------------------------------------------------


def test_completion_scripts_for_bash_zsh_and_fish() -> None:
    commands = ("status", "top", "allocate", "submit", "salvage", "completion")
    for shell in ("bash", "zsh", "fish"):
        r = ctl(None, "completion", shell)
        assert r.returncode == 0 and r.stdout, (shell, r.stderr)
        for name in commands:
            assert name in r.stdout, (shell, name)
        assert "--socket" in r.stdout and "--json" in r.stdout
    script = ctl(None, "completion", "bash").stdout
    assert subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True).returncode == 0
    # Loaded into a real bash, it completes a subcommand.
    probe = script + "\nCOMP_WORDS=(necroctl sta); COMP_CWORD=1; COMP_LINE='necroctl sta'; COMP_POINT=12\n"
    probe += "_shtab_necroctl necroctl sta necroctl; printf '%s\\n' \"${COMPREPLY[@]}\"\n"
    done = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30)
    assert "status" in done.stdout.split(), done.stdout + done.stderr
    assert ctl(None, "completion", "tcsh").returncode == 2


def test_every_command_has_examples_and_exit_codes_and_no_abbreviations() -> None:
    from necrod.ctl import cli

    parser = cli.parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert parser.allow_abbrev is False
    for name, sub in subs.choices.items():
        assert sub.allow_abbrev is False, name
        help_text = sub.format_help()
        assert "examples:" in help_text and "exit status:" in help_text, name
    assert "4    unknown" in subs.choices["status"].format_help()
    assert "124" in subs.choices["pools"].format_help()
    r = ctl(None, "slots", "--sta", "allocated")  # an abbreviation of --state
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr


#: What an agent can put in a holder, a label or a path: an OSC 52 clipboard write, a window
#: title, a screen clear, rich markup, a carriage return that hides what came before, a bidi override.
HOSTILE = (
    "agent\x1b]52;c;ZXZpbA==\x07\x1b]0;title\x07\x1b[2J[link=https://evil.example]x[/link]\rINNOCENT\u202e"
)


def on_a_terminal(argv: list[str]) -> str:
    """What ``argv`` writes to a terminal (a pty: stdout and stderr), as the terminal receives it."""
    master, slave = os.openpty()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child and its terminal are gone
            break
        if not chunk:
            break
        out += chunk
    proc.wait(30)
    os.close(master)
    return out.decode("utf-8", "replace")


def test_what_agents_wrote_reaches_a_terminal_escaped(necrod: Necrod) -> None:
    """A holder is a peer's free string: on the operator's terminal it must not act (clipboard,
    title, clear, a hidden line); ``--json`` escapes it too."""
    with necrod.client() as c:
        lease = c.allocate("repo", holder=HOSTILE)
        base = [sys.executable, "-m", "necrod.ctl.main", "--socket", str(necrod.socket)]
        shown = on_a_terminal([*base, "slots", "-l"])
        assert "\x1b" not in shown and "\r" not in shown.replace("\r\n", "\n") and "\u202e" not in shown
        assert "agent\\x1b]52;c;ZXZpbA==" in shown and "INNOCENT" in shown
        as_json = ctl(necrod, "slots", "--json")
        assert "\x1b" not in as_json.stdout and "\\u001b" in as_json.stdout
        c.release(lease["lease_id"])


def test_printable_escapes_what_acts_and_keeps_what_reads() -> None:
    assert (
        render.printable("plain text, ünïcödé, tabs\tand\nlines") == "plain text, ünïcödé, tabs\tand\nlines"
    )
    assert render.printable("a\x1b[2Jb\rc\u2028d\x85") == "a\\x1b[2Jb\\rc\\u2028d\\x85"
    assert render.table([(HOSTILE,)], ("HOLDER",)).count("\x1b") == 0
