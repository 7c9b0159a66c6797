"""necroctl as scripts and people use it: output, --json, exit codes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from necrod.ctl import render
from tests.helpers import Necrod

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
    assert status.returncode == 3 and "degraded" in status.stdout and "config rejected" in status.stdout
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
        "ProtectSystem=strict",
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
