"""Item 8: isolation and launchers (issue 10), each against its default measured in the same run.

(a) ``slots.allocate`` latency on an ``isolation: shared-clone`` pool against a ``worktree`` pool
of the same repository and size, in one daemon, at the given client counts, taken as item 1
takes it (clean slots, quiet daemon): one round on each pool in turn, which pool goes first
alternating, each round after the other pool's cleanups are done. Then, at one client,
allocations with ``ref`` at a commit 5 behind the base, which costs one git checkout in the slot.

(b) Task start through the dispatcher, one task at a time on an idle shared-clone pool, the two
launchers alternating: from sending ``tasks.submit`` to the first instruction of the task's
command running, and to the arrival of the ``task.succeeded`` event. The command is ``busybox
adjtimex``, whose first act is to read the wall clock (µs, the same clock as the host's, also in
a container), printed to the attempt's log. ``launcher: process`` against ``launcher:
container``: podman's Docker API with runc, a busybox-static image, the container as uid 1000
(when the bench runs as root), so each start also hands the slot over (an ``lchown`` walk, taken
from the ``container_started`` lines of that daemon's log, kept at level info). One untimed task
per launcher first; if the container one cannot run, its row says why instead of a figure.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from bench import alloc, containers
from bench.daemon import Daemon, config_yaml
from bench.gitrepo import git
from bench.report import Row
from bench.rpc import Conn, Watch, close_all
from bench.scratch import Scratch
from bench.stats import median, percentile

WORKTREE, SHARED = "iso-worktree", "iso-shared"
PROCESS, CONTAINER = "proc", "box"
COMMAND = ["busybox", "adjtimex"]
#: Task states that end it (the event's type names the attempt's outcome: ``task.start_failed``...).
FINISHED = ("succeeded", "failed", "cancelled", "blocked")
USER = "1000:100" if os.getuid() == 0 else f"{os.getuid()}:{os.getgid()}"
BEHIND = 5
#: For the first task of a launcher (a container engine that cannot run may hang, not fail).
WARM_UP_S = 60


def _pool(origin: str, base: str, slots: int, isolation: str) -> dict[str, Any]:
    return {
        "repo_url": origin, "base": base, "slots": slots, "max_slots": slots, "min_idle": 0,
        "salvage": False, "fetch_interval_s": 0, "git_concurrency": 4, "isolation": isolation,
    }  # fmt: skip


def _ratio_rows(what: str, found: dict[str, list[float]]) -> list[Row]:
    wt, sc = found[WORKTREE], found[SHARED]
    p50, p99 = median(wt), percentile(wt, 99)
    ratio_to = f"worktree pool (p99: {percentile(sc, 99) / p99:.3g}x)"
    return [
        Row("8", f"{what}, worktree pool", "ms", p50, p99, len(wt)),
        Row("8", f"{what}, shared-clone pool", "ms", median(sc), percentile(sc, 99), len(sc),
            ratio=median(sc) / p50, ratio_to=ratio_to),
    ]  # fmt: skip


async def _with_ref(daemon: Daemon, pool: str, ref: str, count: int) -> list[float]:
    conn = await Conn.open(str(daemon.socket))
    latencies: list[float] = []
    try:
        await conn.call("hello", {"protocol": 1, "client": "bench"})
        await asyncio.to_thread(daemon.wait_quiet)
        leases = []
        for _ in range(count):
            started = time.perf_counter()
            lease = await conn.call("slots.allocate", {"pool": pool, "holder": "bench", "ref": ref})
            latencies.append((time.perf_counter() - started) * 1000)
            leases.append(lease["lease_id"])
        for lease in leases:
            await conn.call("slots.release", {"lease_id": lease})
    finally:
        await close_all([conn])
    return latencies


def allocation(
    scratch: Scratch, origin: str, base: str, levels: list[int], rounds: int, ref_allocs: int
) -> list[Row]:
    slots = max(levels)
    pools = {
        WORKTREE: _pool(origin, base, slots, "worktree"),
        SHARED: _pool(origin, base, slots, "shared-clone"),
    }
    daemon = Daemon(scratch, "iso", config_yaml(pools, {"git_concurrency": 4})).start()
    rows: list[Row] = []
    try:
        turn = 0
        for clients in levels:
            found: dict[str, list[float]] = {WORKTREE: [], SHARED: []}
            for _ in range(rounds):  # one round on each pool, which goes first alternating
                for pool in list(pools)[:: 1 if turn % 2 == 0 else -1]:
                    for other in pools:
                        daemon.wait_available(other)
                    found[pool] += asyncio.run(alloc.level(daemon, pool, clients, slots, 1, quiet=True))[0]
                turn += 1
            rows += _ratio_rows(f"allocate, {clients} client{'s' if clients > 1 else ''}", found)
        if ref_allocs:
            shared = daemon.call("pools.get", {"pool": SHARED})
            ref = git(
                "rev-list", "--max-count=1", f"--skip={BEHIND}", shared["base_commit"], cwd=shared["mirror"]
            )
            if ref:
                found = {}
                for pool in pools:
                    for other in pools:
                        daemon.wait_available(other)
                    found[pool] = asyncio.run(_with_ref(daemon, pool, ref, min(ref_allocs, slots)))
                what = f"allocate with ref {BEHIND} commits behind the base (one git checkout), 1 client"
                rows += _ratio_rows(what, found)
    finally:
        daemon.stop()
    return rows


def _launch_config(origin: str, base: str, engine: containers.Engine | None) -> str:
    runners: dict[str, Any] = {
        PROCESS: {"launcher": "process", "pools": [SHARED], "max_concurrency": 1, "grace_s": 2}
    }
    if engine is not None:
        box = {"image": engine.image, "user": USER, "docker_host": engine.docker_host}
        runners[CONTAINER] = {**runners[PROCESS], "launcher": "container", "container": box}
    return config_yaml(
        {SHARED: _pool(origin, base, 2, "shared-clone")}, runners=runners, dispatcher={"max_running": 2}
    )


class TaskFailed(Exception):
    pass


#: adjtimex's ``status`` bit saying its ``time.tv_usec`` holds nanoseconds (NTP's nano mode).
_STA_NANO = 0x2000


def _clock(log: str) -> float:
    sec, usec = (re.search(rf"time\.tv_{u}:\s*(\d+)", log) for u in ("sec", "usec"))
    if sec is None or usec is None:
        raise TaskFailed(f"no clock in the task's output: {log.strip()[-200:]!r}")
    status = re.search(r"status:\s*(\d+)", log)
    nano = status is not None and int(status[1]) & _STA_NANO
    return int(sec[1]) + int(usec[1]) / (1e9 if nano else 1e6)


def _why(task: dict[str, Any]) -> str:
    attempt = task["attempts"][-1] if task["attempts"] else {}
    out = Path(attempt["log"]).read_text(errors="replace").strip() if attempt.get("log") else ""
    return f"task {task['state']}: {attempt.get('detail') or out[-200:] or task.get('reason') or '?'}"


async def _one(
    daemon: Daemon, conn: Conn, watch: Watch, runner: str, timeout: float = 120
) -> tuple[float, float, str]:
    """ms from submit to the command's first instruction, ms to ``task.succeeded``, and its slot."""
    await asyncio.to_thread(daemon.wait_available, SHARED)
    wall, started = time.time(), time.perf_counter()
    reply = await conn.call(
        "tasks.submit", {"pool": SHARED, "runner": runner, "command": COMMAND, "max_retries": 0}
    )
    task_id = reply["task_id"]
    try:
        done = await watch.wait(lambda e: e.get("task_id") == task_id and e.get("state") in FINISHED, timeout)
    except TimeoutError:
        task = await conn.call("tasks.get", {"task_id": task_id})
        await conn.call("tasks.cancel", {"task_id": task_id})
        raise TaskFailed(f"not finished within {timeout:g} s ({_why(task)})") from None
    task = await conn.call("tasks.get", {"task_id": task_id})
    if watch.last.get("state") != "succeeded":
        raise TaskFailed(_why(task))
    attempt = task["attempts"][-1]
    return (_clock(Path(attempt["log"]).read_text()) - wall) * 1000, (done - started) * 1000, attempt["path"]


