"""Item 3: release to available, after a task left typical debris, against the hand-run floor.

necrod: the time from sending ``slots.release`` until the ``slot.state`` event saying the slot
is ``available`` again (reason ``cleaned``) arrives, on a pool with ``salvage: true`` and on
one with ``salvage: false``. Floor: ``git reset --hard && git clean -ffdx`` run by hand in a
plain clone with the same debris. The target (<= 1.3x the floor) is judged on the
``salvage: false`` pool, which does the same job as the floor; salvage is extra work (it
commits what the task left) and is reported against the same floor.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from bench import debris
from bench.daemon import Daemon
from bench.report import Row
from bench.rpc import Conn, Watch
from bench.stats import median, percentile, timed_git

SALVAGE_POOL, PLAIN_POOL = "rel-salvage", "rel-plain"
TARGET = 1.3


async def _necrod(
    daemon: Daemon, pool: str, runs: int, dirt: debris.Debris
) -> tuple[list[float], dict[str, float]]:
    """Seconds from release to available, and the git processes started per release, by verb."""
    conn = await Conn.open(str(daemon.socket))
    watch = await Watch.start(str(daemon.socket), ["slots"])
    before = (await conn.call("daemon.status"))["git"]["started_by_verb"]
    times = []
    try:
        for _ in range(runs):
            lease = await conn.call("slots.allocate", {"pool": pool, "holder": "bench"})
            slot, path = lease["slot_id"], Path(lease["path"])
            files = debris.tracked_files(path, dirt.modified)
            build, _ = debris.ignored_dir(path)
            debris.make(path, dirt, files, build)
            started = time.perf_counter()
            await conn.call("slots.release", {"lease_id": lease["lease_id"]})
            done = await watch.wait(
                lambda e, slot=slot: (
                    e.get("type") == "slot.state"
                    and e.get("slot_id") == slot
                    and e.get("state") == "available"
                    and e.get("reason") == "cleaned"
                )
            )
            times.append(done - started)
        after = (await conn.call("daemon.status"))["git"]["started_by_verb"]
    finally:
        await watch.close()
        await conn.close()
    per_release = {
        verb: (n - before.get(verb, 0)) / runs for verb, n in after.items() if n > before.get(verb, 0)
    }
    return times, per_release


def floor(checkout: Path, runs: int, dirt: debris.Debris) -> list[float]:
    files = debris.tracked_files(checkout, dirt.modified)
    build, _ = debris.ignored_dir(checkout)
    times = []
    for _ in range(runs):
        debris.make(checkout, dirt, files, build)
        times.append(
            timed_git(["reset", "--quiet", "--hard"], ["clean", "--quiet", "-ffdx"], cwd=str(checkout))
        )
    return times


def measure(daemon: Daemon, hand: Path, runs: int, dirt: debris.Debris) -> list[Row]:
    hand_s = floor(hand, runs, dirt)
    base = median(hand_s)
    label = f"{dirt.modified} modified, {dirt.untracked} untracked, {dirt.ignored} ignored files"
    rows = [
        Row(
            "3",
            f"floor: reset --hard + clean -ffdx by hand ({label})",
            "ms",
            base * 1000,
            percentile(hand_s, 99) * 1000,
            len(hand_s),
        )
    ]
    for pool, name, judged in ((PLAIN_POOL, "salvage: false", True), (SALVAGE_POOL, "salvage: true", False)):
        took, verbs = asyncio.run(_necrod(daemon, pool, runs, dirt))
        row = Row(
            "3",
            f"release to available, {name}",
            "ms",
            median(took) * 1000,
            percentile(took, 99) * 1000,
            len(took),
        )
        row.ratio, row.ratio_to = median(took) / base, "hand floor"
        if judged:
            row.target, row.met = f"<= {TARGET}x floor", row.ratio <= TARGET
        rows.append(row)
        spawned = ", ".join(f"{verb} {n:g}" for verb, n in sorted(verbs.items()))
        rows.append(Row("3", f"git processes per release, {name}: {spawned}", "count", sum(verbs.values())))
    return rows
