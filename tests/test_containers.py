"""The container launcher against a real engine (podman's Docker API) and a real daemon.

Runners here are busybox containers on a shared-clone pool, as uid 1000 in group ``users``
(the daemon's ``socket_group``, so they may call it). ``rpc`` in the image is a 20-line static
client: busybox cannot talk to a Unix socket.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.containers import IMAGE, Engine, EngineRelay, start_engine, why_no_engine
from tests.helpers import Necrod, cleanup_dir, git, short_tmpdir, wait_for

FINISHED = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    problem = why_no_engine()
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the container tests: {problem}")
        pytest.skip(problem)
    work = short_tmpdir()
    try:
        yield from start_engine(work)
    finally:
        cleanup_dir(work)


def config(origin: Path, engine: Engine, **runner: Any) -> str:
    profile = {"launcher": "container", "max_concurrency": 4, "grace_s": 2, "lease_ttl_s": 60,
               "container": {"image": IMAGE, "user": "1000:100", "docker_host": engine.docker_host,
                             "pids_limit": 64}, **runner}  # fmt: skip
    return (
        'daemon: {"socket_group": "users"}\n'
        "pools:\n"
        f'  repo: {{"repo_url": "{origin}", "slots": 2, "max_slots": 2, "min_idle": 0, "isolation": "shared-clone"}}\n'
        f"runners:\n  box: {json.dumps(profile)}\n"
        'dispatcher: {"max_running": 4, "retry_backoff_s": 0}\n'
    )


@pytest.fixture
def daemon(necrod_factory: Callable[..., Necrod], origin: Path, engine: Engine) -> Iterator[Necrod]:
    d = necrod_factory(config(origin, engine))
    yield d
    d.stop()
    assert engine.ours() == [], "a container outlived its daemon's tasks"


def submit(d: Necrod, command: str, **kw: Any) -> str:
    return str(
        d.call("tasks.submit", {"pool": "repo", "runner": "box", "command": ["sh", "-c", command], **kw})[
            "task_id"
        ]
    )


def finished(d: Necrod, task_id: str, timeout: float = 60) -> dict[str, Any]:
    return wait_for(lambda: (t := d.call("tasks.get", {"task_id": task_id}))["state"] in FINISHED and t,  # type: ignore[no-any-return]
                    timeout, what=f"task {task_id} to finish")  # fmt: skip


def log_of(task: dict[str, Any]) -> str:
    return Path(task["attempts"][-1]["log"]).read_text()


def test_a_task_writes_its_slot_and_nothing_else_as_a_non_root_user(daemon: Necrod, engine: Engine) -> None:
    mirror = Path(daemon.call("pools.list")["pools"][0]["mirror"])
    other = mirror.parent / "slots"
    script = (
        "id -u; echo mine > /workspace/mine.txt && echo SLOT-WRITTEN; "
        f"touch {mirror}/objects/evil 2>/dev/null && echo MIRROR-WRITTEN; "
        f"touch {mirror}/config 2>/dev/null && echo MIRROR-CONFIG-WRITTEN; "
        f"ls {other} 2>/dev/null | grep . && echo OTHER-SLOTS-SEEN; "
        "touch /etc/passwd 2>/dev/null && echo ROOTFS-WRITTEN; "
        "test -S $NECROD_SOCKET && echo SOCKET-THERE; exit 3"
    )
    task = finished(daemon, submit(daemon, script, max_retries=0))
    out = log_of(task)
    assert task["state"] == "failed" and task["attempts"][-1]["exit_code"] == 3, task
    assert out.splitlines()[0] == "1000" and "SLOT-WRITTEN" in out and "SOCKET-THERE" in out, out
    assert "MIRROR" not in out and "OTHER-SLOTS-SEEN" not in out and "ROOTFS-WRITTEN" not in out, out
    # The work was salvaged (a failure), the slot handed back to the daemon and cleaned.
    slot = next(
        s for s in daemon.call("slots.list")["slots"] if s["slot_id"] == task["attempts"][-1]["slot_id"]
    )
    wait_for(lambda: daemon.call("slots.list")["slots"][0]["state"] == "available"
             and daemon.call("slots.list")["slots"][1]["state"] == "available", 30, what="clean slots")  # fmt: skip
    path = Path(slot["path"])
    assert git(path, "status", "--porcelain", "--ignored") == "" and not (path / "mine.txt").exists()
    assert {p.stat().st_uid for p in [path, *path.rglob("*")]} == {os.getuid()}
    shown = daemon.call("salvage.show", {"lease_id": task["attempts"][-1]["lease_id"]})
    assert "mine.txt" in {f["path"] for f in shown["files"]}


def test_the_pids_and_memory_limits_are_in_force(daemon: Necrod) -> None:
    forks = finished(
        daemon,
        submit(daemon, "for i in $(seq 200); do sleep 5 & done 2>&1 | head -3; echo forked", max_retries=0),
    )
    assert "can't fork" in log_of(forks) or "Resource temporarily unavailable" in log_of(forks), log_of(forks)
    d_cfg = daemon.config_path
    assert d_cfg is not None
    d_cfg.write_text(
        d_cfg.read_text().replace('"max_concurrency": 4', '"max_concurrency": 4, "memory_limit": "32M"')
    )
    wait_for(lambda: daemon.call("daemon.status")["config"]["generation"] == 2, 20, what="the reload")
    hog = finished(
        daemon,
        submit(
            daemon, "head -c 200000000 /dev/zero | tr '\\000' a | (x=$(cat); echo survived)", max_retries=0
        ),
    )
    attempt = hog["attempts"][-1]
    assert hog["state"] == "failed" and "survived" not in log_of(hog), (attempt, log_of(hog))
    assert attempt["signal"] == 9 or "memory" in (attempt["detail"] or ""), attempt


def test_heartbeats_from_inside_keep_the_lease_and_silence_loses_it(
    necrod_factory: Callable[..., Necrod], origin: Path, engine: Engine
) -> None:
    # Beats every second against a 4 s TTL: a busy CI machine can stall a container for a second.
    d = necrod_factory(config(origin, engine, lease_ttl_s=4, grace_s=1), name="hb")
    # Commands are templates: {{ and }} are literal braces.
    beat = ('for i in 1 2 3 4 5 6; do rpc $NECROD_SOCKET "{{\\"jsonrpc\\":\\"2.0\\",\\"id\\":$i,'
            '\\"method\\":\\"slots.heartbeat\\",\\"params\\":{{\\"lease_id\\":\\"$NECROD_LEASE_ID\\"}}}}"; '
            "sleep 1; done")  # fmt: skip
    kept = finished(d, submit(d, beat, max_retries=0))
    assert kept["state"] == "succeeded", (kept, log_of(kept))
    assert log_of(kept).count('"result"') == 6
    # A runner that never beats: stopped when its lease ends, salvaged, retried; the retry beats.
    quiet = submit(
        d, f'echo left > work.txt; [ "$NECROD_ATTEMPT" = 1 ] && exec sleep 60; {beat}', max_retries=1
    )
    task = finished(d, quiet, timeout=90)
    first = task["attempts"][0]
    assert first["outcome"] == "lease_lost" and task["state"] == "succeeded", task
    assert "work.txt" in {f["path"] for f in d.call("salvage.show", {"lease_id": first["lease_id"]})["files"]}
    d.stop()
    assert engine.ours() == []


def test_cancel_stops_the_container_within_its_grace(daemon: Necrod, engine: Engine) -> None:
    task_id = submit(daemon, "echo up; sleep 300")
    wait_for(lambda: "up" in Path(daemon.call("tasks.get", {"task_id": task_id})["attempts"][-1]["log"] or "/nonexistent").read_text()
             if daemon.call("tasks.get", {"task_id": task_id})["attempts"] else False, 30, what="the container to run")  # fmt: skip
    started = time.monotonic()
    daemon.call("tasks.cancel", {"task_id": task_id})
    task = finished(daemon, task_id, timeout=30)
    assert task["state"] == "cancelled" and time.monotonic() - started < 2 + 8
    assert engine.ours() == []


def test_a_daemon_killed_and_restarted_adopts_its_running_container(
    daemon: Necrod, engine: Engine, origin: Path
) -> None:
    # It heartbeats only after the restart: through the new daemon's socket, which it reaches
    # because the socket's directory is mounted, not the old socket file.
    beat = ('sleep 5; for i in 1 2 3; do rpc $NECROD_SOCKET "{{\\"jsonrpc\\":\\"2.0\\",\\"id\\":$i,'
            '\\"method\\":\\"slots.heartbeat\\",\\"params\\":{{\\"lease_id\\":\\"$NECROD_LEASE_ID\\"}}}}"; '
            "sleep 1; done")  # fmt: skip
    task_id = submit(daemon, f"echo started; {beat}; echo finished")
    wait_for(lambda: engine.ours(), 30, what="the container")
    daemon.kill9()
    # A container of ours that no attempt claims (left by an older crash): removed at start.
    engine.podman(
        "create",
        "--name",
        "necro-orphan-1",
        "--label",
        f"necrod.daemon={_daemon_id(engine)}",
        IMAGE,
        "sleep",
        "60",
    )
    daemon.start()
    task = finished(daemon, task_id, timeout=60)
    assert task["state"] == "succeeded" and len(task["attempts"]) == 1, task
    assert "finished" in log_of(task) and log_of(task).count('"result"') == 3, log_of(task)
    assert "necro-orphan-1" not in engine.ours()


def test_an_engine_out_of_reach_during_a_stop_keeps_the_slot_out_of_rotation(
    necrod_factory: Callable[..., Necrod], origin: Path, engine: Engine, workdir: Path
) -> None:
    relay = EngineRelay(engine.docker_host, workdir / "relay.sock").up()
    d = necrod_factory(config(origin, engine, grace_s=1).replace(engine.docker_host, relay.url), name="relay")
    try:
        task_id = submit(d, "echo started; exec sleep 120", max_retries=0)

        def started() -> bool:
            task = d.call("tasks.get", {"task_id": task_id})
            return bool(task["attempts"]) and "started" in log_of(task)

        wait_for(started, 30, what="the container")
        name = f"necro-{task_id}-1"
        slot_id = d.call("tasks.get", {"task_id": task_id})["attempts"][-1]["slot_id"]
        relay.down()
        d.call("tasks.cancel", {"task_id": task_id})
        ended = finished(d, task_id, timeout=45)
        assert ended["state"] == "cancelled", ended["attempts"][-1]
        # The container may still write in the slot: kept out of rotation, untouched.
        slot = next(s for s in d.call("slots.list")["slots"] if s["slot_id"] == slot_id)
        assert slot["state"] == "error" and "could not be confirmed stopped" in slot["error"], slot
        assert name in engine.ours(), "the container runs on while the engine is out of reach"
    finally:
        relay.up()
    # The engine answers again: the stop goes through, the container is removed, the slot's
    # files come back to the daemon, and an operator's recover makes the slot available.
    wait_for(lambda: name not in engine.ours(), 60, what="the container stopped and removed")
    path = Path(slot["path"])
    wait_for(lambda: {p.stat().st_uid for p in [path, *path.rglob("*")]} == {os.getuid()}, 10,
             what="the slot handed back")  # fmt: skip
    d.call("slots.recover", {"slot_id": slot_id})
    d.wait_slots("repo", "available", 2)
    relay.down()


def _daemon_id(engine: Engine) -> str:
    labels = engine.podman(
        "ps", "-a", "--filter", "label=necrod.daemon", "--format", '{{index .Labels "necrod.daemon"}}'
    )
    return labels.split()[0]