async def _series(
    daemon: Daemon, runners: list[str], tasks: int, problems: dict[str, str]
) -> tuple[dict[str, tuple[list[float], list[float]]], str]:
    """Per runner the two latencies of ``tasks`` tasks, and a slot they ran in."""
    conn = await Conn.open(str(daemon.socket))
    watch = await Watch.start(str(daemon.socket), ["tasks"])
    times: dict[str, tuple[list[float], list[float]]] = {r: ([], []) for r in runners}
    slot = ""
    try:
        for runner in list(runners):  # one untimed task each; a container that cannot run says why
            try:
                await _one(daemon, conn, watch, runner, timeout=WARM_UP_S)
            except TaskFailed as exc:
                if runner == PROCESS:
                    raise
                problems[runner] = str(exc)
                runners.remove(runner)
        for i in range(tasks):
            for runner in runners if i % 2 == 0 else runners[::-1]:
                first, done, slot = await _one(daemon, conn, watch, runner)
                times[runner][0].append(first)
                times[runner][1].append(done)
    finally:
        await watch.close()
        await conn.close()
    return times, slot


def _hand_overs(log: Path) -> list[float]:
    found = []
    for line in log.read_text(errors="replace").splitlines():
        if '"container_started"' in line:
            found.append(float(json.loads(line).get("hand_over_ms", "nan")))
    return found


