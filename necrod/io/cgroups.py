"""Runner cgroups: one per local runner, to hold all its processes, enforce its limits and
measure what it used (DESIGN.md, trap 11).

``RLIMIT_AS`` breaks Node, Go and the JVM (they reserve much more address space than they
use), so a runner's memory is capped with a cgroup: cgroup v2 (``memory.max``) where the
daemon's cgroup lets it create children with the memory controller, else cgroup v1's memory
controller (``memory.limit_in_bytes``). Its CPU (``cpu_limit``) is capped the same way:
cgroup v2 ``cpu.max``, else cgroup v1 ``cpu.cfs_quota_us``. A limit that no controller can
enforce here refuses to start the runner (``LimitUnenforceable``): a limit that silently does
nothing is worse than none.

Every local runner also gets a cgroup v2 of its own, limits or not (on a hybrid machine, in
the v2 hierarchy at ``/sys/fs/cgroup/unified``): a child that leaves the runner's process
group (``setsid``, a daemonizing helper) stays in it, and ``cgroup.kill`` kills them all at
once, forks in flight included, before the runner's slot is cleaned. Its ``cpu.stat`` gives
the CPU seconds the runner used, and the memory cgroup (made for every runner where there is
a controller, limit or not) its peak memory.

Runner cgroups live under a directory per daemon instance, so two daemons on one machine never
touch each other's runners, and under the daemon's own cgroup, which the systemd unit delegates
(``Delegate=yes``) and does not kill on stop (``KillMode=process``): runners outlive a daemon
restart in them.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

V2_ROOT = Path("/sys/fs/cgroup")
#: Where a hybrid machine (cgroup v1 controllers) mounts the v2 hierarchy.
V2_HYBRID = Path("/sys/fs/cgroup/unified")
V1_MEMORY = Path("/sys/fs/cgroup/memory")
V1_CPU = Path("/sys/fs/cgroup/cpu")
RUNNERS = "necrod-runners"
#: The CFS period a CPU quota is stated in (the kernel's default), in microseconds.
CPU_PERIOD_US = 100_000


class LimitUnenforceable(OSError):
    """A runner asks for a limit no cgroup controller here can enforce."""


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


@dataclass(frozen=True, slots=True)
class RunnerCgroups:
    """Where this daemon makes runner cgroups: ``unified`` (cgroup v2, holding all of a runner's
    processes), ``memory`` and ``cpu`` (each with its kind, "v2" or "v1", for limits and usage);
    one directory on a pure v2 machine. Any is None where the machine gives us none. They are
    made with the first runner (``RunnerCgroup.create``), so a daemon that runs none leaves
    nothing behind."""

    unified: Path | None
    memory: tuple[Path, str] | None
    cpu: tuple[Path, str] | None = None

    def tidy(self) -> None:
        """Remove the daemon's own directories when no runner cgroup is left in them."""
        for path in {p for p in (self.unified, *(c[0] for c in (self.memory, self.cpu) if c)) if p}:
            try:
                path.rmdir()
            except OSError:
                pass


def runner_cgroups(instance: str) -> RunnerCgroups:
    """This daemon's runner cgroup parents (``instance`` names the daemon)."""
    v2 = _v2_parent()
    if v2 is not None:
        parent, enabled = v2
        base = parent / instance
        return RunnerCgroups(base, (base, "v2") if "memory" in enabled else None,
                             (base, "v2") if "cpu" in enabled else None)  # fmt: skip
    own = _own_cgroup(None)
    root = next((r for r in (V2_ROOT, V2_HYBRID) if (r / "cgroup.controllers").exists()), None)
    unified = root / own.lstrip("/") / RUNNERS / instance if own is not None and root is not None else None
    if unified is not None and not _may_make(unified):
        unified = None
    memory = _v1_parent("memory", V1_MEMORY)
    cpu = _v1_parent("cpu", V1_CPU)
    return RunnerCgroups(unified, (memory / instance, "v1") if memory else None,
                         (cpu / instance, "v1") if cpu else None)  # fmt: skip


def _may_make(path: Path) -> bool:
    """Whether we may create ``path``: its nearest existing ancestor is writable to us."""
    while not path.exists():
        path = path.parent
    return os.access(path, os.W_OK)


