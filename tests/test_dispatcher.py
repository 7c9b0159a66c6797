"""The dispatcher: real runner processes (small scripts) in real slots."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from necrod.io.attemptlog import MAX_LOG_BYTES, cut_line
from necrod.io.launchers import _capped_copy
from necrod.proto.errors import FailedPrecondition, InvalidParams, NotFound
from tests.helpers import Necrod, git, same_turn, wait_for

PY = sys.executable
# A well-behaved runner: heartbeats, and rides out a daemon restart (the lease survives it).
HEARTBEAT = (
    "import os, time; from necrod.client import Client, DaemonUnreachable\n"
    "c = Client(os.environ['NECROD_SOCKET'], timeout=5)\n"
    "for _ in range(int(os.environ.get('BEATS', '6'))):\n"
    "    try:\n"
    "        c.heartbeat(os.environ['NECROD_LEASE_ID'])\n"
    "    except DaemonUnreachable:\n"
    "        c.close()\n"
    "    time.sleep(0.5)\n"
)


def alive(pid: int) -> bool:
    """Running (a killed orphan nobody reaped yet is a zombie, not alive)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def config(origin: Path, *, slots: int = 2, runners: str = "", dispatcher: str = "") -> str:
    text = f"pools:\n  repo:\n    repo_url: {origin}\n    slots: {slots}\n    max_slots: {slots}\n    min_idle: 0\n"
    if runners:
        text += "runners:\n" + runners
    if dispatcher:
        text += "dispatcher:\n" + dispatcher
    return text


