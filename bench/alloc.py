"""Item 1: ``slots.allocate`` latency over the socket with clean slots, at 1..64 concurrent clients.

Each client has its own connection and allocates one slot after another; one round takes every
slot of the pool, then all are released (untimed). Before the next round every slot must be
``available`` again and the daemon quiet (its own CPU near zero: the background work that
follows a cleanup is done), so each timed allocation meets a clean slot and an idle daemon.
One more run at 32 clients starts as soon as the slots are available, without waiting for
quiet: what a burst of allocations meets right after a burst of releases.
"""

from __future__ import annotations

import asyncio
import time

from bench.daemon import Daemon
from bench.report import Row
from bench.rpc import Conn, close_all, open_many
from bench.stats import median, percentile

TARGET_CLIENTS = 32


async def _take(conn: Conn, pool: str, count: int, latencies: list[float]) -> list[str]:
    leases = []
    for _ in range(count):
        started = time.perf_counter()
        lease = await conn.call("slots.allocate", {"pool": pool, "holder": "bench"})
        latencies.append((time.perf_counter() - started) * 1000)
        leases.append(lease["lease_id"])
    return leases


async def _give_back(conn: Conn, leases: list[str]) -> None:
    for lease in leases:
        await conn.call("slots.release", {"lease_id": lease})


def _ready(daemon: Daemon, pool: str, quiet: bool) -> None:
    daemon.wait_available(pool)
    if quiet:
        daemon.wait_quiet()


async def level(
    daemon: Daemon, pool: str, clients: int, slots: int, rounds: int, quiet: bool
) -> tuple[list[float], float, float]:
    """Latencies (ms), allocations per second, and daemon CPU ms per allocation."""
    conns = await open_many(str(daemon.socket), clients)
    latencies: list[float] = []
    wall = cpu = 0.0
    try:
        for conn in conns:  # a connection's first call is not an allocation
            await conn.call("hello", {"protocol": 1, "client": "bench"})
        for _ in range(rounds):
            await asyncio.to_thread(_ready, daemon, pool, quiet)
            started, cpu_before = time.perf_counter(), daemon.cpu_seconds()
            held = await asyncio.gather(*(_take(c, pool, slots // clients, latencies) for c in conns))
            wall += time.perf_counter() - started
            cpu += daemon.cpu_seconds() - cpu_before
            await asyncio.gather(*(_give_back(c, leases) for c, leases in zip(conns, held, strict=True)))
    finally:
        await close_all(conns)
    return latencies, len(latencies) / wall, cpu * 1000 / len(latencies)


def _rows(label: str, latencies: list[float], rate: float, cpu_ms: float, judged: bool) -> list[Row]:
    p50, p99 = median(latencies), percentile(latencies, 99)
    row = Row("1", f"allocate, {label}", "ms", p50, p99, len(latencies))
    if judged:
        row.target, row.met = "p50 <= 2 ms, p99 <= 10 ms", p50 <= 2 and p99 <= 10
    return [
        row,
        Row("1", f"  allocations per second, {label}", "/s", rate, n=len(latencies)),
        Row("1", f"  daemon CPU per allocation, {label}", "ms", cpu_ms, n=len(latencies)),
    ]


def measure(
    daemon: Daemon, pool: str, slots: int, levels: list[int], rounds: int, burst: bool = True
) -> tuple[list[Row], float]:
    """Rows, and the median allocation at one client (the unit the baselines are compared with)."""
    rows = []
    single = float("nan")
    for clients in levels:
        latencies, rate, cpu_ms = asyncio.run(level(daemon, pool, clients, slots, rounds, quiet=True))
        if clients == 1:
            single = median(latencies)
        judged = clients == TARGET_CLIENTS
        rows += _rows(
            f"{clients} client{'s' if clients > 1 else ''}, quiet daemon", latencies, rate, cpu_ms, judged
        )
    if burst and TARGET_CLIENTS in levels:
        latencies, rate, cpu_ms = asyncio.run(level(daemon, pool, TARGET_CLIENTS, slots, rounds, quiet=False))
        label = f"{TARGET_CLIENTS} clients, just after {slots} releases were cleaned"
        rows += _rows(label, latencies, rate, cpu_ms, False)
    daemon.wait_available(pool)
    return rows, single
