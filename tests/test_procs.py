"""Which processes work in a slot, when many slots ask at once (issue 22).

One pass over /proc answers every slot that asked before it started, so a pass mixes the
directories of many slots. These tests hold the answers to what each slot would see alone:
only its own processes (``/slots/a1`` is not ``/slots/a10``), each seen the way it holds that
slot, less that slot's own skip pids; and an answer never comes from a pass that was already
running when its caller asked. Real processes, real /proc; the scanner's pass is held back by
a test pass where the order of passes is the point.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import anyio
import pytest

from necrod.io.procs import Holder, ScanStuck, holders, holders_of, kernel_path
from necrod.io.procscan import ProcScanner
from tests.helpers import Necrod, wait_for

pytestmark = pytest.mark.anyio

Spawn = Callable[..., "subprocess.Popen[bytes]"]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start a process in a session of its own; every one is killed, with its children, at the end."""
    started: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], cwd: Path | str = "/", **env: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, cwd=cwd, env={**os.environ, **env}, start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        started.append(proc)
        return proc

    yield start
    for proc in started:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


@pytest.fixture
def slots(workdir: Path) -> dict[str, str]:
    """Slot directories whose names are prefixes of one another, as the kernel names them."""
    out = {}
    for name in ("a1", "a10", "a1.git", "b"):
        (workdir / "slots" / name).mkdir(parents=True)
        out[name] = kernel_path(str(workdir / "slots" / name))
    return out


def pids(found: Sequence[Holder]) -> set[int]:
    return {h.pid for h in found}


def via(found: Sequence[Holder], pid: int) -> str:
    return next(h.via for h in found if h.pid == pid)


# --- one pass, many askers ----------------------------------------------------------------------


def test_a_slot_whose_path_is_a_prefix_of_anothers_gets_only_its_own_processes(
    spawn: Spawn, slots: dict[str, str]
) -> None:
    in_a1 = spawn(["sleep", "60"], cwd=slots["a1"])
    Path(slots["a10"], "sub").mkdir()
    in_a10 = spawn(["sleep", "60"], cwd=Path(slots["a10"], "sub"))
    in_git = spawn(["sleep", "60"], cwd=slots["a1.git"])
    a1, a10, git_only = holders_of(
        [((slots["a1"],), frozenset()), ((slots["a10"],), frozenset()), ((slots["a1.git"],), frozenset())]
    )
    assert pids(a1) == {in_a1.pid}
    assert pids(a10) == {in_a10.pid}
    assert pids(git_only) == {in_git.pid}
    # The same as each asked alone.
    assert pids(holders([slots["a1"]])) == {in_a1.pid}


MAPPED = """
import ctypes, mmap, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
os.ftruncate(fd, 4096)
assert libc.mmap(None, 4096, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0) not in (None, ctypes.c_void_p(-1).value)
os.close(fd)  # from here on only the mapping ties it to the directory (Python's mmap keeps an fd)
os.chdir("/")
open(sys.argv[2], "w").close()
time.sleep(60)
"""


def test_a_mapping_is_matched_by_whole_components_when_many_slots_ask(
    spawn: Spawn, slots: dict[str, str], workdir: Path
) -> None:
    ready = workdir / "mapped"
    mapper = spawn([sys.executable, "-c", MAPPED, f"{slots['a10']}/m.bin", str(ready)])
    wait_for(ready.exists, 10, what="the mapping")
    a1, a10 = holders_of([((slots["a1"],), frozenset()), ((slots["a10"],), frozenset())])
    assert mapper.pid not in pids(a1)
    assert [(h.pid, h.via, h.path) for h in a10] == [(mapper.pid, "mapped file", f"{slots['a10']}/m.bin")]


def test_one_process_in_two_slots_is_reported_to_each_the_way_it_holds_that_one(
    spawn: Spawn, slots: dict[str, str]
) -> None:
    script = 'exec 3>> "$HELD/held.log"; exec sleep 60'
    both = spawn(["sh", "-c", script], cwd=slots["a1"], HELD=slots["b"])
    wait_for(lambda: Path(slots["b"], "held.log").exists(), 10, what="the open file")
    a1, b = holders_of([((slots["a1"],), frozenset()), ((slots["b"],), frozenset())])
    assert via(a1, both.pid) == "cwd"
    assert via(b, both.pid) == "open file"
    assert next(h.path for h in b if h.pid == both.pid) == f"{slots['b']}/held.log"


def test_each_askers_skip_pids_apply_only_to_its_own_answer(spawn: Spawn, slots: dict[str, str]) -> None:
    shared = spawn(["sleep", "60"], cwd=slots["a1"])
    skipping, not_skipping = holders_of(
        [((slots["a1"],), frozenset({shared.pid})), ((slots["a1"],), frozenset())]
    )
    assert skipping == []
    assert pids(not_skipping) == {shared.pid}


