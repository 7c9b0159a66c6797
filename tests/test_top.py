"""``necroctl top`` as a person sees it: in a real terminal (tmux), against a real daemon.

The tmux server of each test has a socket of its own (``-S`` in the test's directory), so the
tests neither see nor disturb anyone else's sessions, and it is killed at the end.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import Necrod, pool_config, wait_for

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")

RUNNER = "runners:\n  sh:\n    launcher: process\n"


class Terminal:
    """One tmux session, 160x50, running a command; ``screen`` is what a person would see."""

    def __init__(self, root: Path) -> None:
        self.socket = root / "tmux.sock"

    def tmux(self, *args: str) -> str:
        r = subprocess.run(
            ["tmux", "-S", str(self.socket), *args], capture_output=True, text=True, timeout=10
        )
        assert r.returncode == 0, r.stderr
        return r.stdout

    def start(self, command: str, term: str = "xterm-256color") -> None:
        # The shell stays a moment after the command, to show how it ended. (tmux sets TERM in
        # the pane itself: the command is given its own.)
        self.tmux("-f", "/dev/null", "new-session", "-d", "-x", "160", "-y", "50",
                  f"TERM={term} {command}; echo EXITED $?; sleep 30")  # fmt: skip

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p")

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", *keys)

    def wait(self, predicate: Callable[[str], bool], what: str, timeout: float = 20.0) -> str:
        last = ""

        def seen() -> bool:
            nonlocal last
            last = self.screen()
            return predicate(last)

        try:
            wait_for(seen, timeout, interval=0.2, what=what)
        except AssertionError:
            raise AssertionError(f"{what}; the screen was:\n{last}") from None
        return last

    def close(self) -> None:
        subprocess.run(["tmux", "-S", str(self.socket), "kill-server"], capture_output=True, timeout=10)


@pytest.fixture
def terminal(workdir: Path) -> Iterator[Terminal]:
    term = Terminal(workdir)
    yield term
    term.close()


@pytest.fixture
def busy(necrod_factory: Callable[..., Necrod], origin: Path) -> Iterator[tuple[Necrod, str, str]]:
    """A daemon with two pools, a lease held by agent-7 in ``repo`` and a task running there
    (cancelled at the end: a runner outlives its daemon, by design)."""
    d = necrod_factory(pool_config({"repo": origin, "other": origin}, slots=2, min_idle=0) + RUNNER)
    with d.client() as c:
        lease = c.allocate("repo", holder="agent-7", ttl_s=600)
        task = c.submit("repo", command=["sleep", "120"])
    wait_for(
        lambda: d.call("tasks.get", {"task_id": task["task_id"]})["state"] == "running",
        what="the task to run",
    )
    yield d, lease["lease_id"], task["task_id"]
    d.call("tasks.cancel", {"task_id": task["task_id"], "force": True})


def necroctl(d: Necrod, *args: str) -> str:
    return f"{sys.executable} -m necrod.ctl.main --socket {d.socket} {' '.join(args)}"


def _row(screen: str, first: str) -> str:
    return next((line for line in screen.splitlines() if line.split()[:1] == [first]), "")


@pytest.mark.timeout(90)
def test_the_dashboard_shows_pools_leases_tasks_and_follows_events(
    busy: tuple[Necrod, str, str], terminal: Terminal
) -> None:
    d, lease_id, task_id = busy
    terminal.start(necroctl(d, "top"))
    screen = terminal.wait(lambda s: "agent-7" in s and task_id in s, "the dashboard to draw")
    assert "all pools" in screen
    assert "ready" in _row(screen, "repo") and "ready" in _row(screen, "other")
    lease_row = next(line for line in screen.splitlines() if "agent-7" in line)
    assert re.search(r"in (9m|10m00s)", lease_row), screen  # its expiry, counting down from 10 minutes
    task_row = _row(screen, task_id)
    assert "running" in task_row and "repo/" in task_row, screen

    # Events move it: the lease ends and the view says so without being asked.
    d.call("slots.release", {"lease_id": lease_id})
    screen = terminal.wait(lambda s: "agent-7" not in s.split("events")[0] and "lease.released" in s,
                           "the released lease to leave the leases panel")  # fmt: skip

    # f filters by pool: the first pool by name is "other", where nothing runs.
    terminal.keys("f")
    screen = terminal.wait(lambda s: "pool other" in s, "the filter on pool other")
    assert _row(screen, "other") and not _row(screen, "repo") and task_id not in screen
    terminal.keys("0")
    terminal.wait(lambda s: "all pools" in s and task_id in s, "the filter to be lifted")

    terminal.keys("p")
    terminal.wait(lambda s: "PAUSED" in s, "the pause to show")
    terminal.keys("p")
    terminal.wait(lambda s: "PAUSED" not in s, "the pause to end")

    terminal.keys("q")
    terminal.wait(lambda s: "EXITED 0" in s, "q to quit with status 0")


@pytest.mark.timeout(60)
def test_a_dumb_terminal_gets_plain_refreshing_tables(
    busy: tuple[Necrod, str, str], terminal: Terminal
) -> None:
    d, _, task_id = busy
    terminal.start(necroctl(d, "top", "--interval", "1"), term="dumb")
    screen = terminal.wait(lambda s: s.count("== necrod at") >= 2, "two plain refreshes")
    assert "agent-7" in screen and task_id in screen and "POOL" in screen
    assert "\x1b" not in screen


@pytest.mark.timeout(60)
def test_top_off_a_terminal_prints_tables_or_json(busy: tuple[Necrod, str, str]) -> None:
    d, _, task_id = busy
    for extra, check in (([], lambda out: "agent-7" in out and task_id in out and "pools (2)" in out),
                         (["--json"], lambda out: json.loads(out.splitlines()[0])["leases"][0]["holder"])):  # fmt: skip
        proc = subprocess.Popen(necroctl(d, "top", "--interval", "1", *extra).split(), stdout=subprocess.PIPE,
                                text=True)  # fmt: skip
        try:
            assert proc.stdout is not None
            lines = []
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and len(lines) < 40:
                lines.append(proc.stdout.readline())
                if extra:
                    break
            assert check("".join(lines)), "".join(lines)
        finally:
            proc.terminate()
            proc.wait(10)
            if proc.stdout:
                proc.stdout.close()


@pytest.mark.timeout(90)
def test_the_dashboard_over_ssh(necrod: Necrod, terminal: Terminal, workdir: Path) -> None:
    from tests.sshhelpers import Keys, SSHHost

    keys = Keys.make(workdir / "keys")
    host = SSHHost(workdir / "host", keys).start()
    try:
        known = host.known_hosts(workdir / "known_hosts")
        necrod.call("slots.allocate", {"pool": "repo", "holder": "agent-9", "ttl_s": 600})
        command = (f"{sys.executable} -m necrod.ctl.main -H {host.url(necrod.socket)} --ssh-key {keys.client_key} "
                   f"--known-hosts {known} top")  # fmt: skip
        terminal.start(command)
        screen = terminal.wait(lambda s: "agent-9" in s, "the dashboard over SSH", timeout=40)
        assert "ssh://" in screen and _row(screen, "repo")
        # Events come through the SSH channel too.
        with necrod.client() as c:
            c.allocate("repo", holder="agent-10", ttl_s=600)
        terminal.wait(lambda s: "agent-10" in s, "an event over SSH")
        terminal.keys("q")
        terminal.wait(lambda s: "EXITED 0" in s, "q to quit")
    finally:
        host.kill()


def test_the_picture_follows_prepare_fetch_and_failures_from_events() -> None:
    from necrod.ctl.topmodel import Picture

    p = Picture()
    p.load({"seq": 5, "snapshot": {"pools": [{"name": "web", "state": "ready", "base": "main",
                                              "fetch": {"state": "ok", "last_ok_at": 1000.0}, "prepare": None}],
                                   "slots": [{"slot_id": "web/1", "pool": "web", "state": "available"}]}},
           [], [])  # fmt: skip
    events = [
        {"seq": 6, "ts": 1010.0, "type": "pool.prepare", "pool": "web", "state": "running", "key": "k1"},
        {"seq": 7, "ts": 1020.0, "type": "pool.fetch", "pool": "web", "ok": False, "error": "host down",
         "failing_since": 1020.0},
        {"seq": 8, "ts": 1030.0, "type": "lease.granted", "pool": "web", "slot_id": "web/1", "lease_id": "l-1",
         "holder": "ci", "granted_at": 1030.0, "expires_at": 1090.0, "task_id": None},
        {"seq": 9, "ts": 1031.0, "type": "task.submitted", "task_id": "t-1", "state": "queued", "pool": "web"},
        {"seq": 10, "ts": 1032.0, "type": "task.failed", "task_id": "t-1", "state": "failed", "pool": "web",
         "outcome": "failed", "detail": "exit 2"},
    ]  # fmt: skip
    for e in events:
        p.apply(e)
    pools, leases, tasks, _, shown = p.panels(now=1045.0)
    assert pools.rows[0][0] == "web" and pools.rows[0][3] == "1"  # one slot allocated
    assert pools.rows[0][7] == "failing for 25s" and pools.rows[0][8] == "running 35s"
    assert leases.rows == [("web/1", "ci", "15s", "in 45s", "-")]
    assert tasks.rows == [("t-1", "failed", "web", "-", "13s ago", "exit 2")]
    assert [r[2] for r in shown.rows][:2] == ["task.failed", "task.submitted"] and p.seq == 10
    assert not p.overdue_leases(1080.0) and p.overdue_leases(1100.0)  # heartbeats publish no event
    p.apply({"seq": 11, "ts": 1050.0, "type": "lease.released", "slot_id": "web/1", "lease_id": "l-1"})
    assert p.panels(now=1051.0)[1].rows == [] and p.panels(now=1051.0, pool="other")[0].rows == []


def test_a_cell_is_text_never_markup_or_escapes() -> None:
    """rich reads ``[link=…]`` and ``[style]`` in a plain string: a holder would plant a link or
    fake a style on the operator's dashboard."""
    from rich.console import Console

    from necrod.ctl.top import _table
    from necrod.ctl.topmodel import Panel

    holder = "agent\x1b]52;c;ZXZpbA==\x07[link=https://evil.example]click[/link][bold red]OK[/]"
    console = Console(record=True, force_terminal=True, width=200, color_system="truecolor")
    console.print(_table(Panel("leases", ("HOLDER",), [(holder,)])))
    out = console.export_text(styles=True)
    assert "evil.example" in out and "[link=" in out  # shown as the characters it is
    assert "\x1b]8;" not in out and "\x1b]52" not in out and "\x1b[1;31m" not in out
