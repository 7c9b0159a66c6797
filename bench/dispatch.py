"""Item 7: the dispatcher. Tasks scheduled per second with 10,000 queued tasks carrying
dependencies, against the same work with nothing queued behind it and against a plain Python
loop that spawns ``true`` 8 at a time (``bench/floors.py spawn``), all measured in the same run.

One daemon, pools of a small repository (so a slot's cleanup is short and the dispatcher, not
git, is what is measured): a worktree pool and, where overlay mounts work here, an overlay pool;
one ``process`` runner profile whose command is ``true``, and ``dispatcher.max_running`` 8.
The pools and the daemon have ``git_concurrency`` 8 too: the floor resets its 8 slots at once,
and at the default (2 per pool) a worktree pool's rate is that limit's (two cleanups at a time).
Work comes as chains: each task depends on the one before it.

- the floor: the same number of ``true`` processes, 8 at a time, from a plain asyncio loop in a
  process of its own: tasks per second and its own CPU per task; and the same loop with a slot
  of the pool's kind per worker, reset after each ``true`` the least way that kind allows
  (``bench/floors.py resets``): the rates are judged against that one;
- nothing else queued: ``done`` tasks as chains of 10, on the worktree pool, then on the overlay
  pool; tasks per second from the first submit reply to the last ``task.succeeded`` event;
- loaded: 10,000 tasks as 100 chains of 100 (submitted as 100 batches, which is timed too),
  then the time until ``done`` of them have succeeded, with the rest still queued behind;
- with the 10,000 queued: ``daemon.status`` and ``tasks.list`` latency (no filter: every task
  the daemon holds, the count is in the row), and cancelling them all;
- then the same loaded run on the overlay pool (the worktree run's tasks are cancelled by then,
  and still held; its own are left queued when the daemon stops).

Issue 22's targets: >= 400 tasks/s on the overlay pool, >= 100/s on the worktree pool, <= 1 ms
of daemon CPU per task, the same with 10,000 queued; ``tasks.list`` of 10,000 under 50 ms.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from bench.daemon import Daemon, config_yaml
from bench.floors import reset_floor, spawn_floor
from bench.report import Row
from bench.rpc import Conn, Watch
from bench.scratch import Scratch, unmount_under
from bench.stats import median, percentile
from necrod.io import overlay as overlayfs

POOL, OV_POOL, PROFILE = "work", "ov", "sh"
RUNNING = 8
QUEUED, CHAIN = 10_000, 100
#: Issue 22's targets: tasks per second by pool kind, daemon CPU ms per task, tasks.list ms.
RATE_TARGETS = {POOL: 100, OV_POOL: 400}
CPU_TARGET_MS = 1.0
LIST_TARGET_MS = 50
KIND = {POOL: "worktree pool", OV_POOL: "overlay pool"}

#: Wraps one measurement of the daemon (``bench.profile.Profiler.record``), given its pid and a label.
Recorder = Callable[[int, str], AbstractContextManager[None]]


def config(origin: Path, overlay: bool) -> str:
    pool = {
        "repo_url": str(origin), "base": "main", "slots": 12, "max_slots": 12, "min_idle": 0,
        "salvage": False, "fetch_interval_s": 0, "git_concurrency": RUNNING,
    }  # fmt: skip
    pools = {POOL: pool, **({OV_POOL: {**pool, "isolation": "overlay"}} if overlay else {})}
    return config_yaml(
        pools,
        daemon={"git_concurrency": RUNNING},
        runners={PROFILE: {"command": ["true"], "max_concurrency": RUNNING, "pools": list(pools)}},
        dispatcher={"max_running": RUNNING},
    )


def _chain(name: str, length: int) -> list[dict[str, Any]]:
    return [
        {"key": f"{name}-{i}", **({"depends_on": [f"{name}-{i - 1}"]} if i else {})} for i in range(length)
    ]


async def _submit_chains(conn: Conn, pool: str, chains: int, length: int) -> tuple[list[str], float]:
    """Batch ids, and the seconds the submits took."""
    batches = []
    started = time.perf_counter()
    for c in range(chains):
        reply = await conn.call(
            "tasks.submit", {"pool": pool, "runner": PROFILE, "tasks": _chain(f"c{c}", length)}
        )
        batches.append(reply["batch"])
    return batches, time.perf_counter() - started


async def _succeeded(watch: Watch, count: int, timeout: float) -> float:
    """The arrival time of the ``count``-th ``task.succeeded`` event; fails on any failure."""
    seen = 0
    deadline = time.monotonic() + timeout
    while seen < count:
        at = await watch.wait(
            lambda e: e.get("type") in ("task.succeeded", "task.failed", "task.blocked"),
            timeout=max(1.0, deadline - time.monotonic()),
        )
        event = watch.last
        if event.get("type") != "task.succeeded":
            raise RuntimeError(f"bench task did not succeed: {event}")
        seen += 1
    return at


class Run:
    """One dispatcher measurement: tasks per second, daemon CPU ms per task, submits, batches."""

    def __init__(
        self, rate: float, cpu_ms: float, all_cpu_ms: float, submit_s: float, batches: list[str]
    ) -> None:
        self.rate, self.cpu_ms, self.all_cpu_ms = rate, cpu_ms, all_cpu_ms
        self.submit_s, self.batches = submit_s, batches


async def _run_and_count(daemon: Daemon, pool: str, chains: int, length: int, done: int) -> Run:
    """Until ``done`` tasks of ``chains`` chains of ``length`` on ``pool`` succeeded."""
    conn = await Conn.open(str(daemon.socket))
    watch = await Watch.start(str(daemon.socket), ["tasks"])
    try:
        cpu, all_cpu = daemon.cpu_seconds(), daemon.all_cpu_seconds()
        started = time.perf_counter()
        batches, submit_s = await _submit_chains(conn, pool, chains, length)
        first = started + submit_s if chains * length > done else started
        last = await _succeeded(watch, done, timeout=600)
        cpu, all_cpu = daemon.cpu_seconds() - cpu, daemon.all_cpu_seconds() - all_cpu
    finally:
        await watch.close()
        await conn.close()
    return Run(done / (last - first), cpu * 1000 / done, all_cpu * 1000 / done, submit_s, batches)


async def _cancel(conn: Conn, batches: list[str]) -> float:
    t = time.perf_counter()
    for batch in batches:
        await conn.call("tasks.cancel", {"batch": batch})
    return time.perf_counter() - t


async def _loaded_calls(
    daemon: Daemon, batches: list[str], quick: bool
) -> tuple[list[float], list[float], int, int, float]:
    """daemon.status and tasks.list latencies, tasks listed (of them queued), cancel seconds."""
    conn = await Conn.open(str(daemon.socket))
    try:
        status, listing = [], []
        for _ in range(20 if quick else 50):
            t = time.perf_counter()
            await conn.call("daemon.status")
            status.append((time.perf_counter() - t) * 1000)
        listed = queued = 0
        for _ in range(3 if quick else 10):
            t = time.perf_counter()
            # No filter (docs/protocol.md: tasks.list has no limit): every task the daemon holds.
            tasks = (await conn.call("tasks.list", {}))["tasks"]
            listing.append((time.perf_counter() - t) * 1000)
            listed, queued = len(tasks), sum(1 for task in tasks if task["state"] == "queued")
        cancel_s = await _cancel(conn, batches)
    finally:
        await conn.close()
    return status, listing, listed, queued, cancel_s


def _rate_rows(
    pool: str, label: str, run: Run, floor: dict[str, Any], done: int, alone: Run | None
) -> list[Row]:
    """``floor``: the pool kind's reset floor (the spawn floor when it could not be measured)."""
    what = f"tasks scheduled and run per second, {RUNNING} at once, command true, {label}, {KIND[pool]}"
    also = f", {run.rate / alone.rate:.3g}x alone" if alone is not None else ""
    target = RATE_TARGETS[pool]
    return [
        Row("7", what, "/s", run.rate, n=done, ratio=run.rate / floor["per_second"],
            ratio_to=f"{floor['name']}{also}", target=f">= {target} /s", met=run.rate >= target),
        Row("7", f"  daemon CPU per task, {label}, {KIND[pool]}", "ms", run.cpu_ms, n=done,
            ratio=run.cpu_ms / floor["cpu_ms_per_task"], ratio_to=str(floor["name"]),
            target=f"<= {CPU_TARGET_MS:g} ms", met=run.cpu_ms <= CPU_TARGET_MS),
        Row("7", f"  daemon CPU per task with the processes it started (git, runners), {label}, {KIND[pool]}",
            "ms", run.all_cpu_ms, n=done, ratio=run.all_cpu_ms / floor["all_cpu_ms_per_task"],
            ratio_to=str(floor["name"])),
    ]  # fmt: skip