def test_a_deleted_slot_directory_still_names_only_its_own_processes(
    spawn: Spawn, slots: dict[str, str]
) -> None:
    sub = Path(slots["a1"], "sub")
    sub.mkdir()
    in_deleted = spawn(["sleep", "60"], cwd=sub)
    in_gone_slot = spawn(["sleep", "60"], cwd=slots["a1.git"])
    sub.rmdir()
    Path(slots["a1.git"]).rmdir()
    a1, a10, git_dir = holders_of(
        [((slots["a1"],), frozenset()), ((slots["a10"],), frozenset()), ((slots["a1.git"],), frozenset())]
    )
    assert [(h.pid, h.path) for h in a1] == [(in_deleted.pid, f"{sub} (deleted)")]
    assert a10 == []
    assert [(h.pid, h.path) for h in git_dir] == [(in_gone_slot.pid, f"{slots['a1.git']} (deleted)")]


LEADER_GONE = """
import ctypes, os, sys, threading, time
def work():
    held = open(os.path.join(sys.argv[1], "held.log"), "a")
    open(sys.argv[2], "w").close()
    while True:
        held.write("x")
        held.flush()
        time.sleep(0.05)
threading.Thread(target=work).start()
ctypes.CDLL(None).pthread_exit(None)  # the first thread ends; the process reads as a zombie
"""


async def test_a_process_whose_first_thread_exited_is_seen_and_stopped_through_a_live_thread(
    spawn: Spawn, slots: dict[str, str], workdir: Path
) -> None:
    ready = workdir / "holding"
    proc = spawn([sys.executable, "-c", LEADER_GONE, slots["a1"], str(ready)])
    wait_for(ready.exists, 10, what="the thread")
    wait_for(lambda: Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z",
             10, what="the first thread to exit")  # fmt: skip
    a1, a10 = holders_of([((slots["a1"],), frozenset()), ((slots["a10"],), frozenset())])
    assert [(h.pid, h.via, h.path) for h in a1] == [(proc.pid, "open file", f"{slots['a1']}/held.log")]
    assert a10 == []
    stop = await ProcScanner().stop([slots["a1"]], 2.0)
    assert pids(stop.stopped) == {proc.pid} and stop.left == []
    assert proc.wait(10) is not None


# --- the scanner: passes shared, never one that began before the ask ------------------------------


