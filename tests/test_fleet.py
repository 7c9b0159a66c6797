"""A fleet: tasks dispatched to other hosts' necrods over SSH.

Each host is a real necrod with its own state and socket, behind its own real SSH server on
loopback; the dispatching daemon reaches them only through SSH.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from necrod.io.procs import processes_in
from tests.helpers import Necrod, pool_config, wait_for
from tests.sshhelpers import Keys, SSHHost

PY = sys.executable


@dataclass
class Host:
    name: str
    daemon: Necrod
    ssh: SSHHost

    def kill(self) -> None:
        """The whole host goes away: its necrod, its sshd, and the runners it was running."""
        for pid in processes_in(str(self.daemon.state_dir)):
            try:
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.ssh.kill()
        self.daemon.kill9()


@pytest.fixture
def keys(workdir: Path) -> Keys:
    return Keys.make(workdir / "keys")


@pytest.fixture
def hosts(
    workdir: Path, origin: Path, keys: Keys, necrod_factory: Callable[..., Necrod]
) -> Iterator[list[Host]]:
    made = []
    for name in ("h1", "h2"):
        daemon = necrod_factory(pool_config({"repo": origin}, slots=3, max_slots=3, min_idle=0), name=name)
        made.append(Host(name, daemon, SSHHost(workdir / f"ssh-{name}", keys).start()))
    yield made
    for h in made:
        h.ssh.kill()


def fleet_config(hosts: list[Host], keys: Keys, workdir: Path, runner: str | list[str], *, grace: float = 60,
                 capacity: int = 2) -> str:  # fmt: skip
    known = workdir / "known_hosts"
    known.write_text("")
    for h in hosts:
        h.ssh.known_hosts(known)
    lines = ["pools: {}", "hosts:"]
    for h in hosts:
        lines += [f"  {h.name}:", f"    address: {h.ssh.url(h.daemon.socket)}", f"    key: {keys.client_key}",
                  f"    known_hosts: {known}", "    pools: [repo]", f"    max_concurrency: {capacity}"]  # fmt: skip
    lines += ["runners:", "  work:", f"    command: {json.dumps(runner)}", "    max_concurrency: 10",
              "dispatcher:", "  max_running: 10", f"  host_grace_s: {grace}", "  retry_backoff_s: 0.2",
              "  max_retries: 2"]  # fmt: skip
    return "\n".join(lines) + "\n"


def task(d: Necrod, task_id: str) -> dict[str, Any]:
    return d.call("tasks.get", {"task_id": task_id})  # type: ignore[no-any-return]


def wait_state(d: Necrod, task_id: str, state: str, timeout: float = 60) -> dict[str, Any]:
    return wait_for(lambda: (t := task(d, task_id))["state"] == state and t, timeout,  # type: ignore[no-any-return]
                    what=f"{task_id} to be {state}")  # fmt: skip


def hosts_up(d: Necrod, n: int) -> None:
    wait_for(
        lambda: sum(h["state"] == "up" for h in d.call("hosts.list")["hosts"][1:]) == n,
        30,
        what=f"{n} hosts up",
    )


def test_tasks_spread_across_hosts_within_their_capacity(
    hosts: list[Host], keys: Keys, workdir: Path, necrod_factory: Callable[..., Necrod]
) -> None:
    trace = workdir / "trace"
    script = (f"echo start {{task_id}} $NECROD_SOCKET $(date +%s.%N) >> {trace}; echo working in $PWD; sleep 0.8; "
              f"echo end {{task_id}} $NECROD_SOCKET $(date +%s.%N) >> {trace}")  # fmt: skip
    d = necrod_factory(fleet_config(hosts, keys, workdir, script), name="dispatcher")
    hosts_up(d, 2)
    ids = [d.call("tasks.submit", {"pool": "repo", "runner": "work"})["task_id"] for _ in range(6)]
    done = [wait_state(d, tid, "succeeded") for tid in ids]
    on = {t["attempts"][0]["host"] for t in done}
    assert on == {"h1", "h2"}
    socket_of = {str(h.daemon.socket): h.name for h in hosts}
    events = sorted((float(ts), kind, socket_of[sock]) for kind, _, sock, ts in
                    (line.split() for line in trace.read_text().splitlines()))  # fmt: skip
    running = {"h1": 0, "h2": 0}
    for _, kind, host in events:
        running[host] += 1 if kind == "start" else -1
        assert running[host] <= 2, events
    # The runner ran in the remote slot; its output streamed back into the local log.
    first = done[0]["attempts"][0]
    log = d.call("tasks.logs", {"task_id": ids[0]})["data"]
    assert f"working in {first['path']}" in log
    slot_owner = next(h for h in hosts if h.name == first["host"])
    assert first["path"].startswith(str(slot_owner.daemon.state_dir))
    listing = d.call("hosts.list")["hosts"]
    assert [h["name"] for h in listing] == ["local", "h1", "h2"] and all(h["last_contact"] for h in listing)


def test_runners_heartbeat_their_own_hosts_lease(
    hosts: list[Host], keys: Keys, workdir: Path, necrod_factory: Callable[..., Necrod]
) -> None:
    beat = [PY, "-c", "import os, time; from necrod.client import Client\nc = Client(os.environ['NECROD_SOCKET'])\n"
            "for _ in range(8):\n    c.heartbeat(os.environ['NECROD_LEASE_ID']); time.sleep(0.5)\n"]  # fmt: skip
    config = fleet_config(hosts, keys, workdir, beat).replace("    max_concurrency: 10\n",
                                                              "    max_concurrency: 10\n    lease_ttl_s: 1.5\n")  # fmt: skip
    d = necrod_factory(config, name="dispatcher")
    hosts_up(d, 2)
    tid = d.call("tasks.submit", {"pool": "repo", "runner": "work"})["task_id"]
    done = wait_state(d, tid, "succeeded")  # 4 s of work on a 1.5 s lease, kept by heartbeats
    assert len(done["attempts"]) == 1


def test_a_host_killed_mid_task_has_its_task_retried_elsewhere(
    hosts: list[Host], keys: Keys, workdir: Path, necrod_factory: Callable[..., Necrod]
) -> None:
    runs = workdir / "runs"
    script = f"echo $$ $(date +%s.%N) $NECROD_SOCKET >> {runs}; sleep 3; echo done"
    d = necrod_factory(fleet_config(hosts, keys, workdir, script, grace=2, capacity=1), name="dispatcher")
    hosts_up(d, 2)
    tid = d.call("tasks.submit", {"pool": "repo", "runner": "work"})["task_id"]
    first = wait_for(lambda: (t := task(d, tid))["attempts"] and runs.exists() and t["attempts"][0], 30,
                     what="the first attempt")  # fmt: skip
    victim = next(h for h in hosts if h.name == first["host"])
    first_pid = int(runs.read_text().split()[0])
    victim.kill()
    killed_at = time.time()
    done = wait_state(d, tid, "succeeded", timeout=90)
    attempts = done["attempts"]
    assert attempts[0]["outcome"] == "lost" and "unreachable" in attempts[0]["detail"], [
        (a["outcome"], a["detail"], a["host"]) for a in attempts
    ]
    assert attempts[-1]["host"] != victim.name and attempts[-1]["outcome"] == "succeeded"
    second_start = float(runs.read_text().splitlines()[-1].split()[1])
    assert second_start > killed_at  # the retry started after the first runner was gone ...
    with pytest.raises(ProcessLookupError):
        os.kill(first_pid, 0)  # ... and it is gone: the task never had two runners at once
    listing = {h["name"]: h for h in d.call("hosts.list")["hosts"]}
    assert listing[victim.name]["state"] == "down" and listing[victim.name]["error"]


def test_a_host_that_comes_back_is_reconciled(
    hosts: list[Host], keys: Keys, workdir: Path, necrod_factory: Callable[..., Necrod]
) -> None:
    script = "sleep 4; echo finished"
    d = necrod_factory(fleet_config(hosts, keys, workdir, script, grace=30, capacity=1), name="dispatcher")
    hosts_up(d, 2)
    tid = d.call("tasks.submit", {"pool": "repo", "runner": "work"})["task_id"]
    first = wait_for(lambda: (t := task(d, tid))["attempts"] and t["attempts"][0], 30, what="an attempt")
    host = next(h for h in hosts if h.name == first["host"])
    time.sleep(0.5)
    host.ssh.kill()  # the link drops; the runner on the host goes on
    wait_for(lambda: {h["name"]: h for h in d.call("hosts.list")["hosts"]}[host.name]["state"] == "down", 30,
             what="the host to be seen down")  # fmt: skip
    host.ssh.start()  # back within the grace
    done = wait_state(d, tid, "succeeded", timeout=60)
    assert len(done["attempts"]) == 1 and done["attempts"][0]["outcome"] == "succeeded"
    assert "finished" in d.call("tasks.logs", {"task_id": tid})["data"]


def test_a_written_off_runner_is_stopped_when_its_host_returns(
    hosts: list[Host], keys: Keys, workdir: Path, necrod_factory: Callable[..., Necrod]
) -> None:
    runs = workdir / "runs"
    script = f"echo $$ $NECROD_SOCKET >> {runs}; sleep 30"
    d = necrod_factory(fleet_config(hosts, keys, workdir, script, grace=2, capacity=1), name="dispatcher")
    hosts_up(d, 2)
    tid = d.call("tasks.submit", {"pool": "repo", "runner": "work"})["task_id"]
    first = wait_for(lambda: (t := task(d, tid))["attempts"] and runs.exists() and t["attempts"][0], 30,
                     what="the first attempt")  # fmt: skip
    host = next(h for h in hosts if h.name == first["host"])
    stale_pid = int(runs.read_text().split()[0])
    host.ssh.kill()  # unreachable, but its runner goes on
    wait_for(lambda: len(task(d, tid)["attempts"]) == 2, 60, what="the task to run elsewhere")
    os.kill(stale_pid, 0)  # still running while its host is out of reach
    host.ssh.start()
    wait_for(lambda: not _alive(stale_pid), 60, what="the written-off runner to be stopped")
    wait_for(
        lambda: task(d, tid)["attempts"][0]["cleanup_pending"] is False, 30, what="the cleanup to be recorded"
    )
    d.call("tasks.cancel", {"task_id": tid})


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_necroctl_hosts(
    hosts: list[Host], keys: Keys, workdir: Path, necrod_factory: Callable[..., Necrod]
) -> None:
    d = necrod_factory(fleet_config(hosts, keys, workdir, "true"), name="dispatcher")
    hosts_up(d, 2)
    out = subprocess.run([PY, "-m", "necrod.ctl.main", "--socket", str(d.socket), "hosts"], capture_output=True,
                         text=True, timeout=30).stdout  # fmt: skip
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["HOST", "STATE", "ADDRESS"]
    assert any(line.startswith("h1") and " up " in line and "repo" in line for line in lines)
