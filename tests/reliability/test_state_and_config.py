"""The daemon's own files under attack or trouble: pools.yaml made hostile (nested past the
parser's recursion, a FIFO, a device, huge, naming what cannot start), a small or full state file
system, and fencing tokens that must outlive a pool. Every refusal keeps the running config and
says why; the daemon keeps serving throughout."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from necrod.client import Client
from necrod.proto.errors import NecrodError
from tests.helpers import Necrod, wait_for
from tests.reliability.conftest import FIGURES, daemon_config

pytestmark = pytest.mark.reliability

#: A client timeout well under the test's: a frozen daemon fails the test, it does not hang it.
PROMPT_S = 10.0


# --- a daemon whose pools.yaml the tests replace --------------------------------------------------


@pytest.fixture(scope="module")
def config_daemon(module_daemon: Callable[..., Necrod]) -> Necrod:
    return module_daemon(lambda origin: daemon_config({"repo": origin}, slots=1, min_idle=0))


@pytest.fixture
def guarded(config_daemon: Necrod) -> Iterator[tuple[Necrod, Client, Client]]:
    """The shared daemon, a client, and a subscriber to config events; the good pools.yaml is put
    back afterwards (atomically, as a regular file) and must be applied again."""
    d = config_daemon
    assert d.config_path is not None
    good = d.config_path.read_text()
    with d.client(timeout=PROMPT_S) as watcher, d.client(timeout=PROMPT_S) as c:
        watcher.subscribe(["config"], snapshot=False)
        try:
            yield d, c, watcher
        finally:
            replace_config(d, good)
            if c.status()["config"]["last_reload_error"] is not None:
                c.call("daemon.reload")
            wait_for(lambda: c.status()["state"] == "running", 30, what="the good config back")


def replace_config(d: Necrod, text: str) -> None:
    """Write pools.yaml as an editor would: a new file renamed over the old one."""
    assert d.config_path is not None
    tmp = d.config_path.with_name(".pools.yaml.tmp")
    tmp.unlink(missing_ok=True)
    tmp.write_text(text)
    os.replace(tmp, d.config_path)


def replace_config_with(d: Necrod, make: Callable[[Path], None]) -> None:
    """Put whatever ``make`` creates (a FIFO, a symlink, a sparse file) in pools.yaml's place."""
    assert d.config_path is not None
    tmp = d.config_path.with_name(".pools.yaml.tmp")
    tmp.unlink(missing_ok=True)
    make(tmp)
    os.replace(tmp, d.config_path)


def trigger_reload(d: Necrod, c: Client, how: str) -> None:
    """Make the daemon read its (already replaced) pools.yaml: by SIGHUP, by daemon.reload, or by
    leaving it to the file watcher."""
    if how == "sighup":
        assert d.proc is not None
        os.kill(d.proc.pid, signal.SIGHUP)
    elif how == "rpc":
        with pytest.raises(NecrodError) as info:
            c.reload()
        assert info.value.kind == "failed_precondition", info.value
    else:
        assert how == "watcher"


def wait_refused(d: Necrod, c: Client, watcher: Client, generation: int, how: str) -> dict[str, Any]:
    """The bad file was refused, reported everywhere, and changed nothing; returns the error."""
    wait_for(
        lambda: c.status()["config"]["last_reload_error"] is not None, 30, what="the bad config to be refused"
    )
    status = c.status()
    assert d.proc is not None and d.proc.poll() is None, "the daemon died"
    assert status["pid"] == d.proc.pid
    assert status["config"]["generation"] == generation, "the bad config was applied"
    assert status["state"] == "degraded" and any("config rejected" in r for r in status["degraded"])
    assert sorted(status["pools"]) == ["repo"] and status["pools"]["repo"]["state"] == "ready"
    error: dict[str, Any] = status["config"]["last_reload_error"]
    assert error["file"] == str(d.config_path), error
    rejected = [e for e in watcher.events(timeout=2) if e["type"] == "config.rejected"]
    assert rejected and rejected[0]["message"] == error["message"], rejected
    reason = {"sighup": "SIGHUP", "rpc": "rpc", "watcher": "file changed"}[how]
    wait_for(
        lambda: any(
            e.get("event") == "config_rejected" and e.get("reason") == reason for e in d.log_events()
        ),
        10,
        what=f"config_rejected logged for {reason}",
    )
    # Still serving, on the old config.
    lease = c.allocate("repo", holder="after-refusal", wait_s=30)
    c.release(lease["lease_id"], salvage=False)
    FIGURES["hostile pools.yaml refused while serving"] += 1
    return error


TRIGGERS = ["sighup", "rpc", "watcher"]


# --- issue 16 #8: any failure of a reload keeps the old config and is reported --------------------


def _deep_flow(good: str) -> str:
    return "pools: " + "[" * 5000 + "]" * 5000 + "\n"


def _deep_block(good: str) -> str:
    return "pools:\n" + "".join(f"{' ' * i}k{i}:\n" for i in range(1, 800)) + " " * 800 + "x: 1\n"


def _unreadable_value(good: str) -> str:
    return good.replace("slots: 1", "slots: !!int one")


def _python_tag(good: str) -> str:
    return good.replace("min_idle: 0", "min_idle: !!python/name:os.system ''")


@pytest.mark.parametrize("how", TRIGGERS)
@pytest.mark.parametrize(
    ("make", "expected"),
    [
        pytest.param(_deep_flow, "nested too deeply", id="deep-flow"),
        pytest.param(_deep_block, "nested too deeply", id="deep-block"),
        pytest.param(_unreadable_value, "cannot read this value", id="bad-int-tag"),
        pytest.param(_python_tag, "cannot read this value", id="python-tag"),
    ],
)
def test_a_config_the_parser_cannot_read_is_refused_and_the_daemon_keeps_serving(
    guarded: tuple[Necrod, Client, Client], how: str, make: Callable[[str], str], expected: str
) -> None:
    d, c, watcher = guarded
    assert d.config_path is not None
    generation = c.status()["config"]["generation"]
    replace_config(d, make(d.config_path.read_text()))
    trigger_reload(d, c, how)
    error = wait_refused(d, c, watcher, generation, how)
    assert expected in error["message"], error


@pytest.mark.parametrize(
    "make", [_deep_flow, _deep_block, _python_tag], ids=["deep-flow", "deep-block", "python-tag"]
)
def test_a_config_the_parser_cannot_read_stops_a_start_with_one_clear_line(
    necrod_factory: Callable[..., Necrod], origin: Path, make: Callable[[str], str]
) -> None:
    d = necrod_factory(make(daemon_config({"repo": origin}, slots=1, min_idle=0)), start=False)
    d.start(wait=False)
    assert d.proc is not None
    assert d.proc.wait(30) == 1
    log = d.log()
    assert "necrod: " in log and str(d.config_path) in log, log
    assert "Traceback" not in log, log
