"""Memory limits for runners with a cgroup of their own (DESIGN.md, trap 11).

``RLIMIT_AS`` breaks Node, Go and the JVM (they reserve much more address space than they
use), so a runner's memory is capped with a cgroup: cgroup v2 (``memory.max``) where the
daemon's cgroup lets it create children with the memory controller, else cgroup v1's memory
controller (``memory.limit_in_bytes``). Where neither is writable, the launcher falls back to
``RLIMIT_DATA`` (what ``runshim`` sets), which counts what a program writes rather than what it
reserves. A runner cgroup also lets us find every process of a runner, even one that left its
process group, to stop it.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

V2_ROOT = Path("/sys/fs/cgroup")
V1_MEMORY = Path("/sys/fs/cgroup/memory")


def _own_cgroup(controller: str | None) -> str | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controller is None and controllers == "":
            return path
        if controller is not None and controller in controllers.split(","):
            return path
    return None


def memory_parent(name: str = "necrod-runners") -> tuple[Path, str] | None:
    """A directory under which runner cgroups with a memory limit can be made, and its kind
    ("v2" or "v1"); None when this machine gives us none."""
    v2 = _own_cgroup(None)
    if v2 is not None and (V2_ROOT / "cgroup.controllers").exists():
        own = V2_ROOT / v2.lstrip("/")
        try:
            if "memory" in (own / "cgroup.controllers").read_text(errors="replace").split():
                _enable_memory(own)
                parent = own / name
                parent.mkdir(exist_ok=True)
                (parent / "cgroup.subtree_control").write_text("+memory")
                return parent, "v2"
        except OSError:
            pass
    v1 = _own_cgroup("memory")
    if v1 is not None and V1_MEMORY.is_dir():
        parent = V1_MEMORY / v1.lstrip("/") / name
        try:
            parent.mkdir(exist_ok=True)
            return parent, "v1"
        except OSError:
            return None
    return None


def _enable_memory(own: Path) -> None:
    """Enable the memory controller for our cgroup's children. cgroup v2 forbids that while
    processes sit in the cgroup itself, so (as systemd documents for delegated subtrees) the
    daemon first moves into a leaf of its own."""
    control = own / "cgroup.subtree_control"
    if "memory" in control.read_text().split():
        return
    pids = [int(p) for p in (own / "cgroup.procs").read_text().split()]
    if own == V2_ROOT or not all(_descends_from_us(pid) for pid in pids):
        raise PermissionError(f"{own} is not a cgroup of ours alone; not reorganizing it")
    leaf = own / "necrod-daemon"
    leaf.mkdir(exist_ok=True)
    for pid in pids:
        (leaf / "cgroup.procs").write_text(str(pid))
    control.write_text("+memory")


def _descends_from_us(pid: int) -> bool:
    me = os.getpid()
    for _ in range(64):
        if pid == me:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return True  # gone already
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        if pid <= 1:
            return False
    return False


class RunnerCgroup:
    """One runner's cgroup, with its memory limit."""

    def __init__(self, path: Path, kind: str) -> None:
        self.path = path
        self.kind = kind

    @classmethod
    def create(cls, parent: Path, kind: str, name: str, limit: int) -> RunnerCgroup:
        path = parent / name
        path.mkdir(exist_ok=True)
        limit_file = "memory.max" if kind == "v2" else "memory.limit_in_bytes"
        (path / limit_file).write_text(str(limit))
        if kind == "v2":
            try:
                (path / "memory.swap.max").write_text("0")
            except OSError:
                pass
        return cls(path, kind)

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def signal_all(self, sig: int) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def remove(self) -> None:
        self.signal_all(signal.SIGKILL)
        try:
            self.path.rmdir()
        except OSError:
            pass

    def oom_killed(self) -> bool:
        """Whether the kernel killed something in it for exceeding the limit."""
        try:
            if self.kind == "v2":
                events = (self.path / "memory.events").read_text()
                return any(
                    line.startswith("oom_kill ") and line.split()[1] != "0" for line in events.splitlines()
                )
            return (self.path / "memory.failcnt").read_text().strip() not in ("", "0")
        except OSError:
            return False