def _entries(slot: str) -> int:
    return sum(1 + len(dirs) + len(files) for _, dirs, files in os.walk(slot)) if slot else 0


def _start_rows(
    times: dict[str, tuple[list[float], list[float]]], problem: str | None, handed: list[float], entries: int
) -> list[Row]:
    uid = USER.split(":")[0]
    kinds = {PROCESS: "launcher: process", CONTAINER: f"launcher: container (podman, runc, uid {uid})"}
    rows = []
    for k, what in enumerate(
        (
            "task start: tasks.submit to the command's first instruction",
            "  tasks.submit to task.succeeded (the command exits at once)",
        )
    ):
        proc = times[PROCESS][k]
        rows.append(
            Row("8", f"{what}, {kinds[PROCESS]}", "ms", median(proc), percentile(proc, 99), len(proc))
        )
        if problem is not None:
            if not k:
                rows.append(Row("8", f"  launcher: container: not measured: {problem[:100]}", "ms"))
            continue
        box = times[CONTAINER][k]
        ratio_to = f"process launcher (p99: {percentile(box, 99) / percentile(proc, 99):.3g}x)"
        rows.append(Row("8", f"{what}, {kinds[CONTAINER]}", "ms", median(box), percentile(box, 99), len(box),
                        ratio=median(box) / median(proc), ratio_to=ratio_to))  # fmt: skip
    if handed:
        what = f"  of which: the slot ({entries:,} files and directories) handed to uid {uid} (lchown walk)"
        rows.append(Row("8", what, "ms", median(handed), percentile(handed, 99), len(handed)))
    return rows


def starts(scratch: Scratch, origin: str, base: str, tasks: int) -> list[Row]:
    problem = containers.why_not()
    engine = None
    if problem is None:
        engine = containers.Engine(scratch)
        try:
            engine.start()
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            problem = str(exc)
            engine.close()
            engine = None
    daemon = Daemon(scratch, "launch", _launch_config(origin, base, engine), log_level="info")
    runners = [PROCESS] if engine is None else [PROCESS, CONTAINER]
    problems = {CONTAINER: problem} if problem else {}
    try:
        daemon.start()
        times, slot = asyncio.run(_series(daemon, runners, tasks, problems))
        handed = _hand_overs(daemon.log)[1:]  # not the untimed first task's
    finally:
        daemon.stop()
        if engine is not None:
            engine.close()
    return _start_rows(times, problems.get(CONTAINER), handed, _entries(slot))
