"""``python -m bench``: build a test repository (or take ``--repo``), run real necrod daemons on
it, and print one table of medians, p99s and ratios against baselines measured in the same run.

Items (issue 6): 1 allocation latency, 2 the other ways per task, 3 release to available,
4 fetching, 5 disk, 6 the daemon itself, 7 the dispatcher, 8 isolation and launchers (shared-clone
vs worktree allocation, container vs process task start), 9 overlay slots and the prepare step
(issue 17, on repositories of its own), ``ctl`` the wall time of ``necroctl status`` (issue 20),
``sub`` fetch cost per interval with submodules shared by two pools (issue 18, on repositories of
its own), ``db`` the SQLite commit inline vs in a thread, and ``mono`` the first ready slot of a
large repository, full vs partial vs sparse (issue 18, on a repository of its own; not in
``--quick`` unless named: ``--only mono``).
Items 1 and 7 are judged against same-run floors (``bench/floors.py``, issue 22); ``--profile``
samples the daemon with py-spy during them (``bench/profile.py``).
Everything it starts lives under one /tmp/nb-* directory, removed at the end, even on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import (
    alloc,
    baselines,
    ctl_status,
    daemon_cost,
    debris,
    disk,
    dispatch,
    fetch,
    isolation,
    monorepo,
    overlay,
    release,
    report,
    sqlite_hop,
    submodules,
)
from bench.daemon import Daemon, config_yaml
from bench.gitrepo import git, make_origin
from bench.profile import Profiler
from bench.report import Row
from bench.scratch import Scratch, raise_on_sigterm

ITEMS = ("1", "2", "3", "4", "5", "6", "7", "8", "9", "ctl", "sub", "db", "mono")
ALLOC_POOL, DISK_POOL = "alloc", "disk"


@dataclass(frozen=True)
class Plan:
    #: Concurrent clients; the allocation pool has as many slots as the largest.
    alloc_levels: tuple[int, ...]
    alloc_rounds: int
    task_runs: int
    release_runs: int
    idle_s: float
    db_commits: int
    fetch_intervals: int
    fetch_interval_s: float
    fetch_slots: tuple[int, ...]
    fetch_clones: tuple[int, ...]
    #: Tasks run to completion per dispatcher measurement.
    tasks_done: int
    #: Item 8: clients (the pools have as many slots as the largest), rounds per count,
    #: allocations with a ref per pool, tasks per launcher.
    iso_levels: tuple[int, ...]
    iso_rounds: int
    ref_allocs: int
    start_tasks: int
    #: Item 9: its repositories' sizes, samples per figure, and how long its prepare step sleeps.
    overlay: overlay.Sizes
    #: Item mono: its repository's size and samples per variant.
    mono: monorepo.Sizes = monorepo.FULL


# --quick must finish in under two minutes on two cores (issue 6): fewer of everything, a shorter
# fetch interval, item 8 at 1 and 8 clients only, item 9 on 1,000 and 10,000 files.
QUICK = Plan(
    (1, 8, 32), 2, 2, 2, 4.0, 300, 2, 2.5, (1, 10), (10,), 100, (1, 8), 1, 8, 5,
    overlay.Sizes((1000, 10_000), 2, 1.0), monorepo.QUICK,
)  # fmt: skip
FULL = Plan(
    (1, 8, 32, 64), 6, 9, 9, 35.0, 2000, 4, 5.0, (1, 10, 50), (10, 50), 1000, (1, 8, 32), 4, 32, 20,
    overlay.Sizes((5000, 50_000), 5, 3.0),
)  # fmt: skip


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples and sizes: under two minutes")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of the table")
    parser.add_argument("--repo", help="a repository path or URL to use instead of the generated one")
    parser.add_argument("--files", type=int, help="files in the generated repository (5000; --quick: 1000)")
    parser.add_argument("--commits", type=int, help="commits in the generated repository (500; --quick: 100)")
    parser.add_argument("--only", help=f"comma-separated items to run, of {','.join(ITEMS)} (default: all)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (for a look at logs)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the daemon during item 1's 32-client level and item 7's unqueued runs; "
        "print each flame's top functions after the table",
    )
    return parser.parse_args(argv)


def say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _origin(args: argparse.Namespace, scratch: Scratch) -> tuple[str, str]:
    if args.repo:
        local = Path(args.repo).expanduser()
        repo = str(local.resolve()) if local.exists() else args.repo
        return repo, f"--repo {repo}"
    # --quick uses a smaller repository: creating and deleting 76 checkouts of 5,000 files
    # alone takes a minute on two cores.
    files = args.files or (1000 if args.quick else 5000)
    commits = args.commits or (100 if args.quick else 500)
    origin = scratch.path("origin.git")
    started = time.perf_counter()
    make_origin(origin, files, commits)
    took = time.perf_counter() - started
    return str(origin), f"generated: {files} files, {commits} commits in {took:.1f} s"


def _base(origin: str) -> str:
    head = git("ls-remote", "--symref", origin, "HEAD")
    first = head.splitlines()[0] if head else ""
    return first.split()[1].removeprefix("refs/heads/") if first.startswith("ref:") else "main"


def _pools_a(origin: str, base: str, alloc_slots: int) -> str:
    common = {"repo_url": origin, "base": base, "fetch_interval_s": 0, "min_idle": 0}
    one = {**common, "slots": 1, "max_slots": 1}
    return config_yaml(
        {
            ALLOC_POOL: {
                **common,
                "slots": alloc_slots,
                "max_slots": alloc_slots,
                "salvage": False,
                "git_concurrency": 4,
            },
            release.SALVAGE_POOL: {**one, "salvage": True},
            release.PLAIN_POOL: {**one, "salvage": False},
            DISK_POOL: {**common, "slots": disk.SLOTS, "max_slots": disk.SLOTS},
        },
        {"git_concurrency": 4},
    )


def run(
    args: argparse.Namespace, scratch: Scratch, plan: Plan, items: set[str], profiler: Profiler | None
) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    dirt = debris.Debris()
    notes = []
    if items - {"9", "sub", "mono"}:  # items 9, sub and mono generate repositories of their own
        origin, source = _origin(args, scratch)
        say(f"repository: {source}")
        base = _base(origin)
        notes.append(f"repository: {source}")
    if items & {"1", "2", "3", "5"}:
        slots = max(plan.alloc_levels)
        say(f"starting necrod with 4 pools ({slots} + 1 + 1 + {disk.SLOTS} slots)")
        started = time.perf_counter()
        daemon = Daemon(scratch, "a", _pools_a(origin, base, slots)).start()
        say(f"ready in {time.perf_counter() - started:.1f} s")
        hand = baselines.hand_clone(scratch, origin, "hand")
        levels = list(plan.alloc_levels) if "1" in items else [1]
        say(f"1: allocation latency at {levels} clients")
        alloc_rows, single_ms = alloc.measure(
            daemon,
            ALLOC_POOL,
            slots,
            levels,
            plan.alloc_rounds,
            burst=not args.quick,
            scratch=scratch if "1" in items else None,
            record=profiler.record if profiler else None,
        )
        rows += alloc_rows if "1" in items else []
        if "2" in items:
            say("2: clone, worktree add and clean-on-allocate per task")
            rows += baselines.measure(scratch, origin, hand, plan.task_runs, dirt, single_ms)
        if "3" in items:
            say("3: release to available")
            rows += release.measure(daemon, hand, plan.release_runs, dirt)
        if "5" in items:
            say("5: disk")
            rows += disk.measure(daemon, DISK_POOL, scratch, origin)
        daemon.stop()
    if items & {"6", "7"}:
        small = make_origin(scratch.path("small.git"), 50, 20)
    if "6" in items:
        say("6: the daemon with 1,000 slots (small repository)")
        rows += daemon_cost.measure(scratch, small, plan.idle_s, args.quick)
    if "7" in items:
        say(f"7: the dispatcher, {plan.tasks_done} tasks alone and with {dispatch.QUEUED:,} queued")
        rows += dispatch.measure(
            scratch, small, plan.tasks_done, args.quick, record=profiler.record if profiler else None
        )
    if "8" in items:
        say(f"8: allocation on shared-clone vs worktree pools at {list(plan.iso_levels)} clients")
        rows += isolation.allocation(
            scratch, origin, base, list(plan.iso_levels), plan.iso_rounds, plan.ref_allocs
        )
        say(f"8: task start, process vs container launcher, {plan.start_tasks} tasks each")
        rows += isolation.starts(scratch, origin, base, plan.start_tasks)
    if "ctl" in items:
        say(f"ctl: necroctl status against python -c pass, {ctl_status.RUNS} runs each")
        rows += ctl_status.measure(scratch)
    if "db" in items:
        say("db: sqlite commit inline vs in a thread")
        rows += sqlite_hop.measure(Path(scratch.path("db")), plan.db_commits)
    if "4" in items:
        say("4: fetching")
        moving = not args.repo  # only the generated origin is ours to add commits to
        rows += fetch.measure(
            scratch,
            origin,
            base,
            plan.fetch_slots,
            plan.fetch_clones,
            plan.fetch_intervals,
            moving,
            plan.fetch_interval_s,
        )
    if "sub" in items:
        intervals = 2 * plan.fetch_intervals
        say(
            f"sub: fetch cost with submodules shared by 2 pools, {intervals} intervals of {plan.fetch_interval_s} s"
        )
        rows += submodules.measure(scratch, 200 if args.quick else 2000, intervals, plan.fetch_interval_s)
    if "9" in items:
        sizes = " and ".join(f"{n:,}" for n in plan.overlay.files)
        notes.append(f"item 9: generated: {sizes} files, {overlay.COMMITS} commits each")
        say(f"9: overlay slots and the prepare step, on {sizes} files")
        rows += overlay.measure(scratch, plan.overlay, dirt, say)
    if "mono" in items:
        m = plan.mono
        notes.append(f"item mono: generated: {m.files:,} files, {m.commits:,} commits of {m.churn} files")
        say(f"mono: first ready slot, full vs partial vs sparse, {m.samples} samples each")
        rows += monorepo.measure(scratch, plan.mono, say)
    return rows, notes


def _revision() -> str:
    here = Path(__file__).resolve().parent.parent
    try:
        head = git("rev-parse", "--short", "HEAD", cwd=here)
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "necrod", cwd=here)
    except RuntimeError:
        return "unknown"
    return head + (" + uncommitted changes under necrod/" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    items = set(args.only.split(",")) if args.only else set(ITEMS) - ({"mono"} if args.quick else set())
    unknown = items - set(ITEMS)
    if unknown:
        print(
            f"bench: unknown item(s) {', '.join(sorted(unknown))}; known: {', '.join(ITEMS)}", file=sys.stderr
        )
        return 2
    plan = QUICK if args.quick else FULL
    command = "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    raise_on_sigterm()
    scratch = Scratch(keep=args.keep)
    profiler = Profiler(scratch) if args.profile else None
    if profiler and profiler.missing:
        say(profiler.missing)
    started = time.perf_counter()
    profiles: list[str] = []
    try:
        rows, notes = run(args, scratch, plan, items, profiler)
        profiles = profiler.summaries() if profiler else []
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        return 130
    finally:
        scratch.close()
        if args.keep:
            say(f"kept {scratch.root}")
    took = time.perf_counter() - started
    machine = report.machine()
    if args.json:
        meta = {**machine, "necrod": _revision(), "seconds": round(took, 1)}
        print(report.to_json(rows, meta, command, profiles))
        return 0
    header = [
        f"command: {command.strip()}",
        report.machine_line(machine),
        f"necrod: {_revision()}; {'; '.join(notes)}; took {took:.0f} s; "
        f"load average now {os.getloadavg()[0]:.2f}",
    ]
    print(report.render(rows, header))
    if profiles:
        print("\n".join(profiles))
    return 0


if __name__ == "__main__":
    sys.exit(main())
