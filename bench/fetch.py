"""Item 4: fetching. One daemon with pools of 1, 10 and 50 slots, ``fetch_interval_s: 5``, while
the origin gains a commit every interval; against 10 and 50 independent clones each fetching.

necrod: over a window of whole intervals (started after every pool's first fetch), the pools'
own fetch counters, the ``git fetch`` processes the daemon started (``daemon.status``), and the
wall time of each fetch (``fetch.last_duration_s``). Clones: bare ``--no-local`` clones (the
work tree plays no part in a fetch), all fetching at once each interval, timed together.
"""

from __future__ import annotations

import itertools
import subprocess
import time
from pathlib import Path

from bench.daemon import Daemon, config_yaml
from bench.gitrepo import GIT_ENV, add_commit, git
from bench.report import Row
from bench.scratch import Scratch, rmtree
from bench.stats import median, percentile

INTERVAL_S = 5.0


def _pool(n: int) -> str:
    return f"f{n}"


def _fetch_state(daemon: Daemon) -> dict[str, dict[str, float]]:
    return {p["name"]: p["fetch"] for p in daemon.call("pools.list")["pools"]}


def _verbs(daemon: Daemon) -> dict[str, int]:
    return dict(daemon.call("daemon.status")["git"]["started_by_verb"])


def _settled(daemon: Daemon) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """Fetch counts and git processes started, read when no git runs: a fetch in flight at an
    edge of the window would count as a process on one side and as a pool fetch on the other."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if daemon.call("daemon.status")["git"]["running"] == 0:
            state, verbs = _fetch_state(daemon), _verbs(daemon)
            if daemon.call("daemon.status")["git"]["running"] == 0 and _verbs(daemon) == verbs:
                return state, verbs
        time.sleep(0.02)
    return _fetch_state(daemon), _verbs(daemon)


def _necrod(
    scratch: Scratch,
    origin: str,
    base: str,
    sizes: tuple[int, ...],
    intervals: int,
    moving: bool,
    interval_s: float,
) -> tuple[list[Row], dict[int, float]]:
    """Rows, and the median wall time of one fetch per pool size."""
    common = {"repo_url": origin, "base": base, "fetch_interval_s": interval_s, "min_idle": 0}
    pools = {_pool(n): {**common, "slots": n, "max_slots": n} for n in sizes}
    daemon = Daemon(scratch, "fetch", config_yaml(pools)).start()
    try:
        deadline = time.monotonic() + 3 * interval_s + 30
        while not all(f["fetches"] for f in _fetch_state(daemon).values()):
            if time.monotonic() > deadline:
                return [
                    Row("4", "no periodic fetch seen (fetch_interval_s not implemented?)", "count", 0)
                ], {}
            time.sleep(0.25)
        first, verbs_before = _settled(daemon)
        durations: dict[str, list[float]] = {name: [] for name in pools}
        #: When each fetch finished (``last_ok_at``, wall clock): gaps give fetches per interval.
        finished = {name: [f["last_ok_at"]] for name, f in first.items()}
        seen = {name: f["fetches"] for name, f in first.items()}
        started = time.monotonic()
        next_commit = started
        n = 0
        while time.monotonic() - started < intervals * interval_s:
            if moving and time.monotonic() >= next_commit:
                n += 1
                add_commit(Path(origin), n)
                next_commit += interval_s
            for name, f in _fetch_state(daemon).items():
                if f["fetches"] > seen[name]:
                    seen[name] = f["fetches"]
                    durations[name].append(f["last_duration_s"] * 1000)
                    finished[name].append(f["last_ok_at"])
            time.sleep(0.25)
        window = (time.monotonic() - started) / interval_s
        last, verbs_after = _settled(daemon)
        for name, f in last.items():
            if f["fetches"] > seen[name]:
                seen[name] = f["fetches"]
                durations[name].append(f["last_duration_s"] * 1000)
                finished[name].append(f["last_ok_at"])
        verbs = {v: c - verbs_before.get(v, 0) for v, c in verbs_after.items() if c > verbs_before.get(v, 0)}
    finally:
        daemon.stop()
    rows = []
    walls = {}
    pool_fetches = 0
    for size in sizes:
        name = _pool(size)
        count = seen[name] - first[name]["fetches"]
        pool_fetches += count
        times = finished[name]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        per = interval_s / median(gaps) if gaps else 0.0
        rows.append(
            Row(
                "4",
                f"necrod pool of {size} slot(s): fetches per interval (from the gaps)",
                "per interval",
                per,
                n=count,
                target="1 per pool",
                met=0.8 <= per <= 1.2,
            )
        )
        d = durations[name]
        walls[size] = median(d)
        rows.append(
            Row(
                "4",
                f"necrod pool of {size} slot(s): wall time per fetch",
                "ms",
                median(d),
                percentile(d, 99),
                len(d),
            )
        )
    spawned = ", ".join(f"{v} {c / window:.1f}" for v, c in sorted(verbs.items()))
    fetches = verbs.get("fetch", 0)
    rows.append(
        Row(
            "4",
            f"git fetch processes per interval, all {len(sizes)} pools ({spawned} per interval)",
            "per interval",
            fetches / window,
            n=fetches,
            ratio=fetches / max(pool_fetches, 1),
            ratio_to="pool fetches",
            target="= number of pools",
            met=fetches == pool_fetches,
        )
    )
    return rows, walls


def _fetch_all(clones: list[Path]) -> float:
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["git", "-C", str(c), "fetch", "--quiet", "origin"], env=GIT_ENV, stderr=subprocess.PIPE
        )
        for c in clones
    ]
    for proc in procs:
        if proc.wait() != 0:
            raise RuntimeError(f"git fetch failed: {proc.stderr.read().decode() if proc.stderr else ''}")
    return time.perf_counter() - started


def _clones(
    scratch: Scratch,
    origin: str,
    counts: tuple[int, ...],
    intervals: int,
    moving: bool,
    walls: dict[int, float],
) -> list[Row]:
    rows = []
    for count in counts:
        clones = [scratch.path("fetch-clones", f"c{i}.git") for i in range(count)]
        for clone in clones:
            git("clone", "--quiet", "--bare", "--no-local", origin, str(clone))
            git("-C", str(clone), "config", "remote.origin.fetch", "+refs/heads/*:refs/remotes/origin/*")
        took = []
        for i in range(intervals + 1):
            if moving:
                add_commit(Path(origin), 1000 * count + i)
            took.append(_fetch_all(clones) * 1000)
        label = f"{count} clones each fetching: wall time per interval ({count} git fetch processes)"
        row = Row("4", label, "ms", median(took), percentile(took, 99), len(took))
        if walls.get(count):
            row.ratio, row.ratio_to = row.median / walls[count], f"necrod fetch, pool of {count} slots"
        rows.append(row)
        for clone in clones:
            rmtree(clone)
    return rows


def measure(
    scratch: Scratch,
    origin: str,
    base: str,
    sizes: tuple[int, ...],
    clones: tuple[int, ...],
    intervals: int,
    moving: bool,
    interval_s: float = INTERVAL_S,
) -> list[Row]:
    rows, walls = _necrod(scratch, origin, base, sizes, intervals, moving, interval_s)
    return rows + _clones(scratch, origin, clones, intervals, moving, walls)
