"""Item 9: ``overlay`` slots and the prepare step (issue 17), against ``worktree`` slots and git by
hand, on two repositories generated for it (5,000 and 50,000 files; ``--quick``: 1,000 and
10,000). One daemon per repository, five pools, all ``salvage: false``, ``fetch_interval_s: 0``:
``ov`` and ``wt`` (one slot each, overlay and worktree), ``ov10`` and ``wt10`` (10 slots each),
``ov-prep`` (one overlay slot, with a prepare step). Every timed step starts with the daemon
quiet and the other pools' cleanups done; overlay and worktree take turns going first.

1. Release to available, as item 3 takes it (the same debris, timed from ``slots.release`` to
   the ``slot.state`` event ``available``/``cleaned``), on ``ov`` and ``wt``, against the floor:
   ``git reset --hard && git clean -ffdx`` by hand in a plain clone with the same debris. The
   overlay reset leaves the dropped upper in the pool's ``trash/``, emptied in the background:
   the time from the release until it is empty is shown too.
2. The first ``git status`` in a slot just reset (allocate, time it, release), on ``ov`` and
   ``wt``, against the first ``git status`` in a plain clone just made (``git clone --no-local``).
3. A base move: a commit is added to the origin, then one allocation of a ref the origin does
   not have makes the pool fetch (``not_found`` comes back, the base has moved); timed from that
   call until all 10 idle slots of ``ov10`` or ``wt10`` sent ``slot.state`` ``moved`` at the new
   commit (the pool's ``pool.base`` event splits off the fetch; for overlay, the old base layer's
   deletion afterwards, in the background, is shown too). By hand, after both pools: ``git
   checkout`` of the new commit in a clone at the old one (the files that changed), and ``git
   worktree add`` of it (a whole checkout, which is what a new base layer is; the overlay target
   is judged on it). Pools at the default ``git_concurrency`` (2).
4. Disk of the 10 idle slots of ``ov10`` and ``wt10`` just started: ``du -s -x -B1`` of the pool
   directory (``-x``: not through the mounted slots, whose files are the layers' seen again),
   against the pool's mirror (without ``worktrees/``) plus one checkout (a clone's work tree).
5. What a prepare step saves per task. The step sleeps (standing in for a download) and writes
   2,000 files into ``build/deps/``, ignored; the task checks that the last is there. By hand, on
   ``ov``: allocate, run the step in the slot, run the task. By the pool, on ``ov-prep``, whose
   slots stand on the step's output (run once per key): allocate, run the task. Seconds from the
   allocation to the task's end; releases untimed.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import debris, release
from bench.baselines import hand_clone
from bench.daemon import Daemon, config_yaml
from bench.disk import du
from bench.gitrepo import GIT_ENV, add_commit, git, make_origin
from bench.report import Row
from bench.rpc import Conn, RpcError, Watch
from bench.scratch import Scratch, rmtree, unmount_under
from bench.stats import median, percentile, timed_git
from necrod.io import overlay as overlayfs

OV, WT, OV10, WT10, PREP = "ov", "wt", "ov10", "wt10", "ov-prep"
KINDS = {OV: "overlay", WT: "worktree", OV10: "overlay", WT10: "worktree", PREP: "overlay"}
IDLE = 10
COMMITS = 100
#: Release to available on the overlay pool, at most this times the floor: at the smaller and
#: at the larger repository.
RELEASE_TARGETS = (0.3, 0.1)
#: The overlay pool of 10 idle slots, at most the mirror plus this many checkouts.
DISK_CHECKOUTS = 1.5
#: Files the prepare step writes.
STEP_FILES = 2000
TASK = ["sh", "-c", f"test -f build/deps/m{STEP_FILES - 1}.js"]


@dataclass(frozen=True)
class Sizes:
    files: tuple[int, ...]
    runs: int
    #: How long the prepare step sleeps before writing its files.
    step_sleep_s: float


def step_command(sleep_s: float) -> str:
    return (
        f"sleep {sleep_s:g}; mkdir -p build/deps; i=0; "
        f'while [ $i -lt {STEP_FILES} ]; do echo "module $i" > build/deps/m$i.js; i=$((i+1)); done'
    )


def _config(origin: Path, step: str) -> str:
    common = {"repo_url": str(origin), "base": "main", "fetch_interval_s": 0, "min_idle": 0, "salvage": False}
    one, ten = {**common, "slots": 1, "max_slots": 1}, {**common, "slots": IDLE, "max_slots": IDLE}
    pools: dict[str, dict[str, Any]] = {
        name: {**(ten if name in (OV10, WT10) else one), "isolation": kind} for name, kind in KINDS.items()
    }
    pools[PREP]["prepare"] = {"command": step, "timeout_s": 600}
    return config_yaml(pools)


def _label(files: int) -> str:
    return f"{files:,} files:"


# --- small helpers on one daemon ----------------------------------------------------------------


async def _quiet(daemon: Daemon, *pools: str) -> None:
    """Every slot of ``pools`` available, no overlay trash left, the daemon's own CPU calm."""
    for pool in pools:
        await asyncio.to_thread(daemon.wait_available, pool)
        await _trash_empty(daemon, pool)
    await asyncio.to_thread(daemon.wait_quiet)


