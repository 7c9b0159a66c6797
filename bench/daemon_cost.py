"""Item 6: the daemon itself with 1,000 slots (20 pools of 50, a small repository): startup,
idle CPU and resident memory, ``daemon.status`` and ``slots.list`` latency, and JSON-RPC
round trips per second (``hello``) on one connection and on 32."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from bench.daemon import Daemon, config_yaml
from bench.report import Row
from bench.rpc import Conn, close_all, open_many
from bench.scratch import Scratch
from bench.stats import median, percentile

POOLS, SLOTS = 20, 50
HELLO = {"protocol": 1, "client": "bench"}


def config(origin: Path) -> str:
    pools = {
        f"p{i:02d}": {"repo_url": str(origin), "base": "main", "slots": SLOTS, "max_slots": SLOTS}
        for i in range(POOLS)
    }
    return config_yaml(pools)


async def _latencies(conn: Conn, method: str, params: dict[str, object], count: int) -> list[float]:
    out = []
    for _ in range(count):
        started = time.perf_counter()
        await conn.call(method, params)
        out.append((time.perf_counter() - started) * 1000)
    return out


async def _hello_rate(path: str, clients: int, calls: int) -> float:
    conns = await open_many(path, clients)
    try:
        started = time.perf_counter()
        await asyncio.gather(*(_latencies(c, "hello", HELLO, calls) for c in conns))
        return clients * calls / (time.perf_counter() - started)
    finally:
        await close_all(conns)


async def _calls(path: str, quick: bool) -> tuple[list[float], list[float], float, float]:
    conn = await Conn.open(path)
    try:
        await _latencies(conn, "hello", HELLO, 50)
        status = await _latencies(conn, "daemon.status", {}, 100 if quick else 300)
        listing = await _latencies(conn, "slots.list", {}, 30 if quick else 100)
    finally:
        await conn.close()
    one = await _hello_rate(path, 1, 2000 if quick else 5000)
    many = await _hello_rate(path, 32, 100 if quick else 300)
    return status, listing, one, many


def measure(scratch: Scratch, origin: Path, idle_s: float, quick: bool) -> list[Row]:
    started = time.perf_counter()
    daemon = Daemon(scratch, "cost", config(origin)).start()
    try:
        ready_s = time.perf_counter() - started
        total = sum(p["slots"]["available"] for p in daemon.call("pools.list")["pools"])
        daemon.wait_quiet()  # the last creations' state writes and disk measurements
        git_before = daemon.call("daemon.status")["git"]["started"]
        cpu_before, at = daemon.cpu_seconds(), time.perf_counter()
        time.sleep(idle_s)
        cpu = (daemon.cpu_seconds() - cpu_before) / (time.perf_counter() - at) * 100
        rss = daemon.rss_bytes()
        git_idle = daemon.call("daemon.status")["git"]["started"] - git_before
        status, listing, one, many = asyncio.run(_calls(str(daemon.socket), quick))
        rss_after = daemon.rss_bytes()
    finally:
        daemon.stop()
    label = f"{total} slots in {POOLS} pools"
    return [
        Row("6", f"start until {label} are ready", "s", ready_s),
        Row(
            "6",
            f"idle CPU over {idle_s:g} s ({git_idle} git processes started)",
            "%",
            cpu,
            target="< 1 % of a core",
            met=cpu < 1,
        ),
        Row("6", f"resident memory, idle, {label}", "MB", rss, target="< 150 MB", met=rss < 150e6),
        Row("6", "resident memory after the calls below", "MB", rss_after),
        Row("6", "daemon.status latency", "ms", median(status), percentile(status, 99), len(status)),
        Row(
            "6",
            f"slots.list latency, all {total} slots",
            "ms",
            median(listing),
            percentile(listing, 99),
            len(listing),
            target="< 50 ms (p50)",
            met=median(listing) < 50,
        ),
        Row("6", "hello round trips per second, 1 connection", "/s", one),
        Row("6", "hello round trips per second, 32 connections", "/s", many),
    ]