def _reset_floors(scratch: Scratch, origin: Path, pools: list[str], done: int) -> dict[str, dict[str, Any]]:
    """Each pool kind's reset floor (``bench/floors.py resets``), by pool."""
    commit = subprocess.run(["git", "rev-parse", "main"], cwd=origin, capture_output=True, text=True,
                            check=True).stdout.strip()  # fmt: skip
    floors: dict[str, dict[str, Any]] = {}
    for pool in pools:
        if pool == OV_POOL:
            source = scratch.path("floor-lower")
            subprocess.run(["git", "clone", "--quiet", str(origin), str(source)], check=True)
            floor: dict[str, Any] = dict(reset_floor(scratch, "overlay", source, commit, done, RUNNING))
            floor["what"] = "unmount, new upper, mount, old upper deleted"
        else:
            source = scratch.path("floor-mirror")
            subprocess.run(["git", "clone", "--quiet", "--bare", str(origin), str(source)], check=True)
            floor = dict(reset_floor(scratch, "worktree", source, commit, done, RUNNING))
            floor["what"] = "checkout --force, clean -ffdx, status"
        floor["name"] = f"{KIND[pool]} reset floor"
        floors[pool] = floor
    return floors


def measure(
    scratch: Scratch, origin: Path, done: int, quick: bool, record: Recorder | None = None
) -> list[Row]:
    """``record`` (the profiler) wraps the worktree pool's "nothing else queued" run."""
    problem = overlayfs.probe(scratch.path("overlay-probe"))
    pools = [POOL] if problem else [POOL, OV_POOL]
    daemon = Daemon(scratch, "dispatch", config(origin, overlay=not problem)).start()
    alone: dict[str, Run] = {}
    loaded: dict[str, Run] = {}
    try:
        for pool in pools:
            daemon.wait_available(pool)
        daemon.wait_quiet()
        floor = spawn_floor(scratch, done, RUNNING)
        resets = _reset_floors(scratch, origin, pools, done)
        for pool in pools:
            daemon.wait_available(pool)
            profiled = (
                record(daemon.pid, f"item 7, nothing else queued, {KIND[pool]}") if record else nullcontext()
            )
            with profiled:
                alone[pool] = asyncio.run(_run_and_count(daemon, pool, done // 10, 10, done))
        daemon.wait_available(POOL)
        loaded[POOL] = asyncio.run(_run_and_count(daemon, POOL, QUEUED // CHAIN, CHAIN, done))
        status, listing, listed, queued, cancel_s = asyncio.run(
            _loaded_calls(daemon, loaded[POOL].batches, quick)
        )
        if OV_POOL in pools:
            daemon.wait_available(OV_POOL)
            # Its queued tasks are left to the daemon's stop: cancelling them again adds nothing.
            loaded[OV_POOL] = asyncio.run(_run_and_count(daemon, OV_POOL, QUEUED // CHAIN, CHAIN, done))
    finally:
        daemon.stop()
        unmount_under(daemon.root)
    queued_label = f"{QUEUED:,} queued with dependencies"
    rows = [
        Row("7", f"floor: plain Python, asyncio.create_subprocess_exec('true'), {RUNNING} at a time", "/s",
            floor["per_second"], n=done),
        Row("7", "  floor CPU per task (its own process)", "ms", floor["cpu_ms_per_task"], n=done),
    ]  # fmt: skip
    for pool in pools:
        r = resets[pool]
        rows += [
            Row("7", f"floor: the same, each of the {RUNNING} {KIND[pool]} slots reset after its true ({r['what']})",
                "/s", r["per_second"], n=done, ratio=r["per_second"] / floor["per_second"],
                ratio_to="Python spawn floor"),
            Row("7", "  floor CPU per task (its own process)", "ms", r["cpu_ms_per_task"], n=done),
            Row("7", "  floor CPU per task with the processes it started (git, true)", "ms",
                r["all_cpu_ms_per_task"], n=done),
        ]  # fmt: skip
    for pool in pools:
        rows += _rate_rows(pool, "nothing else queued", alone[pool], resets[pool], done, None)
    if problem:
        rows.append(Row("7", f"overlay pool not measured: {problem}", "count"))
    submit_row = f"submit {QUEUED:,} tasks as {QUEUED // CHAIN} chains of {CHAIN} (one batch per chain)"
    rows.append(Row("7", submit_row, "/s", QUEUED / loaded[POOL].submit_s, n=QUEUED))
    for pool in pools:
        rows += _rate_rows(pool, queued_label, loaded[pool], resets[pool], done, alone[pool])
    lp50 = median(listing)
    return [
        *rows,
        Row(
            "7", f"daemon.status latency, {queued_label}", "ms", median(status), percentile(status, 99), len(status)
        ),
        Row("7", f"tasks.list, no filter: {listed:,} tasks ({queued:,} queued), {queued_label}", "ms",
            lp50, percentile(listing, 99), len(listing), target=f"< {LIST_TARGET_MS} ms (p50)",
            met=lp50 < LIST_TARGET_MS),
        Row("7", f"cancel {QUEUED:,} queued tasks ({len(loaded[POOL].batches)} batches)", "ms", cancel_s * 1000),
    ]  # fmt: skip
