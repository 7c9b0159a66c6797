"""Item ``sub``: fetch cost per interval with submodules (issue 18). Two pools of one
superproject that records three submodules, every origin gaining a commit each interval, in one
daemon: ``submodules: false`` (the same-run baseline: the superproject's fetch alone) against
``submodules: true``. Each submodule has one mirror per host, so its fetches per interval should
stay near one (at most two: a mirror fetched less than half an interval ago is not fetched again,
whichever pool asks), not one per pool, and never one per slot.

Counted over a window of whole intervals started after every pool's first fetch: the pools' own
fetch counters and the ``git fetch`` processes the daemon started (``daemon.status``; the
submodule fetches are the difference), and the wall time of each pool fetch
(``fetch.last_duration_s``, which includes the submodule mirrors' fetches).
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.daemon import Daemon, config_yaml
from bench.gitrepo import add_commit, git, make_origin
from bench.report import Row
from bench.scratch import Scratch
from bench.stats import median, percentile

POOLS = ("sa", "sb")
SUBMODULES = 3
SLOTS = 2


def _origins(scratch: Scratch, files: int) -> tuple[Path, list[Path]]:
    """A superproject (bare) recording ``SUBMODULES`` submodules, and their origins (bare)."""
    subs = [make_origin(scratch.path(f"sub-origin-{i}.git"), files, 20) for i in range(SUBMODULES)]
    top = make_origin(scratch.path("super-origin.git"), files, 20)
    work = scratch.path("super-work")
    git("clone", "--quiet", str(top), str(work))
    gitmodules = ""
    for i, sub in enumerate(subs):
        head = git("rev-parse", "refs/heads/main", cwd=sub)
        git("update-index", "--add", "--cacheinfo", f"160000,{head},vendor/s{i}", cwd=work)
        gitmodules += f'[submodule "s{i}"]\n\tpath = vendor/s{i}\n\turl = {sub}\n'
    (work / ".gitmodules").write_text(gitmodules)
    git("add", ".gitmodules", cwd=work)
    git("commit", "--quiet", "-m", "submodules", cwd=work)
    git("push", "--quiet", "origin", "HEAD:main", cwd=work)
    return top, subs


def _state(daemon: Daemon) -> tuple[dict[str, dict[str, float]], int]:
    """Each pool's fetch state and the git fetch processes started so far, read when no git runs
    (a fetch in flight at an edge of the window would count on one side only)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status = daemon.call("daemon.status")["git"]
        if status["running"] == 0:
            pools = {p["name"]: p["fetch"] for p in daemon.call("pools.list")["pools"]}
            again = daemon.call("daemon.status")["git"]
            if again["running"] == 0 and again["started_by_verb"] == status["started_by_verb"]:
                return pools, int(status["started_by_verb"].get("fetch", 0))
        time.sleep(0.02)
    pools = {p["name"]: p["fetch"] for p in daemon.call("pools.list")["pools"]}
    return pools, int(daemon.call("daemon.status")["git"]["started_by_verb"].get("fetch", 0))


def _run(
    scratch: Scratch,
    name: str,
    top: Path,
    subs: list[Path],
    submodules: bool,
    intervals: int,
    interval_s: float,
) -> tuple[float, float, list[float]]:
    """(pool fetches, git fetch processes) per interval, and each pool fetch's wall time in ms."""
    common = {"repo_url": str(top), "base": "main", "fetch_interval_s": interval_s, "min_idle": 0,
              "slots": SLOTS, "max_slots": SLOTS, "submodules": submodules}  # fmt: skip
    daemon = Daemon(scratch, name, config_yaml(dict.fromkeys(POOLS, common))).start()
    try:
        deadline = time.monotonic() + 3 * interval_s + 30
        while not all(f["fetches"] for f in _state(daemon)[0].values()):
            if time.monotonic() > deadline:
                raise RuntimeError("no periodic fetch seen")
            time.sleep(0.25)
        first, procs_before = _state(daemon)
        seen = {p: f["fetches"] for p, f in first.items()}
        walls: list[float] = []
        started = time.monotonic()
        next_commit, n = started, 0
        while time.monotonic() - started < intervals * interval_s:
            if time.monotonic() >= next_commit:
                n += 1
                for origin in (top, *subs):
                    add_commit(origin, n)
                next_commit += interval_s
            for p, f in _state(daemon)[0].items():
                if f["fetches"] > seen[p]:
                    seen[p] = f["fetches"]
                    walls.append(f["last_duration_s"] * 1000)
            time.sleep(0.25)
        window = (time.monotonic() - started) / interval_s
        last, procs_after = _state(daemon)
        for p, f in last.items():
            if f["fetches"] > seen[p]:
                seen[p] = f["fetches"]
                walls.append(f["last_duration_s"] * 1000)
    finally:
        daemon.stop()
    pool_fetches = sum(seen[p] - first[p]["fetches"] for p in POOLS)
    return pool_fetches / window, (procs_after - procs_before) / window, walls


def measure(scratch: Scratch, files: int, intervals: int, interval_s: float) -> list[Row]:
    top, subs = _origins(scratch, files)
    base_pools, base_procs, base_walls = _run(scratch, "sub-off", top, subs, False, intervals, interval_s)
    pools, procs, walls = _run(scratch, "sub-on", top, subs, True, intervals, interval_s)
    sub_fetches = procs - pools
    per_pool = pools * SUBMODULES  # what fetching each submodule with each pool fetch would cost
    label = f"{len(POOLS)} pools, {SLOTS} slots each, {SUBMODULES} submodules"
    return [
        Row("sub", f"{label}, submodules: false: git fetch processes per interval (baseline)", "per interval",
            base_procs, ratio=base_procs / base_pools if base_pools else None, ratio_to="pool fetches"),
        Row("sub", f"{label}, submodules: true: pool fetches per interval", "per interval", pools),
        Row("sub", f"{label}, submodules: true: git fetch processes per interval", "per interval", procs,
            ratio=procs / base_procs if base_procs else None, ratio_to="the baseline's"),
        Row("sub", "  of which submodule mirror fetches, all pools together", "per interval", sub_fetches,
            ratio=sub_fetches / per_pool if per_pool else None, ratio_to="one per submodule per pool fetch",
            target="< 1 (per host, not per pool)", met=bool(per_pool) and sub_fetches / per_pool < 0.8),
        Row("sub", "wall time per pool fetch, submodules: false (baseline)", "ms", median(base_walls),
            percentile(base_walls, 99), len(base_walls)),
        Row("sub", "wall time per pool fetch, submodules: true (includes the submodule fetches it did)", "ms",
            median(walls), percentile(walls, 99), len(walls),
            ratio=median(walls) / median(base_walls) if base_walls else None, ratio_to="the baseline"),
    ]  # fmt: skip