def profile(name: str, command: str | list[str], **keys: Any) -> str:
    lines = [f"  {name}:", f"    command: {json.dumps(command)}"]
    lines += [f"    {k}: {json.dumps(v)}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


def task(d: Necrod, task_id: str) -> dict[str, Any]:
    return d.call("tasks.get", {"task_id": task_id})  # type: ignore[no-any-return]


def wait_state(d: Necrod, task_id: str, *states: str, timeout: float = 30) -> dict[str, Any]:
    return wait_for(lambda: (t := task(d, task_id))["state"] in states and t, timeout,  # type: ignore[no-any-return]
                    what=f"{task_id} to be {'/'.join(states)}")  # fmt: skip


def submit(d: Necrod, **params: Any) -> str:
    return d.call("tasks.submit", params)["task_id"]  # type: ignore[no-any-return]


def test_a_task_runs_in_its_own_slot_with_the_runner_environment(
    necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path
) -> None:
    out = workdir / "env.json"
    script = (f"import json, os; json.dump({{k: v for k, v in os.environ.items()}}, open({str(out)!r}, 'w')); "
              "open('made-by-the-runner.txt', 'w').write('x'); print('hello from', os.getcwd())")  # fmt: skip
    d = necrod_factory(config(origin, runners=profile("py", [PY, "-c", script, "{payload.note}"])))
    tid = submit(d, pool="repo", runner="py", payload={"note": "a note; $(rm -rf /)"}, env={"EXTRA": "1"})
    done = wait_state(d, tid, "succeeded")
    env = json.loads(out.read_text())
    attempt = done["attempts"][0]
    assert env["NECROD_TASK_ID"] == tid and env["NECROD_SLOT_PATH"] == attempt["path"]
    assert env["NECROD_LEASE_ID"] == attempt["lease_id"] and env["NECROD_SOCKET"] == str(d.socket)
    assert json.loads(env["NECROD_PAYLOAD"]) == {"note": "a note; $(rm -rf /)"} and env["EXTRA"] == "1"
    assert "NOTIFY_SOCKET" not in env and "NECROD_STATE_DIR" not in env
    assert attempt["outcome"] == "succeeded" and attempt["exit_code"] == 0
    log = d.call("tasks.logs", {"task_id": tid})
    assert f"hello from {attempt['path']}" in log["data"] and log["eof"]
    assert log["size"] == len(log["data"].encode()) == log["offset"]
    # Success releases the slot without a salvage ref; the slot comes back clean.
    d.wait_slots("repo", "available", 2)
    assert d.call("salvage.list")["salvage"] == []
    assert not (Path(attempt["path"]) / "made-by-the-runner.txt").exists()


def test_failure_is_salvaged_and_retried_with_backoff_up_to_its_limit(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    d = necrod_factory(config(
        origin, runners=profile("fail", "echo partial work > work.txt; exit 7"),
        dispatcher="  retry_backoff_s: 0.5\n  retry_backoff_max_s: 2\n",
    ))  # fmt: skip
    tid = submit(d, pool="repo", runner="fail", max_retries=2)
    failed = wait_state(d, tid, "failed")
    attempts = failed["attempts"]
    assert [a["outcome"] for a in attempts] == ["failed", "failed", "failed"]
    assert all(a["exit_code"] == 7 for a in attempts) and failed["retries_used"] == 2
    gaps = [attempts[i + 1]["started_at"] - attempts[i]["ended_at"] for i in range(2)]
    assert all(g >= 0.2 for g in gaps), gaps  # backoff, not an immediate loop
    d.wait_slots("repo", "available", 2)
    salvaged = {s["lease_id"] for s in d.call("salvage.list")["salvage"]}
    assert {a["lease_id"] for a in attempts} <= salvaged
    shown = d.call("salvage.show", {"lease_id": attempts[0]["lease_id"]})
    assert [f["path"] for f in shown["files"]] == ["work.txt"]


def test_priority_order(necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path) -> None:
    order = workdir / "order.txt"
    runners = profile("rec", f"echo {{task_id}} >> {order}; sleep 0.2", max_concurrency=1)
    d = necrod_factory(config(origin, slots=1, runners=runners,
                              dispatcher="  policy: priority\n  label_priority: {urgent: 100, bug: 50}\n"))  # fmt: skip
    with d.client() as c:
        blocker = c.allocate("repo")  # no slot until the queue is built
        low = c.submit("repo", runner="rec")["task_id"]
        high = c.submit("repo", runner="rec", priority=10)["task_id"]
        bug = c.submit("repo", runner="rec", labels=["bug"])["task_id"]
        urgent = c.submit("repo", runner="rec", labels=["urgent"])["task_id"]
        low2 = c.submit("repo", runner="rec")["task_id"]
        assert c.task(low)["waiting_on"] == "slot" or wait_for(lambda: c.task(low)["waiting_on"] == "slot")
        c.release(blocker["lease_id"])
    for tid in (low, high, bug, urgent, low2):
        wait_state(d, tid, "succeeded")
    assert order.read_text().split() == [urgent, bug, high, low, low2]


def test_fair_share_order(necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path) -> None:
    order = workdir / "order.txt"
    runners = profile("rec", f"echo {{task_id}} >> {order}; sleep 0.2", max_concurrency=1) + profile(
        "busy", "sleep 2", max_concurrency=1
    )
    d = necrod_factory(config(origin, slots=1, runners=runners,
                              dispatcher="  policy: fair-share\n  fair_share: {half_life_s: 600}\n"))  # fmt: skip
    with d.client() as c:
        heavy = c.submit("repo", runner="busy", project="alpha")["task_id"]
        wait_state(d, heavy, "succeeded")  # alpha has used 2 runner-seconds, beta none
        blocker = c.allocate("repo", wait_s=20)
        a1 = c.submit("repo", runner="rec", project="alpha")["task_id"]
        a2 = c.submit("repo", runner="rec", project="alpha")["task_id"]
        b1 = c.submit("repo", runner="rec", project="beta")["task_id"]
        wait_for(lambda: c.task(b1)["waiting_on"] == "slot")
        usage = c.status()["dispatcher"]["fair_share_usage"]
        assert usage["alpha"] > 1.5 and usage.get("beta", 0) == 0
        c.release(blocker["lease_id"])
    for tid in (a1, a2, b1):
        wait_state(d, tid, "succeeded")
    assert order.read_text().split()[0] == b1  # the project that used less goes first


def test_dependencies_order_and_block(
    necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path
) -> None:
    order = workdir / "order.txt"
    runners = profile("rec", f"echo {{task_id}} >> {order}; sleep 0.3", max_concurrency=4)
    go = workdir / "fail-now"  # the failing task waits for its dependents to be submitted
    runners += profile("fail", f"while [ ! -e {go} ]; do sleep 0.05; done; exit 1", max_concurrency=4)
    d = necrod_factory(config(origin, slots=4, runners=runners))
    with d.client() as c:
        batch = c.submit("repo", runner="rec", tasks=[
            {"key": "base"},
            {"key": "left", "depends_on": ["base"]},
            {"key": "right", "body": "Some text.\nDepends on #7\n"},
            {"issue": 7, "depends_on": ["base"]},
            {"key": "top", "depends_on": ["left", "right"]},
        ])  # fmt: skip
        ids = {t["key"] or "#7": t["task_id"] for t in batch["tasks"]}
        graph = c.tasks(batch=batch["batch"], graph=True)["levels"]
        assert graph == [[ids["base"]], [ids["left"], ids["#7"]], [ids["right"]], [ids["top"]]]
        for tid in ids.values():
            wait_state(d, tid, "succeeded")
        ran = order.read_text().split()
        for before, after in (
            ("base", "left"),
            ("base", "#7"),
            ("#7", "right"),
            ("left", "top"),
            ("right", "top"),
        ):
            assert ran.index(ids[before]) < ran.index(ids[after]), (before, after, ran)
        # A failed dependency blocks its dependents (transitively); they never run.
        bad = c.submit("repo", runner="fail")["task_id"]
        child = c.submit("repo", runner="rec", depends_on=[bad])["task_id"]
        grandchild = c.submit("repo", runner="rec", depends_on=[child])["task_id"]
        go.touch()
        wait_state(d, bad, "failed")
        assert wait_state(d, grandchild, "blocked")["reason"] == f"dependency {bad} failed"
        assert c.task(child)["state"] == "blocked" and c.task(child)["attempts"] == []
        with pytest.raises(FailedPrecondition, match="blocked"):
            c.retry(child)
        # Retrying the failed task re-queues what it blocked.
        assert c.retry(bad)["state"] == "queued"
        assert c.task(child)["state"] == "queued" and c.task(grandchild)["state"] == "queued"


def test_a_dependency_cancelled_while_its_dependent_is_submitted_blocks_it(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    """The dependent was being committed, not yet in the index, when its dependency was cancelled
    and its dependents blocked: it used to stay queued for ever."""
    d = necrod_factory(config(origin, runners=profile("hold", "sleep 60") + profile("rec", "true")))
    blocker = submit(d, pool="repo", runner="hold")
    wait_state(d, blocker, "running")
    for _ in range(3):
        dep = submit(d, pool="repo", runner="rec", depends_on=[blocker])
        submitted, _ = same_turn(d, ("tasks.submit", {"pool": "repo", "runner": "rec", "depends_on": [dep]}),
                                 ("tasks.cancel", {"task_id": dep}))  # fmt: skip
        child = submitted["result"]["task_id"]
        assert wait_state(d, child, "blocked", timeout=10)["reason"] == f"dependency {dep} is cancelled"
    d.call("tasks.cancel", {"task_id": blocker})


def test_a_dependency_retried_while_its_dependent_is_submitted_unblocks_it(
    necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path
) -> None:
    """The dependent is blocked at submission (its dependency failed), and the dependency is
    retried before that is committed: it runs once the dependency succeeds."""
    flag = workdir / "failed-once"
    runners = profile("once", f"test -e {flag} || {{ touch {flag}; exit 1; }}") + profile("rec", "true")
    d = necrod_factory(config(origin, runners=runners, dispatcher="  max_retries: 0\n"))
    dep = submit(d, pool="repo", runner="once")
    wait_state(d, dep, "failed")
    submitted, _ = same_turn(d, ("tasks.submit", {"pool": "repo", "runner": "rec", "depends_on": [dep]}),
                             ("tasks.retry", {"task_id": dep}))  # fmt: skip
    child = submitted["result"]["task_id"]
    wait_state(d, dep, "succeeded")
    wait_state(d, child, "succeeded")


def test_cycles_and_unservable_tasks_are_refused(necrod_factory: Callable[..., Necrod], origin: Path) -> None:
    d = necrod_factory(config(origin, runners=profile("py", "true", skills=["python"])))
    with d.client() as c:
        with pytest.raises(InvalidParams, match="dependency cycle: a -> c -> b -> a") as info:
            c.submit("repo", runner="py", tasks=[
                {"key": "a", "depends_on": ["c"]}, {"key": "b", "depends_on": ["a"]}, {"key": "c", "depends_on": ["b"]},
            ])  # fmt: skip
        assert len(info.value.data["cycle"]) == 4
        with pytest.raises(FailedPrecondition, match="no runner profile"):
            c.submit("repo", skills=["rust"])
        with pytest.raises(NotFound, match="no runner profile 'nope'"):
            c.submit("repo", runner="nope")
        with pytest.raises(NotFound, match="no pool"):
            c.submit("elsewhere", runner="py")
        with pytest.raises(NotFound, match="t-999"):
            c.submit("repo", runner="py", depends_on=["t-999"])
        with pytest.raises(InvalidParams, match="placeholder"):
            c.submit("repo", command=["echo", "{nonsense}"])
        with pytest.raises(InvalidParams, match="payload has no 'x'"):
            c.submit("repo", runner="py", command=["echo", "{payload.x}"], payload={"y": 1})
        assert c.tasks()["tasks"] == []  # nothing half-submitted
        for method in ("tasks.cancel", "tasks.retry"):
            with pytest.raises(NotFound, match="no batch 'b-999'"):
                c.call(method, {"batch": "b-999"})


def test_a_runner_that_stops_heartbeating_is_stopped_salvaged_and_retried(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    runner = [PY, "-c", HEARTBEAT + "open('progress.txt', 'w').write('wip')\ntime.sleep(60)\n"]
    d = necrod_factory(config(
        origin, runners=profile("beat", runner, lease_ttl_s=1.5, grace_s=1, env={"BEATS": "2"}),
        dispatcher="  retry_backoff_s: 0.2\n",
    ))  # fmt: skip
    tid = submit(d, pool="repo", runner="beat", max_retries=1)
    failed = wait_state(d, tid, "failed", timeout=60)
    assert [a["outcome"] for a in failed["attempts"]] == ["lease_lost", "lease_lost"]
    lease = failed["attempts"][0]["lease_id"]
    assert [f["path"] for f in d.call("salvage.show", {"lease_id": lease})["files"]] == ["progress.txt"]


def test_heartbeats_keep_a_long_task_alive(necrod_factory: Callable[..., Necrod], origin: Path) -> None:
    d = necrod_factory(config(origin, runners=profile("beat", [PY, "-c", HEARTBEAT], lease_ttl_s=1.5)))
    tid = submit(d, pool="repo", runner="beat")  # 6 beats, 0.5 s apart: 3 s, twice the TTL
    assert wait_state(d, tid, "succeeded")["attempts"][0]["outcome"] == "succeeded"


def test_hung_and_slow_runners_are_stopped(necrod_factory: Callable[..., Necrod], origin: Path) -> None:
    runners = profile("quiet", "echo started; sleep 60", output_timeout_s=1, grace_s=1)
    runners += profile("slow", "while true; do echo tick; sleep 0.2; done", grace_s=1)
    d = necrod_factory(config(origin, runners=runners))
    hung = submit(d, pool="repo", runner="quiet")
    slow = submit(d, pool="repo", runner="slow", timeout_s=1.5)
    for tid, outcome in ((hung, "stalled"), (slow, "timeout")):
        attempt = wait_state(d, tid, "failed")["attempts"][0]
        assert attempt["outcome"] == outcome and attempt["ended_at"] - attempt["started_at"] < 10


def test_cancel_stops_a_running_task_within_the_grace(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    d = necrod_factory(config(origin, runners=profile("long", "echo x > unsaved.txt; trap '' TERM; sleep 60",
                                                      grace_s=1)))  # fmt: skip
    tid = submit(d, pool="repo", runner="long")
    queued = submit(d, pool="repo", runner="long", depends_on=[tid])
    running = wait_for(lambda: (t := task(d, tid))["attempts"] and t, what="an attempt")
    wait_for(
        lambda: (Path(running["attempts"][0]["path"]) / "unsaved.txt").exists(), what="the runner to write"
    )
    started = time.monotonic()
    assert d.call("tasks.cancel", {"task_id": tid})["state"] == "cancelled"
    assert time.monotonic() - started < 8
    assert task(d, queued)["state"] == "blocked"
    attempt = task(d, tid)["attempts"][0]
    assert attempt["outcome"] == "cancelled"
    d.wait_slots("repo", "available", 2)  # cleaned: the salvage is written before the reset
    shown = d.call("salvage.show", {"lease_id": attempt["lease_id"]})
    assert [f["path"] for f in shown["files"]] == ["unsaved.txt"]


def test_a_cancel_while_a_timed_out_runner_is_stopped_cancels_the_task(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    """The runner was being stopped for its timeout (within its grace) when the cancel came: the
    attempt ended as a timeout, the task was retried, and the cancel answered "queued"."""
    d = necrod_factory(config(origin, runners=profile("deaf", "trap '' TERM; sleep 60", grace_s=3)))
    tid = submit(d, pool="repo", runner="deaf", timeout_s=1, max_retries=2)
    wait_for(lambda: task(d, tid)["attempts"], what="an attempt")
    time.sleep(2)  # its timeout is past: it is being stopped, and ignores SIGTERM
    assert d.call("tasks.cancel", {"task_id": tid})["state"] == "cancelled"
    done = task(d, tid)
    assert done["state"] == "cancelled" and [a["outcome"] for a in done["attempts"]] == ["cancelled"]


def test_a_cancel_while_a_tasks_slot_is_being_leased_cancels_the_task(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    """The cancel came while the attempt was leasing a slot (fetching its ref), and the lease
    failed: the attempt ended start_failed, the task was retried, and the cancel answered "queued".
    A cancel that misses that window (the task waiting out its backoff) is tried again."""
    d = necrod_factory(config(origin, runners=profile("rec", "true"), dispatcher="  retry_backoff_s: 0.2\n"))
    d.wait_slots("repo", "available", 2)
    for _ in range(10):
        tid = submit(d, pool="repo", runner="rec", ref="no-such-branch", max_retries=3)
        wait_for(lambda t=tid: task(d, t)["state"] == "running", interval=0.002, what=f"{tid} to be leasing")
        assert d.call("tasks.cancel", {"task_id": tid})["state"] == "cancelled"
        done = task(d, tid)
        assert done["state"] == "cancelled"
        if done["attempts"][-1]["outcome"] == "cancelled":
            break  # it was caught leasing, and ended as the cancel said
        assert done["attempts"][-1]["outcome"] == "start_failed"  # caught in its backoff: again
    else:
        pytest.fail("no cancel came while a slot was being leased")
    time.sleep(0.5)  # past its backoff: it would have been started again
    assert task(d, tid)["state"] == "cancelled"


def test_capacity_limits_are_never_exceeded(
    necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path
) -> None:
    trace = workdir / "trace"
    script = f"echo start {{task_id}} $(date +%s.%N) >> {trace}; sleep 0.4; echo end {{task_id}} $(date +%s.%N) >> {trace}"
    runners = profile("a", script, max_concurrency=2) + profile("b", script, max_concurrency=2)
    d = necrod_factory(config(origin, slots=6, runners=runners, dispatcher="  max_running: 3\n"))
    ids = [submit(d, pool="repo", runner="a" if i % 2 else "b") for i in range(10)]
    for tid in ids:
        wait_state(d, tid, "succeeded")
    runner_of = {tid: "a" if i % 2 else "b" for i, tid in enumerate(ids)}
    events = sorted(
        (float(ts), kind, tid) for kind, tid, ts in (line.split() for line in trace.read_text().splitlines())
    )
    running: dict[str, int] = {"a": 0, "b": 0}
    peak_total = 0
    for _, kind, tid in events:
        running[runner_of[tid]] += 1 if kind == "start" else -1
        assert running[runner_of[tid]] <= 2
        peak_total = max(peak_total, sum(running.values()))
    assert peak_total <= 3


def test_a_pass_starts_no_more_tasks_on_a_pool_than_it_has_free_slots(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    """Six tasks ready at once on a pool of two slots: each placement takes a free slot, none
    is started only to find no slot and go back to the queue (which cost a lease attempt and a
    scheduling pass each)."""
    d = necrod_factory(config(origin, slots=2, runners=profile("r", "sleep 0.2", max_concurrency=6),
                              dispatcher="  max_running: 6\n"))  # fmt: skip
    d.wait_slots("repo", "available", 2)
    batch = d.call(
        "tasks.submit", {"pool": "repo", "runner": "r", "tasks": [{"key": f"k{i}"} for i in range(6)]}
    )
    for submitted in batch["tasks"]:
        wait_state(d, submitted["task_id"], "succeeded")
    placements = d.call("daemon.status")["dispatcher"]["placements"]
    assert placements == {"made": 6, "found_no_slot": 0}


def test_machine_thresholds_hold_tasks_back(necrod_factory: Callable[..., Necrod], origin: Path) -> None:
    d = necrod_factory(config(origin, runners=profile("ok", "true"), dispatcher="  max_memory_percent: 1\n"))
    tid = submit(d, pool="repo", runner="ok")
    waiting = wait_for(lambda: (t := task(d, tid))["waiting_on"] == "resources" and t, what="resources")
    assert "max_memory_percent" in waiting["reason"]
    assert d.config_path is not None
    d.config_path.write_text(config(origin, runners=profile("ok", "true")))
    wait_state(d, tid, "succeeded")


def test_the_memory_limit_is_enforced(necrod_factory: Callable[..., Necrod], origin: Path) -> None:
    hog = [PY, "-c", "x = bytearray(300 * 1024 * 1024); print(len(x))"]
    d = necrod_factory(config(origin, runners=profile("small", hog, memory_limit="64MiB")))
    status = d.call("daemon.status")["dispatcher"]
    if not status["memory_cgroups"]:  # not enforced here: refused, and said why (tests/test_systemd.py)
        with pytest.raises(Exception, match="cannot be enforced here"):
            submit(d, pool="repo", runner="small")
        return
    tid = submit(d, pool="repo", runner="small")
    attempt = wait_state(d, tid, "failed")["attempts"][0]
    assert attempt["exit_code"] != 0
    assert "memory limit" in attempt["detail"]


def test_a_stall_names_the_chain_that_holds_it(necrod_factory: Callable[..., Necrod], origin: Path) -> None:
    d = necrod_factory(config(origin, slots=1, runners=profile("ok", "true")))
    with d.client() as c:
        blocker = c.allocate("repo", ttl_s=120)
        first = c.submit("repo", runner="ok")["task_id"]
        second = c.submit("repo", runner="ok", depends_on=[first])["task_id"]
        status = wait_for(lambda: (s := c.status())["dispatcher"]["stalled"] and s, what="a stall report")
        chain = status["dispatcher"]["stalled"]
        assert any(f"{second} <- {first}: {first} waits on slot" in line for line in chain), chain
        assert any("dispatcher stalled" in r for r in status["degraded"])
        c.release(blocker["lease_id"])
        wait_state(d, second, "succeeded")
        assert c.status()["dispatcher"]["stalled"] == []


def test_submit_from_a_file_and_follow_logs(
    necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path
) -> None:
    d = necrod_factory(
        config(origin, runners=profile("say", "echo saying {payload.word}; sleep 0.5; echo bye"))
    )
    tasks_yaml = workdir / "tasks.yaml"
    tasks_yaml.write_text(
        "pool: repo\nrunner: say\nfailure_strategy: stop-all\ntasks:\n"
        "  - issue: 1\n    payload: {word: one}\n"
        "  - issue: 2\n    payload: {word: two}\n    body: |\n      Blocked by #1\n"
    )
    ctl = [sys.executable, "-m", "necrod.ctl.main", "--socket", str(d.socket)]
    out = subprocess.run(
        [*ctl, "submit", "--file", str(tasks_yaml), "--json"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    batch = json.loads(out.stdout)
    first, second = (t["task_id"] for t in batch["tasks"])
    assert task(d, second)["depends_on"] == [first]
    follow = subprocess.run([*ctl, "logs", second, "-f"], capture_output=True, text=True, timeout=60)
    assert follow.stdout.splitlines() == ["saying two", "bye"]
    listing = subprocess.run(
        [*ctl, "tasks", "--batch", batch["batch"]], capture_output=True, text=True
    ).stdout
    assert first in listing and "succeeded" in listing


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_a_restart_keeps_the_queue_and_the_tmux_runners(
    necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path
) -> None:
    marker = workdir / "tmux-done"
    runners = profile("tm", [PY, "-c", HEARTBEAT + f"open({str(marker)!r}, 'w').write('done')\n"],
                      launcher="tmux", lease_ttl_s=30, env={"BEATS": "10"}, max_concurrency=1)  # fmt: skip
    runners += profile("proc", "sleep 30", max_concurrency=1)
    d = necrod_factory(config(origin, slots=3, runners=runners, dispatcher="  max_retries: 0\n"))
    with d.client() as c:
        tm = c.submit("repo", runner="tm")["task_id"]
        proc = c.submit("repo", runner="proc")["task_id"]
        queued = c.submit("repo", runner="tm")["task_id"]  # waits for tm's only runner
        wait_state(d, tm, "running")
        wait_state(d, proc, "running")
    assert d.terminate() == 0
    d.start()
    with d.client() as c:
        # The tmux runner went on while the daemon was away, and is watched again.
        assert c.task(tm)["state"] == "running" and c.task(queued)["state"] == "queued"
        done = wait_state(d, tm, "succeeded", timeout=60)
        assert len(done["attempts"]) == 1 and marker.exists()
        # The process runner went on too, adopted by its pid: the same attempt, no retry used.
        adopted = c.task(proc)
        assert adopted["state"] == "running" and len(adopted["attempts"]) == 1
        assert alive(adopted["attempts"][0]["pid"]) and adopted["retries_used"] == 0
        c.cancel(proc)
        assert not alive(adopted["attempts"][0]["pid"])
        wait_state(d, queued, "succeeded", timeout=60)
    tmux = subprocess.run(
        ["tmux", "-S", str(d.state_dir / "tmux.sock"), "ls"], capture_output=True, text=True
    )
    assert "necro-" not in tmux.stdout


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_a_restart_finds_runners_whose_profile_was_removed_meanwhile(
    necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path
) -> None:
    """A profile removed from pools.yaml while the daemon was down must not keep it from
    starting: its running tasks' runners are found again, tmux and process alike."""
    log = workdir / "runs"
    runners = profile("tm", "sleep 60", launcher="tmux", lease_ttl_s=30)
    runners += profile("proc", f"echo $$ >> {log}; sleep 60", grace_s=1)
    d = necrod_factory(config(origin, slots=3, runners=runners, dispatcher="  max_retries: 0\n"))
    tm, proc = submit(d, pool="repo", runner="tm"), submit(d, pool="repo", runner="proc")
    wait_state(d, tm, "running")
    wait_for(lambda: log.exists() and log.read_text().strip(), what="the process runner to start")
    pid = int(log.read_text().split()[0])
    d.kill9()
    assert d.config_path is not None
    d.config_path.write_text(config(origin, slots=3, runners=profile("other", "true")))
    d.start()
    # Both are watched again and can be cancelled.
    assert task(d, tm)["state"] == "running" and task(d, proc)["state"] == "running" and alive(pid)
    d.call("tasks.cancel", {"task_id": proc})
    assert wait_state(d, proc, "cancelled")["attempts"][0]["outcome"] == "cancelled"
    wait_for(lambda: not alive(pid), 30, what="the cancelled process runner to be stopped")
    d.call("tasks.cancel", {"task_id": tm})
    assert wait_state(d, tm, "cancelled")["attempts"][0]["outcome"] == "cancelled"
    tmux = subprocess.run(
        ["tmux", "-S", str(d.state_dir / "tmux.sock"), "ls"], capture_output=True, text=True
    )
    assert "necro-" not in tmux.stdout


def test_a_runner_that_floods_its_output_cannot_fill_the_disk(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    """An agent's output is kept up to ``MAX_LOG_BYTES``, then a line says the rest was not; the
    task runs to its end regardless (the wrapper drops what is past the limit)."""
    over = MAX_LOG_BYTES + (16 << 20)
    flood = f"head -c {over} /dev/zero; echo after-the-flood > marker; test -s marker"
    d = necrod_factory(config(origin, runners=profile("flood", flood)))
    tid = submit(d, pool="repo", runner="flood")
    done = wait_state(d, tid, "succeeded", timeout=120)
    log = Path(done["attempts"][0]["log"])
    assert log.stat().st_size == MAX_LOG_BYTES + len(cut_line(MAX_LOG_BYTES))
    end = d.call("tasks.logs", {"task_id": tid, "offset": MAX_LOG_BYTES - 4})
    assert end["data"] == "\0" * 4 + cut_line(MAX_LOG_BYTES).decode() and end["eof"]


def test_a_tmux_runners_copy_of_its_pane_keeps_the_limit(tmp_path: Path) -> None:
    """``pipe-pane`` runs this shell command on the pane's output (tmux itself is too slow to
    push hundreds of megabytes through in a test)."""
    log = tmp_path / "it's a log"
    log.write_bytes(b"")
    subprocess.run(["sh", "-c", _capped_copy(log, 1000)], input=b"x" * 5000, check=True, timeout=30)
    assert log.read_bytes() == b"x" * 1000 + cut_line(1000)
    log.write_bytes(b"")
    subprocess.run(["sh", "-c", _capped_copy(log, 1000)], input=b"short\n", check=True, timeout=30)
    assert log.read_bytes() == b"short\n"


def test_a_task_call_as_soon_as_the_socket_answers_waits_for_the_runners_to_be_found(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    """The socket is served before the dispatcher has found the runners of the daemon before:
    a cancel of a running task in between failed with an internal error (KeyError)."""
    d = necrod_factory(config(origin, runners=profile("long", "sleep 60", grace_s=1)))
    tid = submit(d, pool="repo", runner="long")
    wait_state(d, tid, "running")
    d.terminate()
    d.start(wait=False)
    deadline = time.monotonic() + 30
    while True:
        conn = socket.socket(socket.AF_UNIX)
        try:
            conn.connect(str(d.socket))
            break
        except OSError:
            conn.close()
            assert time.monotonic() < deadline, "the restarted daemon never listened"
            time.sleep(0.001)
    with conn:
        conn.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tasks.cancel",
                                 "params": {"task_id": tid}}).encode() + b"\n")  # fmt: skip
        reply = json.loads(conn.makefile().readline())
    assert reply.get("result", {}).get("state") == "cancelled", reply
    assert wait_state(d, tid, "cancelled")["attempts"][-1]["outcome"] == "cancelled"


def test_a_crash_leaves_no_process_runner_running_twice(
    necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path
) -> None:
    log = workdir / "runs"
    d = necrod_factory(config(origin, runners=profile("p", f"echo $$ >> {log}; sleep 60", grace_s=1)))
    tid = submit(d, pool="repo", runner="p")
    wait_for(lambda: log.exists() and log.read_text().strip(), what="the runner to start")
    first_pid = int(log.read_text().split()[0])
    d.kill9()
    d.start()
    # Adopted, not started again: one runner, still the first attempt.
    time.sleep(1.5)
    assert len(log.read_text().split()) == 1 and alive(first_pid)
    attempts = task(d, tid)["attempts"]
    assert len(attempts) == 1 and attempts[0]["outcome"] is None
    d.call("tasks.cancel", {"task_id": tid})
    wait_for(lambda: not alive(first_pid), 30, what="the cancelled runner to be stopped")
    assert git(origin, "status", "--porcelain") == ""
