"""Issue 16 #4: nothing a lease or a task left running in a slot writes into the next holder's
checkout.

Each test leaves a process writing into its slot, every 50 ms, the way a careless or hostile
agent would: a background loop, a ``setsid nohup`` job holding a file open from elsewhere, one
working in a subdirectory, one holding only a memory mapping, a thread with a working directory
of its own, one ignoring SIGTERM, a dispatched task's ``setsid`` child. The lease then ends
(release, expiry, the task's end) and the next lease, on the same slot (the pool has one),
finds a clean checkout that stays clean, and none of those processes is left. What cannot be
stopped (a process frozen in the kernel, processes that something outside the slot keeps
starting, also while the slot is being reset, a task's child frozen in its cgroup) leaves the
slot isolated in ``error``, never handed out, until ``necroctl recover``.

Every process a test starts records its pid outside the slot and is killed at the end,
whatever happened.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from necrod.client import Client
from necrod.daemon.fleet import origin_id
from necrod.io.cgroups import RUNNERS, V2_HYBRID, V2_ROOT
from necrod.proto.errors import ResourceExhausted
from tests.helpers import Necrod, git, wait_for
from tests.reliability.conftest import FIGURES, alive, daemon_config, slots_by_id, workspaces_of

pytestmark = pytest.mark.reliability

#: How long the next holder watches its checkout for late writes (each leftover writes every 50 ms).
WATCH_S = 0.6
FREEZER = Path("/sys/fs/cgroup/freezer")


class Leftovers:
    """The processes a test leaves behind: each appends its pid to ``pidfile`` (outside any
    slot); ``kill_all`` ends every one of them, frozen ones included."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.pidfile = directory / "pids"
        self.pidfile.touch()
        self.popens: list[subprocess.Popen[bytes]] = []
        self.freezer: Path | None = None

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "PIDS": str(self.pidfile), **extra}

    def start(self, argv: list[str], cwd: str | Path, **env: str) -> None:
        self.popens.append(
            subprocess.Popen(argv, cwd=cwd, env=self.env(**env), start_new_session=True,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )  # fmt: skip

    def shell(self, script: str, cwd: str | Path, **env: str) -> None:
        self.start(["sh", "-c", script], cwd, **env)

    def pids(self) -> set[int]:
        return {int(p) for p in self.pidfile.read_text().split()} | {p.pid for p in self.popens}

    def running(self) -> list[int]:
        return sorted(p for p in self.pids() if alive(p))

    def wait_started(self, count: int = 1) -> None:
        wait_for(lambda: len(self.pidfile.read_text().split()) >= count, 10, what="the leftover process")

    def freeze(self, pid: int) -> None:
        """Freeze ``pid`` with the cgroup v1 freezer: SIGKILL then waits until it is thawed."""
        self.freezer = FREEZER / f"necrod-test-{os.getpid()}-{pid}"
        self.freezer.mkdir()
        (self.freezer / "cgroup.procs").write_text(str(pid))
        (self.freezer / "freezer.state").write_text("FROZEN")
        wait_for(lambda: self.freezer and (self.freezer / "freezer.state").read_text().strip() == "FROZEN",
                 10, what="the process to be frozen")  # fmt: skip

    def thaw(self) -> None:
        if self.freezer is not None and self.freezer.exists():
            (self.freezer / "freezer.state").write_text("THAWED")

    def kill_all(self) -> None:
        self.thaw()
        for _ in range(3):
            for pid in self.running():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        for p in self.popens:
            p.kill()
            p.wait(10)
        if self.freezer is not None:
            wait_for(lambda: not self.running(), 10, what="the thawed processes to die")
            self.freezer.rmdir()
            self.freezer = None


@pytest.fixture
def leftovers(workdir: Path) -> Iterator[Leftovers]:
    left = Leftovers(workdir)
    try:
        yield left
    finally:
        FIGURES["leftover processes started in slots"] += len(left.pids())
        left.kill_all()


@pytest.fixture
def one_slot(necrod_factory: Callable[..., Necrod], origin: Path) -> Necrod:
    """A pool of one slot: the next lease is always on the slot the last one left."""
    return necrod_factory(daemon_config({"repo": origin}, slots=1, max_slots=1, min_idle=0))


def assert_clean_for(c: Client, path: str) -> None:
    """The checkout holds nothing of the last lease, and nothing arrives while we watch."""
    deadline = time.monotonic() + WATCH_S
    while True:
        status = git(
            path, "--no-optional-locks", "status", "--porcelain", "--ignored", "--untracked-files=all"
        )
        assert status == "", f"the next holder's checkout was written to:\n{status}"
        if time.monotonic() > deadline:
            return
        time.sleep(0.1)


def next_lease(d: Necrod, c: Client, previous: dict[str, Any], left: Leftovers) -> dict[str, Any]:
    lease = c.allocate("repo", wait_s=30)
    assert lease["slot_id"] == previous["slot_id"]
    assert_clean_for(c, lease["path"])
    assert left.running() == [], "a leftover process is still running"
    stopped = [e for e in d.log_events() if e.get("event") == "slot_processes_stopped"]
    assert stopped and stopped[-1]["slot"] == previous["slot_id"]
    FIGURES["leftover processes stopped before the next lease"] += stopped[-1]["count"]
    return lease


def wait_writing(path: str | Path, name: str) -> None:
    wait_for(lambda: (Path(path) / name).exists(), 10, what=f"the leftover process to write {name}")


# --- a lease's leftovers, by how they hold the slot -----------------------------------------


LOOP = 'echo $$ >> "$PIDS"; while :; do echo x >> {name}; sleep 0.05; done'


@pytest.mark.usefixtures("slot_kind")
def test_a_background_loop_in_the_slot_is_stopped_at_release(one_slot: Necrod, leftovers: Leftovers) -> None:
    with one_slot.client() as c:
        lease = c.allocate("repo")
        leftovers.shell(LOOP.format(name="leftover.txt"), lease["path"])
        wait_writing(lease["path"], "leftover.txt")
        c.release(lease["lease_id"])
        next_lease(one_slot, c, lease, leftovers)
        # The writes it made before it was stopped are the lease's: salvaged, not lost.
        assert "leftover.txt" in [f["path"] for f in c.salvage_show(lease["lease_id"])["files"]]


def test_a_loop_in_a_subdirectory_is_stopped_at_lease_expiry(one_slot: Necrod, leftovers: Leftovers) -> None:
    with one_slot.client() as c:
        lease = c.allocate("repo", ttl_s=1)  # never heartbeated
        leftovers.shell(LOOP.format(name="../../from-subdir.txt"), Path(lease["path"], "pkg0", "sub0"))
        wait_writing(lease["path"], "from-subdir.txt")
        next_lease(one_slot, c, lease, leftovers)


@pytest.mark.usefixtures("slot_kind")
def test_a_setsid_nohup_job_holding_a_file_open_from_elsewhere_is_stopped(
    one_slot: Necrod, leftovers: Leftovers
) -> None:
    script = ('echo $$ >> "$PIDS"; exec 3>> "$SLOT/held.log"; '
              'while :; do echo x >&3; echo x >> "$SLOT/by-path.txt"; sleep 0.05; done')  # fmt: skip
    with one_slot.client() as c:
        lease = c.allocate("repo")
        leftovers.start(["setsid", "nohup", "sh", "-c", script], "/", SLOT=lease["path"])
        wait_writing(lease["path"], "by-path.txt")
        c.release(lease["lease_id"])
        next_lease(one_slot, c, lease, leftovers)


MAPPED = r"""
import ctypes, mmap, os, time
slot = os.environ["SLOT"]
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
fd = os.open(os.path.join(slot, "mapped.bin"), os.O_RDWR | os.O_CREAT, 0o644)
os.ftruncate(fd, 4096)
addr = libc.mmap(None, 4096, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
os.close(fd)  # from here on only the mapping ties it to the slot
os.chdir("/")
with open(os.environ["PIDS"], "a") as f:
    f.write(f"{os.getpid()}\n")
page = (ctypes.c_char * 4096).from_address(addr)
n = 0
while True:
    n += 1
    page[0:8] = b"%08d" % (n % 10**8)
    with open(os.path.join(slot, "via-mapping.txt"), "a") as out:
        out.write("x\n")
    time.sleep(0.05)
"""


def test_a_process_holding_only_a_memory_mapping_is_stopped(one_slot: Necrod, leftovers: Leftovers) -> None:
    with one_slot.client() as c:
        lease = c.allocate("repo")
        leftovers.start([sys.executable, "-c", MAPPED], "/", SLOT=lease["path"])
        wait_writing(lease["path"], "via-mapping.txt")
        c.release(lease["lease_id"])
        next_lease(one_slot, c, lease, leftovers)


THREAD_CWD = r"""
import ctypes, os, threading, time
CLONE_FS = 0x200
libc = ctypes.CDLL(None, use_errno=True)
with open(os.environ["PIDS"], "a") as f:
    f.write(f"{os.getpid()}\n")
def work():
    assert libc.unshare(CLONE_FS) == 0, ctypes.get_errno()
    os.chdir(os.environ["SLOT"])  # this thread's own working directory; the process's stays /
    while True:
        with open("from-thread.txt", "a") as out:
            out.write("x\n")
        time.sleep(0.05)
threading.Thread(target=work, daemon=True).start()
while True:
    time.sleep(1)
"""


def test_a_thread_with_a_working_directory_of_its_own_is_seen(one_slot: Necrod, leftovers: Leftovers) -> None:
    with one_slot.client() as c:
        lease = c.allocate("repo")
        leftovers.start([sys.executable, "-c", THREAD_CWD], "/", SLOT=lease["path"])
        wait_writing(lease["path"], "from-thread.txt")
        c.release(lease["lease_id"])
        next_lease(one_slot, c, lease, leftovers)


def test_a_loop_ignoring_sigterm_is_killed_after_the_grace(one_slot: Necrod, leftovers: Leftovers) -> None:
    with one_slot.client() as c:
        lease = c.allocate("repo")
        leftovers.shell("trap '' TERM; " + LOOP.format(name="stubborn.txt"), lease["path"])
        wait_writing(lease["path"], "stubborn.txt")
        c.release(lease["lease_id"])
        next_lease(one_slot, c, lease, leftovers)


# --- what cannot be stopped: the slot is isolated, never handed out -----------------------------


def assert_isolated(d: Necrod, c: Client, slot_id: str, why: str) -> dict[str, Any]:
    slot = wait_for(lambda: (s := slots_by_id(d)[slot_id])["state"] not in ("allocated", "cleaning") and s,
                    40, what="the slot to be isolated")  # fmt: skip
    assert slot["state"] == "error" and why in slot["error"], slot
    with pytest.raises(ResourceExhausted):
        c.allocate("repo", wait_s=2)  # never handed out, and (max_slots 1) not replaced
    assert any(slot_id in r for r in c.status()["degraded"])
    FIGURES["slots isolated with processes that would not stop"] += 1
    return slot  # type: ignore[no-any-return]


def recover_clean(d: Necrod, c: Client, slot_id: str, left: Leftovers) -> None:
    left.kill_all()
    assert c.recover(slot_id)["state"] == "available"
    lease = c.allocate("repo")
    assert lease["slot_id"] == slot_id
    assert_clean_for(c, lease["path"])


def test_a_process_that_cannot_be_killed_leaves_the_slot_isolated(
    one_slot: Necrod, leftovers: Leftovers
) -> None:
    if not (FREEZER / "freezer.state").exists() and not FREEZER.is_dir():
        pytest.skip("needs the cgroup v1 freezer (a frozen process waits out SIGKILL)")
    with one_slot.client() as c:
        lease = c.allocate("repo")
        leftovers.shell(LOOP.format(name="frozen.txt"), lease["path"])
        wait_writing(lease["path"], "frozen.txt")
        leftovers.freeze(leftovers.popens[0].pid)
        c.release(lease["lease_id"])
        slot = assert_isolated(one_slot, c, lease["slot_id"], "would not stop")
        assert f"pid {leftovers.popens[0].pid} " in slot["error"] and "state D" in slot["error"]
        # Untouched: the lease's work is still there, to be salvaged by recover.
        assert Path(lease["path"], "frozen.txt").exists()
        recover_clean(one_slot, c, lease["slot_id"], leftovers)
        assert "frozen.txt" in [f["path"] for f in c.salvage_show(lease["lease_id"])["files"]]


RESPAWNER = """echo $$ >> "$PIDS"
while :; do
    (cd "$SLOT" && exec sh -c 'echo $$ >> "$PIDS"; echo x >> respawned.txt; exec sleep 1') &
    sleep 0.05
done"""


@pytest.mark.usefixtures("slot_kind")  # an overlay's cleanup skips its last look only when unused
def test_a_process_something_outside_keeps_starting_leaves_the_slot_isolated(
    one_slot: Necrod, leftovers: Leftovers
) -> None:
    with one_slot.client() as c:
        lease = c.allocate("repo")
        leftovers.shell(RESPAWNER, "/", SLOT=lease["path"])  # its own directory is not in the slot
        wait_writing(lease["path"], "respawned.txt")
        c.release(lease["lease_id"])
        slot = assert_isolated(one_slot, c, lease["slot_id"], "isolated")
        respawner = leftovers.popens[0].pid
        assert f"parent {respawner})" in slot["error"], slot["error"]
        assert alive(respawner), "what is outside the slot is not necrod's to kill"
        recover_clean(one_slot, c, lease["slot_id"], leftovers)


LATE_STARTER = """echo $$ >> "$PIDS"
while [ ! -e "$REF" ]; do sleep 0.005; done
while :; do
    (cd "$SLOT" && exec sh -c 'echo $$ >> "$PIDS"; exec sleep 2') &
    sleep 0.02
done"""


def test_a_process_started_while_the_slot_is_cleaned_keeps_it_from_being_offered(
    one_slot: Necrod, leftovers: Leftovers
) -> None:
    with one_slot.client() as c:
        lease = c.allocate("repo")
        for i in range(3000):  # a reset with this much to remove takes a while
            Path(lease["path"], f"work-{i}.txt").write_text("the lease's work\n")
        ref = (
            workspaces_of(one_slot)
            / "repo"
            / "mirror.git"
            / "refs"
            / "necrod"
            / "salvage"
            / lease["lease_id"]
        )
        # Nothing runs in the slot when it is stopped; this starts processes there from outside
        # once its work is salvaged, while it is being reset.
        leftovers.shell(LATE_STARTER, "/", SLOT=lease["path"], REF=str(ref))
        c.release(lease["lease_id"])
        slot = assert_isolated(one_slot, c, lease["slot_id"], "started in it while it was cleaned")
        assert f"parent {leftovers.popens[0].pid})" in slot["error"], slot["error"]
        recover_clean(one_slot, c, lease["slot_id"], leftovers)
        assert c.salvage_show(lease["lease_id"])["files"], "the lease's work was salvaged first"


# --- dispatched tasks: a runner's setsid child ----------------------------------------------------


def dispatch_config(origin: Path, launcher: str, command: str, **keys: Any) -> str:
    extra = "".join(f"    {k}: {v}\n" for k, v in keys.items())
    return (
        daemon_config({"repo": origin}, slots=1, max_slots=1, min_idle=0)
        + f"runners:\n  r:\n    launcher: {launcher}\n    command: {json.dumps(command)}\n    grace_s: 1\n{extra}"
    )


def escaping_child(pids: Path, where: str) -> str:
    """A runner that starts a child in a session of its own (out of its process group) that
    keeps writing into the slot, then ends; the child works from ``where``."""
    loop = f'echo $$ >> {pids}; cd {where}; while :; do echo x >> "$NECROD_SLOT_PATH/from-task.txt"; sleep 0.05; done'
    return f"setsid sh -c '{loop}' </dev/null >/dev/null 2>&1 &"


def run_task(
    d: Necrod, c: Client, left: Leftovers, outcome: str, task_id: str | None = None, **submit: Any
) -> dict[str, Any]:
    """Submit a task (unless ``task_id`` names one already submitted) and wait for its end."""
    if task_id is None:
        task_id = c.call("tasks.submit", {"pool": "repo", "runner": "r", "max_retries": 0, **submit})[
            "task_id"
        ]
    done = wait_for(lambda: (t := c.call("tasks.get", {"task_id": task_id}))["state"] not in
                    ("queued", "running") and t, 60, what="the task to end")  # fmt: skip
    assert done["attempts"][-1]["outcome"] == outcome, done["attempts"][-1]
    assert left.pids(), "the runner's child never started"
    return done  # type: ignore[no-any-return]


@pytest.mark.parametrize("launcher", ["process", "tmux"])
def test_a_finished_tasks_setsid_child_is_killed_with_its_cgroup(
    necrod_factory: Callable[..., Necrod], origin: Path, leftovers: Leftovers, launcher: str
) -> None:
    if launcher == "tmux" and shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    # From /, with no file open: only the runner's cgroup still ties the child to the task.
    command = escaping_child(leftovers.pidfile, "/") + " sleep 0.5; exit 0"
    d = necrod_factory(dispatch_config(origin, launcher, command))
    if not d.call("daemon.status")["dispatcher"]["runner_cgroups"]:
        pytest.skip("this machine gives necrod no cgroup v2 for its runners")
    with d.client() as c:
        done = run_task(d, c, leftovers, "succeeded")
        lease = c.allocate("repo", wait_s=30)
        assert lease["slot_id"] == done["attempts"][-1]["slot_id"]
        assert_clean_for(c, lease["path"])
        assert leftovers.running() == [], "the task's detached child is still running"
    FIGURES["dispatched tasks' detached children killed"] += 1


def test_a_timed_out_tasks_setsid_child_in_the_slot_is_stopped(
    necrod_factory: Callable[..., Necrod], origin: Path, leftovers: Leftovers
) -> None:
    command = escaping_child(leftovers.pidfile, '"$NECROD_SLOT_PATH"') + " exec sleep 60"
    d = necrod_factory(dispatch_config(origin, "process", command, timeout_s=1))
    with d.client() as c:
        done = run_task(d, c, leftovers, "timeout")
        lease = c.allocate("repo", wait_s=30)
        assert lease["slot_id"] == done["attempts"][-1]["slot_id"]
        assert_clean_for(c, lease["path"])
        assert leftovers.running() == []
    FIGURES["dispatched tasks' detached children killed"] += 1


@pytest.mark.parametrize(("end", "outcome"), [("exit", "succeeded"), ("lease-expiry", "lease_lost")])
def test_a_tasks_child_that_cannot_be_killed_leaves_the_slot_isolated(
    necrod_factory: Callable[..., Necrod],
    origin: Path,
    leftovers: Leftovers,
    workdir: Path,
    end: str,
    outcome: str,
) -> None:
    if not FREEZER.is_dir():
        pytest.skip("needs the cgroup v1 freezer (a frozen process waits out SIGKILL)")
    go = workdir / "go"
    # It exits once told to; or, never heartbeating, it loses its lease (2 s) and is stopped.
    command = escaping_child(leftovers.pidfile, "/") + f" while [ ! -e {go} ]; do sleep 0.05; done; exit 0"
    d = necrod_factory(dispatch_config(origin, "process", command, lease_ttl_s=2))
    if not d.call("daemon.status")["dispatcher"]["runner_cgroups"]:
        pytest.skip("this machine gives necrod no cgroup v2 for its runners")
    try:
        with d.client() as c:
            task_id = c.call("tasks.submit", {"pool": "repo", "runner": "r", "max_retries": 0})["task_id"]
            leftovers.wait_started()
            leftovers.freeze(min(leftovers.pids()))
            if end == "exit":
                go.touch()
            done = run_task(d, c, leftovers, outcome, task_id=task_id)
            slot_id = done["attempts"][-1]["slot_id"]
            assert_isolated(d, c, slot_id, "would not die")
            recover_clean(d, c, slot_id, leftovers)
    finally:
        leftovers.kill_all()
        instance = origin_id(d.state_dir)
        for root in (V2_ROOT, V2_HYBRID):
            for kept in (root / RUNNERS / instance).glob("*"):
                if kept.is_dir():
                    kept.rmdir()  # kept for inspection while something was left in it; empty now
