"""Runner cgroups: memory limits (DESIGN.md, trap 11), and a cgroup per runner to kill whole.

``RLIMIT_AS`` breaks Node, Go and the JVM (they reserve much more address space than they
use), so a runner's memory is capped with a cgroup: cgroup v2 (``memory.max``) where the
daemon's cgroup lets it create children with the memory controller, else cgroup v1's memory
controller (``memory.limit_in_bytes``). Where neither can be made, a runner with a memory limit
is refused, with the reason (``LimitNotEnforced``): a limit that silently does nothing is worse
than none.

Every local runner also gets a cgroup v2 of its own, memory limit or not (on a hybrid machine,
in the v2 hierarchy at ``/sys/fs/cgroup/unified``): a child that leaves the runner's process
group (``setsid``, a daemonizing helper) stays in it, and ``cgroup.kill`` kills them all at once,
forks in flight included, before the runner's slot is cleaned; the cgroup is removed then.

Layout, under the cgroup delegated to the daemon (systemd's ``Delegate=yes``)::

    <delegated>/necrod-daemon/            the daemon itself (cgroup v2 allows no process in a
                                          cgroup whose children have controllers)
    <delegated>/necrod-runners/<instance>/<runner>

``<instance>`` is the daemon's own name (host and state directory), so two daemons on one
machine never touch each other's runners. A daemon that finds itself already in a
``necrod-daemon`` cgroup (systemd's ``DelegateSubgroup=necrod-daemon``, or a restart after it
moved there) takes its parent as the delegated one.
"""

from __future__ import annotations

import errno
import os
import signal
from dataclasses import dataclass
from pathlib import Path

V2_ROOT = Path("/sys/fs/cgroup")
#: Where a hybrid machine (cgroup v1 controllers) mounts the v2 hierarchy.
V2_HYBRID = Path("/sys/fs/cgroup/unified")
V1_MEMORY = Path("/sys/fs/cgroup/memory")
RUNNERS = "necrod-runners"
#: The daemon's own leaf in its delegated cgroup.
LEAF = "necrod-daemon"


class LimitNotEnforced(OSError):
    """A runner's memory limit cannot be enforced here; the message says why."""


def _own_cgroup(controller: str | None) -> str | None:
    """The daemon's delegated cgroup in a hierarchy (cgroup v2 when ``controller`` is None): its
    own, or the parent of its ``necrod-daemon`` leaf."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if (controller is None and controllers == "") or (
            controller is not None and controller in controllers.split(",")
        ):
            parent, _, name = path.rpartition("/")
            return (parent or "/") if name == LEAF else path
    return None


@dataclass(frozen=True, slots=True)
class RunnerCgroups:
    """Where this daemon makes runner cgroups: ``unified`` (cgroup v2, holding all of a runner's
    processes) and ``memory`` (with its kind, for memory limits); one directory on a pure v2
    machine. Either is None where the machine gives us none, and ``memory_problem`` says why
    there is no memory cgroup. The directories are made with the first runner
    (``RunnerCgroup.create``), so a daemon that runs none leaves nothing behind."""

    unified: Path | None
    memory: tuple[Path, str] | None
    memory_problem: str | None = None

    def tidy(self) -> None:
        """Remove the daemon's own directories when no runner cgroup is left in them (and the
        ``necrod-runners`` above them when no other daemon's are left either). Then, on cgroup
        v2, give the memory controller back: a restart puts the new daemon in the delegated
        cgroup itself, which the kernel refuses while it passes controllers down."""
        for path in {p for p in (self.unified, self.memory[0] if self.memory else None) if p}:
            for directory in (path, path.parent):
                try:
                    directory.rmdir()
                except OSError:
                    break
        if self.memory is not None and self.memory[1] == "v2":
            delegated = self.memory[0].parent.parent
            if not (delegated / RUNNERS).exists():
                try:
                    (delegated / "cgroup.subtree_control").write_text("-memory")
                except OSError:
                    pass


def runner_cgroups(instance: str) -> RunnerCgroups:
    """This daemon's runner cgroup parents (``instance`` names the daemon)."""
    memory, problem = memory_parent()
    if memory is not None and memory[1] == "v2":
        return RunnerCgroups(memory[0] / instance, (memory[0] / instance, "v2"))
    own = _own_cgroup(None)
    root = next((r for r in (V2_ROOT, V2_HYBRID) if (r / "cgroup.controllers").exists()), None)
    unified = root / own.lstrip("/") / RUNNERS / instance if own is not None and root is not None else None
    if unified is not None and not _may_make(unified):
        unified = None
    return RunnerCgroups(unified, (memory[0] / instance, memory[1]) if memory else None, problem)


def _may_make(path: Path) -> bool:
    """Whether we may create ``path``: its nearest existing ancestor is writable to us."""
    while not path.exists():
        path = path.parent
    return os.access(path, os.W_OK)


def _make_parent(path: Path, memory_v2: bool) -> None:
    """Make ``path`` (``<delegated>/necrod-runners/<instance>``); with ``memory_v2``, pass the
    memory controller down to it, first moving the daemon into its leaf."""
    if not memory_v2:
        path.mkdir(parents=True, exist_ok=True)
        return
    _enable_memory(path.parent.parent)
    for directory in (path.parent, path):
        directory.mkdir(exist_ok=True)
        control = directory / "cgroup.subtree_control"
        if "memory" not in control.read_text().split():
            control.write_text("+memory")