async def _trash_empty(daemon: Daemon, pool: str, timeout: float = 300.0) -> float:
    """Until the pool's ``trash/`` (dropped overlay uppers) is empty; when it was."""
    trash = daemon.workspace(pool) / "trash"
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        try:
            if not any(trash.iterdir()):
                return time.perf_counter()
        except FileNotFoundError:
            return time.perf_counter()
        await asyncio.sleep(0.005)
    raise RuntimeError(f"the trash of pool {pool} was not emptied within {timeout:g}s")


def _cleaned(slot: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: (
        e.get("type") == "slot.state"
        and e.get("slot_id") == slot
        and e.get("state") == "available"
        and e.get("reason") == "cleaned"
    )


async def _verbs(conn: Conn) -> dict[str, int]:
    return dict((await conn.call("daemon.status"))["git"]["started_by_verb"])


# --- 1. release to available ----------------------------------------------------------------------


@dataclass
class Released:
    times: list[float]
    trash: list[float]
    verbs: dict[str, int]


async def _releases(daemon: Daemon, runs: int, dirt: debris.Debris) -> dict[str, Released]:
    conn = await Conn.open(str(daemon.socket))
    watch = await Watch.start(str(daemon.socket), ["slots"])
    found = {pool: Released([], [], {}) for pool in (OV, WT)}
    try:
        for n in range(runs):
            for pool in (OV, WT)[:: 1 if n % 2 == 0 else -1]:
                lease = await conn.call("slots.allocate", {"pool": pool, "holder": "bench"})
                path = Path(lease["path"])
                files = debris.tracked_files(path, dirt.modified)
                build, _ = debris.ignored_dir(path)
                debris.make(path, dirt, files, build)
                await _quiet(daemon)
                before = await _verbs(conn)
                started = time.perf_counter()
                await conn.call("slots.release", {"lease_id": lease["lease_id"]})
                done = await watch.wait(_cleaned(lease["slot_id"]))
                emptied = await _trash_empty(daemon, pool)
                got = found[pool]
                got.times.append(done - started)
                got.trash.append(emptied - started)
                for verb, count in (await _verbs(conn)).items():
                    if count > before.get(verb, 0):
                        got.verbs[verb] = got.verbs.get(verb, 0) + count - before.get(verb, 0)
    finally:
        await watch.close()
        await conn.close()
    return found


def _release_rows(
    daemon: Daemon, hand: Path, runs: int, dirt: debris.Debris, files: int, k: int
) -> list[Row]:
    at = _label(files)
    floor_s = release.floor(hand, runs, dirt)
    floor = median(floor_s)
    label = f"{dirt.modified} modified, {dirt.untracked} untracked, {dirt.ignored} ignored files"
    rows = [
        Row("9", f"{at} floor: reset --hard + clean -ffdx by hand ({label})", "ms", floor * 1000,
            percentile(floor_s, 99) * 1000, len(floor_s)),
    ]  # fmt: skip
    found = asyncio.run(_releases(daemon, runs, dirt))
    target = RELEASE_TARGETS[min(k, len(RELEASE_TARGETS) - 1)]
    for pool in (WT, OV):
        got = found[pool]
        row = Row("9", f"{at} release to available, {KINDS[pool]} pool (salvage: false)", "ms",
                  median(got.times) * 1000, percentile(got.times, 99) * 1000, len(got.times),
                  ratio=median(got.times) / floor, ratio_to="hand floor")  # fmt: skip
        if pool == OV:
            row.target, row.met = f"<= {target:g}x floor", row.ratio is not None and row.ratio <= target
        rows.append(row)
        spawned = ", ".join(f"{verb} {c / runs:g}" for verb, c in sorted(got.verbs.items())) or "none"
        rows.append(Row("9", f"{at}   git processes per release, {KINDS[pool]} pool: {spawned}", "count",
                        sum(got.verbs.values()) / runs))  # fmt: skip
        if pool == OV:
            rows.append(Row("9", f"{at}   release until the dropped upper is deleted (in the background)",
                            "ms", median(got.trash) * 1000, percentile(got.trash, 99) * 1000, len(got.trash),
                            ratio=median(got.trash) / floor, ratio_to="hand floor"))  # fmt: skip
    return rows


# --- 2. the first git status in a fresh slot -----------------------------------------------------


async def _first_status(daemon: Daemon, runs: int) -> dict[str, list[float]]:
    conn = await Conn.open(str(daemon.socket))
    found: dict[str, list[float]] = {OV: [], WT: []}
    try:
        for n in range(runs):
            for pool in (OV, WT)[:: 1 if n % 2 == 0 else -1]:
                await _quiet(daemon, OV, WT)
                lease = await conn.call("slots.allocate", {"pool": pool, "holder": "bench"})
                found[pool].append(timed_git(["status"], cwd=lease["path"]))
                await conn.call("slots.release", {"lease_id": lease["lease_id"]})
        await _quiet(daemon, OV, WT)
    finally:
        await conn.close()
    return found


def _status_rows(daemon: Daemon, scratch: Scratch, origin: Path, runs: int, files: int) -> list[Row]:
    at = _label(files)
    plain = []
    for i in range(runs):
        clone = hand_clone(scratch, str(origin), f"ov-status/clone{i}")
        plain.append(timed_git(["status"], cwd=str(clone)))
        rmtree(clone)
    base = median(plain)
    rows = [Row("9", f"{at} first git status in a plain clone just made (clone --no-local)", "ms",
                base * 1000, percentile(plain, 99) * 1000, len(plain))]  # fmt: skip
    found = asyncio.run(_first_status(daemon, runs))
    for pool in (WT, OV):
        s = found[pool]
        rows.append(Row("9", f"{at} first git status in a slot just reset, {KINDS[pool]} pool", "ms",
                        median(s) * 1000, percentile(s, 99) * 1000, len(s), ratio=median(s) / base,
                        ratio_to="plain clone"))  # fmt: skip
    return rows


# --- 3. a base move -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Moved:
    """Seconds from the call that makes the pool fetch until: its ``pool.base`` event, the last
    idle slot's ``moved`` event, and (overlay) the old base layer deleted."""

    based: float
    moved: float
    old_layer_gone: float


async def _move(daemon: Daemon, pool: str, commit: str, n: int) -> Moved:
    conn = await Conn.open(str(daemon.socket))
    watch = await Watch.start(str(daemon.socket), ["slots", "pools"])

    def ours(e: dict[str, Any]) -> bool:
        if e.get("pool") != pool or e.get("commit") != commit:
            return False
        return e.get("type") == "pool.base" or (
            e.get("type") == "slot.state" and e.get("reason") == "moved" and e.get("state") == "available"
        )

    try:
        started = time.perf_counter()
        try:
            # A ref the mirror does not have is fetched once (as for a just-pushed branch): the
            # fetch moves the base, then the call fails.
            await conn.call("slots.allocate", {"pool": pool, "holder": "bench", "ref": f"bench-none-{n}"})
            raise RuntimeError(f"allocating the missing ref bench-none-{n} in pool {pool} succeeded")
        except RpcError as exc:
            if exc.kind != "not_found":
                raise
        moved: set[str] = set()
        based = last = 0.0
        while len(moved) < IDLE:
            at = await watch.wait(ours)
            if watch.last["type"] == "pool.base":
                based = at
            else:
                moved.add(watch.last["slot_id"])
                last = at
        gone = last
        if KINDS[pool] == "overlay":
            gone = await _only_layer(daemon, pool, f"base-{commit}")
    finally:
        await watch.close()
        await conn.close()
    return Moved((based or last) - started, last - started, gone - started)


async def _only_layer(daemon: Daemon, pool: str, layer: str, timeout: float = 300.0) -> float:
    """Until ``layer`` is the only one in the pool's ``layers/``; when it was."""
    layers = daemon.workspace(pool) / "layers"
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if [n for n in os.listdir(layers) if not n.startswith(".probe-")] == [layer]:
            return time.perf_counter()
        await asyncio.sleep(0.005)
    raise RuntimeError(f"pool {pool} kept layers other than {layer} for {timeout:g}s")


def _move_rows(daemon: Daemon, scratch: Scratch, origin: Path, runs: int, files: int) -> list[Row]:
    at = _label(files)
    hand = hand_clone(scratch, str(origin), "ov-move/clone")
    found: dict[str, list[Moved]] = {OV10: [], WT10: []}
    checkout, whole = [], []
    for n in range(runs):
        commit = add_commit(origin, 9000 + n)
        for pool in (OV10, WT10)[:: 1 if n % 2 == 0 else -1]:
            asyncio.run(_quiet(daemon, OV10, WT10))
            found[pool].append(asyncio.run(_move(daemon, pool, commit, n)))
        asyncio.run(_quiet(daemon, OV10, WT10))
        git("fetch", "--quiet", "origin", cwd=hand)
        checkout.append(timed_git(["checkout", "--quiet", "--detach", commit], cwd=str(hand)))
        tree = scratch.path("ov-move", f"wt{n}")
        whole.append(timed_git(["worktree", "add", "--quiet", "--detach", str(tree), commit], cwd=str(hand)))
        git("worktree", "remove", "--force", str(tree), cwd=hand)
    asyncio.run(_quiet(daemon, OV10, WT10))
    rmtree(hand)
    one, full = median(checkout), median(whole)
    rows = [
        Row("9", f"{at} by hand: git checkout of the new commit in a clone at the old one", "ms",
            one * 1000, percentile(checkout, 99) * 1000, len(checkout)),
        Row("9", f"{at} by hand: git worktree add of the new commit (a whole checkout)", "ms",
            full * 1000, percentile(whole, 99) * 1000, len(whole)),
    ]  # fmt: skip

    def ms(values: list[float]) -> tuple[float, float, int]:
        return median(values) * 1000, percentile(values, 99) * 1000, len(values)

    for pool in (WT10, OV10):
        kind = KINDS[pool]
        took = [m.moved for m in found[pool]]
        row = Row("9", f"{at} base move until all {IDLE} idle slots are at it, {kind} pool", "ms", *ms(took))
        if kind == "worktree":
            row.ratio, row.ratio_to = median(took) / one, "checkout in a clone"
        else:
            row.ratio, row.ratio_to = median(took) / full, "whole checkout"
            row.target, row.met = "<= 1 checkout, any slot count", median(took) <= full
        rows.append(row)
        based = [m.based for m in found[pool]]
        rows.append(
            Row("9", f"{at}   of which: the fetch, until the pool.base event, {kind} pool", "ms", *ms(based))
        )
        if kind == "overlay":
            gone = [m.old_layer_gone for m in found[pool]]
            rows.append(Row("9", f"{at}   until the old base layer is deleted (in the background)", "ms",
                            *ms(gone)))  # fmt: skip
    return rows


# --- 4. disk --------------------------------------------------------------------------------------


def _disk_rows(daemon: Daemon, scratch: Scratch, origin: Path, files: int) -> list[Row]:
    at = _label(files)
    clone = hand_clone(scratch, str(origin), "ov-disk/clone")
    checkout = du(clone, exclude=".git")
    rmtree(clone)
    mirror = du(daemon.workspace(OV10) / "mirror.git", exclude="worktrees")
    floor = mirror + checkout
    limit = mirror + DISK_CHECKOUTS * checkout
    rows = [Row("9", f"{at} one mirror + one checkout (the work tree of a clone)", "MB", floor)]
    for pool in (WT10, OV10):
        used = du(daemon.workspace(pool), one_file_system=True)
        row = Row("9", f"{at} {KINDS[pool]} pool of {IDLE} idle slots (du -x of the pool directory)", "MB",
                  used, ratio=used / floor, ratio_to="mirror + 1 checkout")  # fmt: skip
        if pool == OV10:
            row.target, row.met = f"<= mirror + {DISK_CHECKOUTS:g} checkouts", used <= limit
        rows.append(row)
    return rows


# --- 5. the prepare step --------------------------------------------------------------------------


def _run(argv: list[str], cwd: str) -> None:
    result = subprocess.run(argv, cwd=cwd, env=GIT_ENV, capture_output=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"{argv} in {cwd} exited {result.returncode}: {result.stderr.decode(errors='replace')}"
        )


async def _tasks(daemon: Daemon, runs: int, step: str) -> dict[str, list[float]]:
    conn = await Conn.open(str(daemon.socket))
    found: dict[str, list[float]] = {OV: [], PREP: []}
    try:
        for n in range(runs):
            for pool in (OV, PREP)[:: 1 if n % 2 == 0 else -1]:
                await _quiet(daemon, OV, PREP)
                started = time.perf_counter()
                lease = await conn.call("slots.allocate", {"pool": pool, "holder": "bench"})
                if pool == OV:
                    _run(["sh", "-c", step], lease["path"])
                _run(TASK, lease["path"])
                found[pool].append(time.perf_counter() - started)
                await conn.call("slots.release", {"lease_id": lease["lease_id"]})
        await _quiet(daemon, OV, PREP)
    finally:
        await conn.close()
    return found


def _wait_prepared(daemon: Daemon, timeout: float = 600.0) -> dict[str, Any]:
    """Until the prepare pool's step is done and its slot stands on the output; its view."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p: dict[str, Any] = daemon.call("pools.get", {"pool": PREP})
        state = p["prepare"]
        if state["state"] == "failed":
            raise RuntimeError(f"the prepare step failed: {state['error']}")
        layer = f"prepared-{state['ready']}"
        slots = daemon.call("slots.list", {"pool": PREP})["slots"]
        if state["state"] == "ready" and slots and all(layer in s["layers"] for s in slots):
            daemon.wait_available(PREP)
            return p
        time.sleep(0.1)
    raise RuntimeError(f"pool {PREP} was not prepared within {timeout:g}s")


def _prepare_rows(daemon: Daemon, runs: int, files: int, step: str, sleep_s: float) -> list[Row]:
    at = _label(files)
    view = _wait_prepared(daemon)
    found = asyncio.run(_tasks(daemon, runs, step))
    by_hand, by_pool = found[OV], found[PREP]
    what = f"sleep {sleep_s:g} s, write {STEP_FILES:,} ignored files"
    return [
        Row("9", f"{at} task on an overlay pool with prepare: (the output is a layer): allocate, task", "s",
            median(by_pool), percentile(by_pool, 99), len(by_pool)),
        Row("9", f"{at}   the step as the pool ran it, once per key (prepare.last_duration_s)", "s",
            view["prepare"]["last_duration_s"]),
        Row("9", f"{at} task with the step run by hand ({what}): allocate, step, task", "s",
            median(by_hand), percentile(by_hand, 99), len(by_hand), ratio=median(by_hand) / median(by_pool),
            ratio_to="pool with prepare:"),
    ]  # fmt: skip


# --- the item -------------------------------------------------------------------------------------


def _one_size(
    scratch: Scratch, files: int, k: int, sizes: Sizes, dirt: debris.Debris, say: Callable[[str], None]
) -> list[Row]:
    name = f"ov{files}"
    started = time.perf_counter()
    origin = make_origin(scratch.path(f"{name}.git"), files, COMMITS)
    say(f"9: {files:,}-file repository generated in {time.perf_counter() - started:.1f} s")
    step = step_command(sizes.step_sleep_s)
    started = time.perf_counter()
    daemon = Daemon(scratch, name, _config(origin, step))
    try:
        daemon.start()
        say(
            f"9: necrod with 5 pools (1, 1, {IDLE}, {IDLE}, 1 slots) ready in "
            f"{time.perf_counter() - started:.1f} s"
        )
        asyncio.run(_quiet(daemon, *KINDS))
        # Measured first, on slots nobody used yet.
        disk = _disk_rows(daemon, scratch, origin, files)
        say(f"9: {files:,} files: release to available, {sizes.runs} rounds")
        hand = hand_clone(scratch, str(origin), f"{name}-hand")
        released = _release_rows(daemon, hand, sizes.runs, dirt, files, k)
        rmtree(hand)
        say(f"9: {files:,} files: first git status")
        status = _status_rows(daemon, scratch, origin, sizes.runs, files)
        say(f"9: {files:,} files: base moves")
        moves = _move_rows(daemon, scratch, origin, sizes.runs, files)
        say(f"9: {files:,} files: the prepare step")
        prepared = _prepare_rows(daemon, sizes.runs, files, step, sizes.step_sleep_s)
    finally:
        daemon.stop()
        unmount_under(daemon.root)
        rmtree(daemon.root)
        rmtree(origin)
    return released + status + moves + disk + prepared


def measure(scratch: Scratch, sizes: Sizes, dirt: debris.Debris, say: Callable[[str], None]) -> list[Row]:
    problem = overlayfs.probe(scratch.path("overlay-probe"))
    if problem is not None:  # the daemon would refuse every overlay pool for the same reason
        return [Row("9", f"not measured: {problem}", "count")]
    rows: list[Row] = []
    for k, files in enumerate(sizes.files):
        rows += _one_size(scratch, files, k, sizes, dirt, say)
    return rows