def _make_parent(path: Path, v2_controllers: tuple[str, ...]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if v2_controllers:
        control = path / "cgroup.subtree_control"
        missing = [c for c in v2_controllers if c not in control.read_text().split()]
        if missing:
            control.write_text(" ".join(f"+{c}" for c in missing))


def _v2_parent(name: str = RUNNERS) -> tuple[Path, set[str]] | None:
    """On a pure cgroup v2 machine, the directory under which runner cgroups are made, with
    the controllers (memory, cpu) enabled for them; None elsewhere, or when we may not."""
    v2 = _own_cgroup(None)
    if v2 is None or not (V2_ROOT / "cgroup.controllers").exists():
        return None
    own = V2_ROOT / v2.lstrip("/")
    try:
        available = set((own / "cgroup.controllers").read_text(errors="replace").split())
        wanted = tuple(c for c in ("memory", "cpu") if c in available)
        if not wanted:
            return None
        _enable(own, wanted)
        parent = own / name
        _make_parent(parent, wanted)
    except OSError:
        return None
    return parent, set(wanted)


def _v1_parent(controller: str, mount: Path, name: str = RUNNERS) -> Path | None:
    """A directory under which runner cgroups of cgroup v1's ``controller`` can be made; None
    when this machine gives us none."""
    own = _own_cgroup(controller)
    if own is None or not mount.is_dir():
        return None
    parent = mount / own.lstrip("/") / name
    try:
        parent.mkdir(exist_ok=True)
    except OSError:
        return None
    return parent


def memory_parent(name: str = RUNNERS) -> tuple[Path, str] | None:
    """A directory under which runner cgroups with a memory limit can be made, and its kind
    ("v2" or "v1"); None when this machine gives us none."""
    v2 = _v2_parent(name)
    if v2 is not None and "memory" in v2[1]:
        return v2[0], "v2"
    v1 = _v1_parent("memory", V1_MEMORY, name)
    return (v1, "v1") if v1 is not None else None


def _enable(own: Path, controllers: tuple[str, ...]) -> None:
    """Enable ``controllers`` for our cgroup's children. cgroup v2 forbids that while
    processes sit in the cgroup itself, so (as systemd documents for delegated subtrees) the
    daemon first moves into a leaf of its own."""
    control = own / "cgroup.subtree_control"
    missing = [c for c in controllers if c not in control.read_text().split()]
    if not missing:
        return
    pids = [int(p) for p in (own / "cgroup.procs").read_text().split()]
    if own == V2_ROOT or not all(_descends_from_us(pid) for pid in pids):
        raise PermissionError(f"{own} is not a cgroup of ours alone; not reorganizing it")
    leaf = own / "necrod-daemon"
    leaf.mkdir(exist_ok=True)
    for pid in pids:
        (leaf / "cgroup.procs").write_text(str(pid))
    control.write_text(" ".join(f"+{c}" for c in missing))


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


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class RunnerCgroup:
    """One runner's cgroups: the v2 one that holds all its processes, the memory one (its
    limit and peak) and the CPU one (its quota), which are one directory on a pure v2
    machine. Any may be missing."""

    def __init__(self, unified: Path | None, memory: Path | None = None, kind: str | None = None,
                 cpu: Path | None = None, cpu_kind: str | None = None) -> None:  # fmt: skip
        self.unified = unified
        self.memory = memory
        self.kind = kind
        self.cpu = cpu
        self.cpu_kind = cpu_kind

    @property
    def paths(self) -> list[Path]:
        """The directories a runner joins (``runshim --cgroup``)."""
        return list(dict.fromkeys(p for p in (self.unified, self.memory, self.cpu) if p is not None))

    @classmethod
    def create(cls, parents: RunnerCgroups, name: str, limit: int | None,
               cpu_limit: float | None = None) -> RunnerCgroup | None:  # fmt: skip
        """The cgroups of a new runner: the v2 one and the memory one wherever there is a parent
        for them, the CPU one with a CPU limit (or where it is the v2 one). None when there is
        none. Raises ``LimitUnenforceable`` for a limit no controller here enforces."""
        if limit is not None and parents.memory is None:
            raise LimitUnenforceable(
                "memory_limit cannot be enforced here: no memory cgroup controller necrod may use "
                "(cgroup v2 with memory delegated to the daemon, or cgroup v1's memory hierarchy)"
            )
        if cpu_limit is not None and parents.cpu is None:
            raise LimitUnenforceable(
                "cpu_limit cannot be enforced here: no cpu cgroup controller necrod may use "
                "(cgroup v2 with cpu delegated to the daemon, or cgroup v1's cpu hierarchy)"
            )
        v2 = tuple(c for c, p in (("memory", parents.memory), ("cpu", parents.cpu)) if p and p[1] == "v2")
        memory = kind = cpu = cpu_kind = unified = None
        if parents.memory is not None:
            _make_parent(parents.memory[0], v2)
            memory, kind = parents.memory[0] / name, parents.memory[1]
            memory.mkdir(exist_ok=True)
            if limit is not None:
                (memory / ("memory.max" if kind == "v2" else "memory.limit_in_bytes")).write_text(str(limit))
                if kind == "v2":
                    try:
                        (memory / "memory.swap.max").write_text("0")
                    except OSError:
                        pass
        if parents.cpu is not None and (cpu_limit is not None or parents.cpu[1] == "v2"):
            _make_parent(parents.cpu[0], v2)
            cpu, cpu_kind = parents.cpu[0] / name, parents.cpu[1]
            cpu.mkdir(exist_ok=True)
            if cpu_limit is not None:
                quota = max(1000, round(cpu_limit * CPU_PERIOD_US))
                if cpu_kind == "v2":
                    (cpu / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
                else:
                    (cpu / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
                    (cpu / "cpu.cfs_quota_us").write_text(str(quota))
        if parents.unified is not None:
            _make_parent(parents.unified, v2)
            unified = parents.unified / name
            unified.mkdir(exist_ok=True)
        if unified is None and memory is None and cpu is None:
            return None
        return cls(unified, memory, kind, cpu, cpu_kind)

    @classmethod
    def find(cls, parents: RunnerCgroups, name: str) -> RunnerCgroup | None:
        """The cgroups of a runner started before a restart, if they are still there."""

        def under(parent: Path | None) -> Path | None:
            return parent / name if parent is not None and (parent / name).is_dir() else None

        unified = under(parents.unified)
        memory = under(parents.memory[0] if parents.memory else None)
        cpu = under(parents.cpu[0] if parents.cpu else None)
        if unified is None and memory is None and cpu is None:
            return None
        return cls(unified, memory, parents.memory[1] if memory is not None and parents.memory else None,
                   cpu, parents.cpu[1] if cpu is not None and parents.cpu else None)  # fmt: skip

    def pids(self) -> list[int]:
        """Its processes (0 stands for one in a pid namespace we cannot see)."""
        found: set[int] = set()
        for path in self.paths:
            try:
                found.update(int(p) for p in (path / "cgroup.procs").read_text().split())
            except OSError:
                continue
        return sorted(found)

    def signal_all(self, sig: int) -> None:
        for pid in self.pids():
            if pid <= 0:
                continue
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL everything in it: with ``cgroup.kill`` at once, forks in flight included;
        else (cgroup v1 only, or a kernel before 5.14) one by one."""
        if self.unified is not None:
            try:
                (self.unified / "cgroup.kill").write_text("1")
                return
            except OSError:
                pass
        self.signal_all(signal.SIGKILL)

    def empty(self) -> bool:
        """No process is left in it (a zombie does not count: it can no longer write)."""
        if self.unified is not None:
            try:
                return "populated 0" in (self.unified / "cgroup.events").read_text().splitlines()
            except OSError:
                pass
        return not self.pids()

    def remove(self) -> None:
        """Remove the (empty) cgroups; one still holding a process stays."""
        for path in self.paths:
            try:
                path.rmdir()
            except OSError:
                pass

    def oom_killed(self) -> bool:
        """Whether the kernel killed something in it for exceeding the limit."""
        if self.memory is None:
            return False
        try:
            if self.kind == "v2":
                events = (self.memory / "memory.events").read_text()
                return any(
                    line.startswith("oom_kill ") and line.split()[1] != "0" for line in events.splitlines()
                )
            return (self.memory / "memory.failcnt").read_text().strip() not in ("", "0")
        except OSError:
            return False

    def cpu_seconds(self) -> float | None:
        """CPU time its processes used, in seconds (None when no cgroup here counts it)."""
        if self.unified is not None:
            try:
                for line in (self.unified / "cpu.stat").read_text().splitlines():
                    if line.startswith("usage_usec "):
                        return int(line.split()[1]) / 1e6
            except (OSError, ValueError):
                pass
        if self.cpu is not None and self.cpu_kind == "v1":
            ns = _read_int(self.cpu / "cpuacct.usage")
            return ns / 1e9 if ns is not None else None
        return None

    def peak_memory(self) -> int | None:
        """The most memory its processes held at once, in bytes (None when unknown)."""
        if self.memory is None:
            return None
        return _read_int(self.memory / ("memory.peak" if self.kind == "v2" else "memory.max_usage_in_bytes"))