def memory_parent(name: str = RUNNERS) -> tuple[tuple[Path, str] | None, str | None]:
    """A directory under which runner cgroups with a memory limit can be made, and its kind
    ("v2" or "v1"); or None and why this machine gives us none."""
    problems = []
    v2 = _own_cgroup(None)
    if v2 is not None and (V2_ROOT / "cgroup.controllers").exists():
        own = V2_ROOT / v2.lstrip("/")
        # Only looked at: the controller is passed down with the first runner that needs it
        # (``_make_parent``), and given back when the daemon stops (``tidy``).
        try:
            if "memory" not in (own / "cgroup.controllers").read_text(errors="replace").split():
                problems.append(f"cgroup v2: the memory controller is not delegated to {own} "
                                "(under systemd: Delegate=yes)")  # fmt: skip
            elif not _may_make(own / name):
                problems.append(f"cgroup v2: cannot make cgroups in {own}: {_not_writable(own)}")
            elif own == V2_ROOT or not all(_descends_from_us(pid) for pid in _procs(own)):
                problems.append(f"cgroup v2: {own} holds processes that are not necrod's: not reorganizing it "
                                "(under systemd, Delegate=yes gives necrod a cgroup of its own)")  # fmt: skip
            else:
                return (own / name, "v2"), None
        except OSError as exc:
            problems.append(f"cgroup v2: cannot read {own}: {exc.strerror or exc}")
    v1 = _own_cgroup("memory")
    if v1 is not None and V1_MEMORY.is_dir():
        parent = V1_MEMORY / v1.lstrip("/") / name
        try:
            if not _may_make(parent / "runner"):  # it may be there already, and read-only
                raise OSError(errno.EROFS if _read_only(parent.parent) else errno.EACCES,
                              "Read-only file system" if _read_only(parent.parent) else "Permission denied")  # fmt: skip
            parent.mkdir(exist_ok=True)
            return (parent, "v1"), None
        except OSError as exc:
            problems.append(
                f"cgroup v1: cannot make cgroups in {parent.parent}: {exc.strerror or exc}{_hint(exc)}"
            )
    if not problems:
        problems.append("no cgroup hierarchy with a memory controller is mounted")
    return None, "; ".join(problems)


def _procs(cgroup: Path) -> list[int]:
    return [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]


def _read_only(path: Path) -> bool:
    while not path.exists():
        path = path.parent
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def _not_writable(path: Path) -> str:
    if _read_only(path):
        return "Read-only file system" + _hint(OSError(errno.EROFS, "read-only"))
    return "Permission denied" + _hint(OSError(errno.EACCES, "denied"))


def _hint(exc: OSError) -> str:
    if exc.errno == errno.EROFS:
        return " (under systemd: ProtectControlGroups=yes without ReadWritePaths= for the unit's cgroup)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return " (not delegated to necrod's user: under systemd, Delegate=yes)"
    return ""


def _enable_memory(own: Path) -> None:
    """Enable the memory controller for our cgroup's children. cgroup v2 forbids that while
    processes sit in the cgroup itself, so (as systemd documents for delegated subtrees) the
    daemon first moves into a leaf of its own."""
    control = own / "cgroup.subtree_control"
    if "memory" in control.read_text().split():
        return
    pids = _procs(own)
    if own == V2_ROOT or not all(_descends_from_us(pid) for pid in pids):
        raise PermissionError(f"{own} is not a cgroup of ours alone; not reorganizing it")
    leaf = own / LEAF
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
    """One runner's cgroups: the v2 one that holds all its processes, and the one enforcing its
    memory limit (the same directory on a pure v2 machine). Either may be missing."""

    def __init__(self, unified: Path | None, memory: Path | None = None, kind: str | None = None) -> None:
        self.unified = unified
        self.memory = memory
        self.kind = kind

    @property
    def paths(self) -> list[Path]:
        """The directories a runner joins (``runshim --cgroup``)."""
        return list(dict.fromkeys(p for p in (self.unified, self.memory) if p is not None))

    @classmethod
    def create(cls, parents: RunnerCgroups, name: str, limit: int | None) -> RunnerCgroup | None:
        """The cgroups of a new runner: always the v2 one where there is a parent for it, the
        memory one only with a limit. None when there is neither."""
        unified = memory = kind = None
        if limit is not None and parents.memory is None:
            raise LimitNotEnforced(f"memory_limit {limit} bytes cannot be enforced here: "
                                   f"{parents.memory_problem or 'necrod has no memory cgroup'}")  # fmt: skip
        if limit is not None and parents.memory is not None:
            _make_parent(parents.memory[0], parents.memory[1] == "v2")
            memory, kind = parents.memory[0] / name, parents.memory[1]
            memory.mkdir(exist_ok=True)
            (memory / ("memory.max" if kind == "v2" else "memory.limit_in_bytes")).write_text(str(limit))
            if kind == "v2":
                try:
                    (memory / "memory.swap.max").write_text("0")
                except OSError:
                    pass
        if parents.unified is not None:
            _make_parent(parents.unified, False)
            unified = parents.unified / name
            unified.mkdir(exist_ok=True)
        if unified is None and memory is None:
            return None
        return cls(unified, memory, kind)

    @classmethod
    def find(cls, parents: RunnerCgroups, name: str) -> RunnerCgroup | None:
        """The cgroups of a runner started before a restart, if they are still there."""
        unified = parents.unified / name if parents.unified is not None else None
        memory = parents.memory[0] / name if parents.memory is not None else None
        unified = unified if unified is not None and unified.is_dir() else None
        memory = memory if memory is not None and memory.is_dir() else None
        if unified is None and memory is None:
            return None
        return cls(unified, memory, parents.memory[1] if memory is not None and parents.memory else None)

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
