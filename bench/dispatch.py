"""Item 7: the dispatcher. Tasks scheduled per second with 10,000 queued tasks carrying
dependencies, against the same work with nothing queued behind it, measured in the same run.

One daemon, a pool of a small repository (so a slot's cleanup is short and the dispatcher, not
git, is what is measured), one ``process`` runner profile whose command is ``true``, and
``dispatcher.max_running`` 8. Work comes as chains: each task depends on the one before it.

- baseline: ``done`` tasks as chains of 10, nothing else queued; tasks per second from the
  first submit reply to the last ``task.succeeded`` event;
- loaded: 10,000 tasks as 100 chains of 100 (submitted as 100 batches, which is timed too),
  then the time until ``done`` of them have succeeded, with the rest still queued behind;
- with the 10,000 queued: ``daemon.status`` and ``tasks.list`` latency, and cancelling them all.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from bench.daemon import Daemon, config_yaml
from bench.report import Row
from bench.rpc import Conn, Watch
from bench.scratch import Scratch
from bench.stats import median, percentile

POOL, PROFILE = "work", "sh"
RUNNING = 8
QUEUED, CHAIN = 10_000, 100


def config(origin: Path) -> str:
    pool = {
        "repo_url": str(origin), "base": "main", "slots": 12, "max_slots": 12, "min_idle": 0,
        "salvage": False, "fetch_interval_s": 0,
    }  # fmt: skip
    return config_yaml(
        {POOL: pool},
        runners={PROFILE: {"command": ["true"], "max_concurrency": RUNNING, "pools": [POOL]}},
        dispatcher={"max_running": RUNNING},
    )


def _chain(name: str, length: int) -> list[dict[str, Any]]:
    return [
        {"key": f"{name}-{i}", **({"depends_on": [f"{name}-{i - 1}"]} if i else {})} for i in range(length)
    ]


async def _submit_chains(conn: Conn, chains: int, length: int) -> tuple[list[str], float]:
    """Batch ids, and the seconds the submits took."""
    batches = []
    started = time.perf_counter()
    for c in range(chains):
        reply = await conn.call(
            "tasks.submit", {"pool": POOL, "runner": PROFILE, "tasks": _chain(f"c{c}", length)}
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


async def _run_and_count(
    daemon: Daemon, chains: int, length: int, done: int
) -> tuple[float, float, float, list[str]]:
    """(tasks per second until ``done`` succeeded, daemon CPU ms per task, submit seconds, batches)."""
    conn = await Conn.open(str(daemon.socket))
    watch = await Watch.start(str(daemon.socket), ["tasks"])
    try:
        cpu = daemon.cpu_seconds()
        started = time.perf_counter()
        batches, submit_s = await _submit_chains(conn, chains, length)
        first = started + submit_s if chains * length > done else started
        last = await _succeeded(watch, done, timeout=600)
        cpu = daemon.cpu_seconds() - cpu
    finally:
        await watch.close()
        await conn.close()
    return done / (last - first), cpu * 1000 / done, submit_s, batches


async def _loaded_calls(
    daemon: Daemon, batches: list[str], quick: bool
) -> tuple[list[float], list[float], float]:
    conn = await Conn.open(str(daemon.socket))
    try:
        status, listing = [], []
        for _ in range(20 if quick else 50):
            t = time.perf_counter()
            await conn.call("daemon.status")
            status.append((time.perf_counter() - t) * 1000)
        for _ in range(3 if quick else 10):
            t = time.perf_counter()
            await conn.call("tasks.list", {"state": "queued"})
            listing.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        for batch in batches:
            await conn.call("tasks.cancel", {"batch": batch})
        cancel_s = time.perf_counter() - t
    finally:
        await conn.close()
    return status, listing, cancel_s


def measure(scratch: Scratch, origin: Path, done: int, quick: bool) -> list[Row]:
    daemon = Daemon(scratch, "dispatch", config(origin)).start()
    try:
        daemon.wait_available(POOL)
        base_rate, base_cpu, _, _ = asyncio.run(_run_and_count(daemon, done // 10, 10, done))
        daemon.wait_available(POOL)
        rate, cpu, submit_s, batches = asyncio.run(_run_and_count(daemon, QUEUED // CHAIN, CHAIN, done))
        status, listing, cancel_s = asyncio.run(_loaded_calls(daemon, batches, quick))
    finally:
        daemon.stop()
    alone, queued = "nothing else queued", f"{QUEUED:,} queued with dependencies"
    rate_row = f"tasks scheduled and run per second, {RUNNING} at once, command true"
    submit_row = f"submit {QUEUED:,} tasks as {QUEUED // CHAIN} chains of {CHAIN} (one batch per chain)"
    return [
        Row("7", f"{rate_row}, {alone}", "/s", base_rate, n=done),
        Row("7", f"  daemon CPU per task, {alone}", "ms", base_cpu, n=done),
        Row("7", submit_row, "/s", QUEUED / submit_s, n=QUEUED),
        Row("7", f"{rate_row}, {queued}", "/s", rate, n=done, ratio=rate / base_rate, ratio_to=alone),
        Row("7", f"  daemon CPU per task, {queued}", "ms", cpu, n=done, ratio=cpu / base_cpu, ratio_to=alone),
        Row(
            "7", f"daemon.status latency, {queued}", "ms", median(status), percentile(status, 99), len(status)
        ),
        Row(
            "7",
            f"tasks.list of the queued, {queued}",
            "ms",
            median(listing),
            percentile(listing, 99),
            len(listing),
        ),
        Row("7", f"cancel {QUEUED:,} queued tasks ({len(batches)} batches)", "ms", cancel_s * 1000),
    ]