class HeldPass:
    """A pass the test lets run: each call records its askers' directories and waits for a go
    (the real pass then answers); ``ended`` lets a stuck one's thread finish at the end."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[str, ...]]] = []
        self.go: list[threading.Event] = []
        self.started = threading.Semaphore(0)

    def __call__(self, asks: Sequence[tuple[Sequence[str], frozenset[int]]]) -> list[list[Holder]]:
        go = threading.Event()
        self.go.append(go)
        self.batches.append([tuple(dirs) for dirs, _ in asks])
        self.started.release()
        go.wait(30)
        return holders_of(asks)

    async def wait_started(self, count: int) -> None:
        with anyio.fail_after(10):
            while len(self.batches) < count:
                await anyio.sleep(0.01)

    def release_all(self) -> None:
        for go in self.go:
            go.set()


@pytest.fixture
def held() -> Iterator[HeldPass]:
    held = HeldPass()
    yield held
    held.release_all()


async def test_callers_that_ask_during_a_pass_are_served_together_by_the_next_one(
    spawn: Spawn, slots: dict[str, str], held: HeldPass
) -> None:
    scanner = ProcScanner(scan=held)
    answers: dict[str, list[Holder]] = {}

    async def ask(name: str) -> None:
        answers[name] = await scanner.holders([slots[name]])

    async with anyio.create_task_group() as tg:
        tg.start_soon(ask, "a1")
        await held.wait_started(1)
        # Both enter their slots after the first pass began: it may have read past them already.
        late_a10 = spawn(["sleep", "60"], cwd=slots["a10"])
        late_b = spawn(["sleep", "60"], cwd=slots["b"])
        tg.start_soon(ask, "a10")
        tg.start_soon(ask, "b")
        await anyio.sleep(0.2)
        assert len(held.batches) == 1, "a second pass started while one was running"
        held.go[0].set()
        await held.wait_started(2)
        held.go[1].set()
    assert held.batches == [[(slots["a1"],)], [(slots["a10"],), (slots["b"],)]]
    assert answers == {"a1": [], "a10": answers["a10"], "b": answers["b"]}
    assert pids(answers["a10"]) == {late_a10.pid} and pids(answers["b"]) == {late_b.pid}
    assert scanner.statistics() == {"passes": 2, "asks": 3, "stuck": 0}


async def test_many_slots_asking_at_once_share_passes_and_each_gets_its_own(
    spawn: Spawn, workdir: Path
) -> None:
    dirs = []
    for i in range(8):
        (workdir / f"s{i}").mkdir()
        dirs.append(kernel_path(str(workdir / f"s{i}")))
    inside = {d: spawn(["sleep", "60"], cwd=d).pid for d in dirs}
    scanner = ProcScanner()
    answers: dict[str, set[int]] = {}

    async def ask(d: str) -> None:
        answers[d] = pids(await scanner.holders([d]))

    async with anyio.create_task_group() as tg:
        for d in dirs:
            tg.start_soon(ask, d)
    assert answers == {d: {pid} for d, pid in inside.items()}
    # The first pass serves the first caller; the seven that asked meanwhile share the next.
    assert scanner.statistics() == {"passes": 2, "asks": 8, "stuck": 0}


async def test_a_stuck_pass_fails_its_caller_at_its_deadline_and_the_others_get_the_next_pass(
    slots: dict[str, str], held: HeldPass
) -> None:
    scanner = ProcScanner(timeout=1.0, scan=held)
    outcome: dict[str, object] = {}

    async def ask(name: str) -> None:
        try:
            outcome[name] = await scanner.holders([slots[name]])
        except ScanStuck as exc:
            outcome[name] = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(ask, "a1")
        await held.wait_started(1)  # stuck: never let go until the test ends
        await anyio.sleep(0.5)  # "b" asks halfway to the first caller's deadline
        tg.start_soon(ask, "b")
        await held.wait_started(2)  # the first caller's deadline abandoned it; "b" is served anew
        held.go[1].set()
    assert isinstance(outcome["a1"], ScanStuck)
    assert outcome["b"] == []
    assert held.batches == [[(slots["a1"],)], [(slots["b"],)]]
    assert scanner.statistics() == {"passes": 2, "asks": 2, "stuck": 1}


async def test_callers_of_a_pass_stuck_for_good_each_fail_at_their_own_deadline(
    slots: dict[str, str], held: HeldPass
) -> None:
    scanner = ProcScanner(timeout=0.5, scan=held)
    failed: list[str] = []

    async def ask(name: str) -> None:
        with pytest.raises(ScanStuck):
            await scanner.holders([slots[name]])
        failed.append(name)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for name in ("a1", "a10", "b"):
                tg.start_soon(ask, name)
    assert sorted(failed) == ["a1", "a10", "b"]
    assert scanner.statistics()["stuck"] == 3


async def test_an_error_of_a_pass_reaches_every_caller_it_served(slots: dict[str, str]) -> None:
    def broken(asks: Sequence[tuple[Sequence[str], frozenset[int]]]) -> list[list[Holder]]:
        raise OSError("no /proc here")

    scanner = ProcScanner(scan=broken)
    errors: list[str] = []

    async def ask(name: str) -> None:
        with pytest.raises(OSError, match="no /proc here"):
            await scanner.holders([slots[name]])
        errors.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ask, "a1")
        tg.start_soon(ask, "b")
    assert sorted(errors) == ["a1", "b"]


async def test_a_process_that_forked_hundreds_of_children_in_the_slot_is_stopped_with_all_of_them(
    spawn: Spawn, slots: dict[str, str], workdir: Path
) -> None:
    ready = workdir / "forked"
    parent = spawn(
        ["sh", "-c", f'for i in $(seq 200); do sleep 60 & done; : > "{ready}"; wait'], cwd=slots["a1"]
    )
    wait_for(ready.exists, 20, what="the children")
    scanner = ProcScanner()
    with anyio.fail_after(60):
        stop, other = await scanner.stop([slots["a1"]], 2.0), await scanner.holders([slots["a10"]])
    assert parent.pid in pids(stop.stopped) and len(stop.stopped) >= 201
    assert stop.left == [] and other == []
    assert await scanner.holders([slots["a1"]]) == []


# --- in the daemon ------------------------------------------------------------------------------


def test_released_slots_are_looked_at_before_and_after_their_reset_and_status_counts_the_passes(
    necrod: Necrod,
) -> None:
    with necrod.client() as c:
        leases = [c.allocate("repo") for _ in range(2)]
        for lease in leases:
            c.release(lease["lease_id"])
        wait_for(lambda: c.status()["pools"]["repo"]["slots"].get("available") == 2, 60, what="the resets")
        procs = c.status()["procs"]
    # Each reset asks twice (leftovers before it, processes started meanwhile after it).
    assert procs["asks"] >= 4 and 1 <= procs["passes"] <= procs["asks"] and procs["stuck"] == 0


def test_kernel_path_resolves_the_daemons_directory_and_follows_nothing_below_it(workdir: Path) -> None:
    """A worktree's git directory is under the mirror, which an agent in a worktree pool can
    write: a symlink planted there is not followed (not on the event loop, not into a FUSE
    mount); the pool's own directory above it is resolved."""
    real = workdir / "real"
    (real / "mirror.git").mkdir(parents=True)
    root = workdir / "pool-link"
    root.symlink_to(real)
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    (real / "mirror.git" / "worktrees").symlink_to(elsewhere)
    resolved = real.resolve()
    admin = root / "mirror.git" / "worktrees" / "a1"
    assert kernel_path(str(admin), str(root)) == str(resolved / "mirror.git" / "worktrees" / "a1")
    assert kernel_path(str(root / "slots" / "1"), str(root)) == str(resolved / "slots" / "1")
    # By default only the directory just above is trusted, and resolved.
    assert kernel_path(str(root / "slots" / "1")) == str(resolved / "slots" / "1")
    # A path that is not below the trusted directory falls back to that.
    assert kernel_path(str(elsewhere / "x"), str(root)) == str(elsewhere.resolve() / "x")
