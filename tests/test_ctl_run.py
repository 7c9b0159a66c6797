"""``necroctl run`` against a real daemon: the command's exit status, signals, heartbeats,
salvage, a daemon restart in the middle, and a lease lost while the command runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Necrod, pool_config, wait_for

pytestmark = pytest.mark.timeout(60)

EXIT_LEASE_LOST, EXIT_NOT_STARTED, EXIT_NOT_FOUND = 75, 125, 127


def run_argv(d: Necrod, *options: str, command: list[str]) -> list[str]:
    # --wait: a slot released by the previous run may still be cleaning.
    return [sys.executable, "-m", "necrod.ctl.main", "--socket", str(d.socket), "run", "--pool", "repo",
            "--json", "--wait", "20", *options, "--", *command]  # fmt: skip


def run(d: Necrod, *options: str, script: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    argv = run_argv(d, *options, command=["sh", "-c", script])
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def reports(stderr: str) -> dict[str, Any]:
    """The JSON lines ``--json`` prints on stderr: ``lease`` at the start, ``result`` at the end."""
    found: dict[str, Any] = {}
    for line in stderr.splitlines():
        if line.startswith("{"):
            found.update(json.loads(line))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


@contextmanager
def running(d: Necrod, *options: str, script: str, pid_file: Path) -> Iterator[subprocess.Popen[str]]:
    """``necroctl run`` in the background; its command writes its pid to ``pid_file`` first."""
    script = f'echo $$ > "{pid_file}"; {script}'
    proc = subprocess.Popen(
        run_argv(d, *options, command=["sh", "-c", script]), stderr=subprocess.PIPE, text=True
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if pid_file.exists() and pid_file.read_text().strip():
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.stderr:
            proc.stderr.close()


def started(pid_file: Path) -> int:
    return int(wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 20, what="the command"))


def finish(proc: subprocess.Popen[str], timeout: float = 20) -> tuple[int, str]:
    _, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stderr


def lease_of(d: Necrod, lease_id: str) -> dict[str, Any] | None:
    return next((s for s in d.call("slots.list")["slots"] if s["lease_id"] == lease_id), None)


def salvaged(d: Necrod) -> set[str]:
    return {s["lease_id"] for s in d.call("salvage.list")["salvage"]}


def test_the_command_runs_in_the_slot_and_its_exit_status_is_necroctls(necrod: Necrod, workdir: Path) -> None:
    env_file = workdir / "env.json"
    r = run(necrod, "--holder", "ci-1", script=f'{sys.executable} -c "import json, os; '
            f"print(json.dumps(dict(os.environ, PWD=os.getcwd())))\" > {env_file}")  # fmt: skip
    assert r.returncode == 0, r.stderr
    lease = reports(r.stderr)["lease"]
    env = json.loads(env_file.read_text())
    assert env["PWD"] == env["NECROD_SLOT_PATH"] == lease["path"]
    assert env["NECROD_LEASE_ID"] == lease["lease_id"] and env["NECROD_SLOT_ID"] == lease["slot_id"]
    assert env["NECROD_SOCKET"] == str(necrod.socket) and env["NECROD_POOL"] == "repo"
    assert (
        env["NECROD_FENCING_TOKEN"] == str(lease["fencing_token"]) and env["NECROD_COMMIT"] == lease["commit"]
    )
    assert lease["holder"] == "ci-1" and float(env["NECROD_LEASE_TTL_S"]) == lease["ttl_s"]
    assert reports(r.stderr)["result"] == {
        "lease_id": lease["lease_id"], "slot_id": lease["slot_id"], "command_status": 0, "exit_code": 0,
        "released": True, "salvage": False, "lease_lost": None,
    }  # fmt: skip
    assert lease_of(necrod, lease["lease_id"]) is None

    r = run(necrod, script="exit 3")
    assert r.returncode == 3 and reports(r.stderr)["result"]["released"], r.stderr
    r = run(necrod, script="kill -KILL $$")
    assert r.returncode == 128 + signal.SIGKILL, r.stderr
    r = run(necrod, script="kill -USR1 $$")
    assert r.returncode == 128 + signal.SIGUSR1, r.stderr
    assert necrod.call("slots.list", {"state": "allocated"})["slots"] == []


def test_what_stops_it_before_the_command_runs_has_its_own_exit_codes(necrod: Necrod, workdir: Path) -> None:
    r = subprocess.run(
        run_argv(necrod, command=["/nonexistent/tool"]), capture_output=True, text=True, timeout=30
    )
    assert r.returncode == EXIT_NOT_FOUND and "cannot run '/nonexistent/tool'" in r.stderr
    assert necrod.call("slots.list", {"state": "allocated"})["slots"] == []
    r = subprocess.run(
        [sys.executable, "-m", "necrod.ctl.main", "--socket", str(necrod.socket), "run", "--pool", "nope", "--", "true"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == EXIT_NOT_STARTED and "not_found" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "necrod.ctl.main", "--socket", str(workdir / "none.sock"), "run", "--pool", "repo",
         "--", "true"], capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == EXIT_NOT_STARTED and "no necrod answers" in r.stderr
    r = subprocess.run([sys.executable, "-m", "necrod.ctl.main", "-H", "ssh://build-3", "run", "--pool", "repo",
                        "--", "true"], capture_output=True, text=True, timeout=30)  # fmt: skip
    assert r.returncode == 2 and "-H" in r.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_signals_are_forwarded_to_the_command(necrod: Necrod, workdir: Path, signum: signal.Signals) -> None:
    marker, pid_file = workdir / "marker", workdir / "pid"
    name = signum.name.removeprefix("SIG")
    script = f'trap "echo got {name} > {marker}; exit 7" {name}; while :; do sleep 0.1; done'
    with running(necrod, script=script, pid_file=pid_file) as proc:
        started(pid_file)
        proc.send_signal(signum)
        code, stderr = finish(proc)
    assert code == 7, stderr
    assert marker.read_text() == f"got {name}\n"
    assert reports(stderr)["result"]["salvage"] is True


def test_a_signal_while_queued_for_a_slot_gives_up_the_place(
    necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path
) -> None:
    # At max_slots, so that the queued run waits instead of making the pool grow.
    necrod = necrod_factory(pool_config({"repo": origin}, slots=2, min_idle=0, max_slots=2))
    holders = [necrod.call("slots.allocate", {"pool": "repo", "holder": f"h{i}"}) for i in range(2)]
    with running(necrod, "--wait", "30", script="true", pid_file=workdir / "pid") as proc:
        wait_for(lambda: necrod.call("pools.get", {"pool": "repo"})["waiting"] == 1, 10, what="a queued run")
        proc.send_signal(signal.SIGINT)
        code, stderr = finish(proc)
    assert code == 128 + signal.SIGINT and "before the command started" in stderr
    assert not (workdir / "pid").exists()
    necrod.call("slots.release", {"lease_id": holders[0]["lease_id"]})
    necrod.wait_slots("repo", "available", 1)
    assert [s["holder"] for s in necrod.call("slots.list", {"state": "allocated"})["slots"]] == ["h1"]


def test_heartbeats_keep_a_short_lease_past_its_ttl(necrod: Necrod, workdir: Path) -> None:
    pid_file = workdir / "pid"
    with running(necrod, "--ttl", "1", script="sleep 4", pid_file=pid_file) as proc:
        started(pid_file)
        time.sleep(2.5)
        held = necrod.call("slots.list", {"state": "allocated"})["slots"]
        assert len(held) == 1 and held[0]["expires_at"] > time.time()
        code, stderr = finish(proc)
    assert code == 0, stderr
    result = reports(stderr)["result"]
    assert result["released"] and result["lease_lost"] is None and result["lease_id"] == held[0]["lease_id"]


def test_salvage_follows_the_policy(necrod: Necrod) -> None:
    leaves_work = "echo work > left-behind.txt"
    failed = reports(run(necrod, script=f"{leaves_work}; exit 1").stderr)["result"]
    succeeded = reports(run(necrod, script=leaves_work).stderr)["result"]
    always = reports(run(necrod, "--salvage", "always", script=leaves_work).stderr)["result"]
    never = reports(run(necrod, "--salvage", "never", script=f"{leaves_work}; exit 1").stderr)["result"]
    assert [failed["salvage"], succeeded["salvage"], always["salvage"], never["salvage"]] == [
        True,
        False,
        True,
        False,
    ]
    wait_for(
        lambda: {failed["lease_id"], always["lease_id"]} <= salvaged(necrod), 20, what="the salvage refs"
    )
    wait_for(lambda: all(s["state"] == "available" for s in necrod.call("slots.list")["slots"]), 20,
             what="every slot cleaned")  # fmt: skip
    assert not {succeeded["lease_id"], never["lease_id"]} & salvaged(necrod)
    show = necrod.call("salvage.show", {"lease_id": failed["lease_id"]})
    assert any(f["path"] == "left-behind.txt" for f in show["files"])


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_the_lease_outlives_a_daemon_restart(necrod: Necrod, workdir: Path, stop: str) -> None:
    go, pid_file = workdir / "go", workdir / "pid"
    script = f'while [ ! -e "{go}" ]; do sleep 0.05; done'
    with running(necrod, "--ttl", "1.5", script=script, pid_file=pid_file) as proc:
        started(pid_file)
        if stop == "sigterm":
            necrod.terminate()
        else:
            necrod.kill9()
        time.sleep(0.5)
        necrod.start()
        # Longer than the TTL of grace a restart gives: only heartbeats keep the lease now.
        time.sleep(2.5)
        go.touch()
        code, stderr = finish(proc)
    assert code == 0, stderr
    assert reports(stderr)["result"]["released"] and "answers again" in stderr


def test_a_lost_lease_stops_the_command(necrod: Necrod, workdir: Path) -> None:
    pid_file = workdir / "pid"
    # The command ignores SIGTERM (and so does its sleep): only the SIGKILL after the grace stops it.
    script = "trap '' TERM; sleep 30"
    with running(necrod, "--ttl", "1.5", "--grace", "0.5", script=script, pid_file=pid_file) as proc:
        pid = started(pid_file)
        slot = necrod.call("slots.list", {"state": "allocated"})["slots"][0]
        necrod.call("slots.remove", {"slot_id": slot["slot_id"], "force": True})
        code, stderr = finish(proc)
    assert code == EXIT_LEASE_LOST, stderr
    assert f"lost the lease: lease {slot['lease_id']} revoked" in stderr
    result = reports(stderr)["result"]
    assert (
        result["lease_lost"] and not result["released"] and result["command_status"] == 128 + signal.SIGKILL
    )
    assert not alive(pid)
