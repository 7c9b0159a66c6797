"""Runner cgroups: one per local runner, to hold all its processes, enforce its limits and
measure what it used (DESIGN.md, trap 11).

Limits. ``RLIMIT_AS`` breaks Node, Go and the JVM (they reserve much more address space than
they use), so a runner's memory is capped with a cgroup: cgroup v2 (``memory.max``) where the
daemon's delegated cgroup has the memory controller, else cgroup v1's memory controller
(``memory.limit_in_bytes``). Its CPU (``cpu_limit``) is capped the same way: cgroup v2
``cpu.max``, else cgroup v1 ``cpu.cfs_quota_us``. A limit that no controller here can enforce is
refused, naming the limit and what is missing (``LimitUnenforceable``, worded by
``RunnerCgroups.unenforceable``): a limit that silently does nothing is worse than none. The
daemon looks at what it may use when it starts (``memory_problem`` and ``cpu_problem`` say why
not), so a profile with such a limit is refused at submit and reported (the daemon is
degraded); a runner that gets as far as its start all the same does not start (``start_failed``,
with the same words).

Holding and measuring. Every local runner also gets a cgroup v2 of its own, limits or not (on a
hybrid machine, in the v2 hierarchy at ``/sys/fs/cgroup/unified``): a child that leaves the
runner's process group (``setsid``, a daemonizing helper) stays in it, and ``cgroup.kill`` kills
them all at once, forks in flight included, before the runner's slot is cleaned; the cgroup is
removed then. Its ``cpu.stat`` gives the CPU seconds the runner used (cgroup v1: ``cpuacct``),
its memory cgroup its peak memory: on cgroup v1 every runner gets one, on cgroup v2 a runner has
the memory controller only once a memory limit passed it down (below); without it, the wrapper's
count is used (``runshim``).

Layout, under the cgroup delegated to the daemon (systemd's ``Delegate=yes``)::

    <delegated>/necrod-daemon/            the daemon itself (cgroup v2 allows no process in a
                                          cgroup whose children have controllers)
    <delegated>/necrod-runners/<instance>/<runner>

and on cgroup v1 the same ``necrod-runners/<instance>/<runner>`` under the daemon's memory and
cpu cgroups. ``<instance>`` is the daemon's own name (host and state directory), so two daemons
on one machine never touch each other's runners. A daemon that finds itself already in a
``necrod-daemon`` cgroup (systemd's ``DelegateSubgroup=necrod-daemon``, or a restart after it
moved there) takes its parent as the delegated one.

Controllers on cgroup v2 are only looked at when the daemon starts: one is passed down with the
first runner whose limit needs it (the daemon moving into its leaf first), and given back when
the daemon stops with no runner cgroup left, because a restart under systemd older than 254 puts
the new daemon in the delegated cgroup itself, which the kernel refuses while a controller is
passed down.

Runners outlive the daemon: the systemd unit delegates the cgroup and does not kill it on stop
(``KillMode=process``), and the next daemon finds a runner's cgroups again by its name
(``RunnerCgroup.find``).
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
V1_CPU = Path("/sys/fs/cgroup/cpu")
RUNNERS = "necrod-runners"
#: The daemon's own leaf in its delegated cgroup.
LEAF = "necrod-daemon"
#: The CFS period a CPU quota is stated in (the kernel's default), in microseconds.
CPU_PERIOD_US = 100_000
#: Where cgroup v1 mounts the hierarchy of each controller a limit needs.
_V1_MOUNTS = {"memory": V1_MEMORY, "cpu": V1_CPU}


class LimitUnenforceable(OSError):
    """A runner's ``memory_limit`` or ``cpu_limit`` cannot be enforced here; the message says
    which and why."""


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
    processes), ``memory`` and ``cpu`` (each with its kind, "v2" or "v1", for limits and usage);
    one directory on a pure v2 machine. Any is None where the machine gives us none, and
    ``memory_problem`` / ``cpu_problem`` say why there is no memory / cpu cgroup. The
    directories are made with the first runner (``RunnerCgroup.create``), so a daemon that runs
    none leaves nothing behind."""

    unified: Path | None
    memory: tuple[Path, str] | None
    cpu: tuple[Path, str] | None = None
    memory_problem: str | None = None
    cpu_problem: str | None = None

    def unenforceable(
        self, memory_limit: int | None, cpu_limit: float | None, because: str | None = None
    ) -> str | None:
        """Why a runner with these limits cannot have them enforced here — each limit that
        cannot, with what is missing (``because``, when given, for all of them) — or None."""
        reasons = []
        if memory_limit is not None and (because is not None or self.memory is None):
            why = because or self.memory_problem or "necrod has no memory cgroup"
            reasons.append(f"memory_limit {memory_limit} bytes cannot be enforced here: {why}")
        if cpu_limit is not None and (because is not None or self.cpu is None):
            why = because or self.cpu_problem or "necrod has no cpu cgroup"
            reasons.append(f"cpu_limit {cpu_limit:g} CPUs cannot be enforced here: {why}")
        return "; ".join(reasons) or None

    def tidy(self) -> None:
        """Remove the daemon's own directories when no runner cgroup is left in them (and the
        ``necrod-runners`` above them when no other daemon's are left either). Then, on cgroup
        v2, give the controllers back: a restart puts the new daemon in the delegated cgroup
        itself, which the kernel refuses while it passes controllers down."""
        for path in {p for p in (self.unified, *(c[0] for c in (self.memory, self.cpu) if c)) if p}:
            for directory in (path, path.parent):
                try:
                    directory.rmdir()
                except OSError:
                    break
        v2 = {c: p[0] for c, p in (("memory", self.memory), ("cpu", self.cpu)) if p and p[1] == "v2"}
        if v2:
            delegated = next(iter(v2.values())).parent.parent
            if not (delegated / RUNNERS).exists():
                try:
                    (delegated / "cgroup.subtree_control").write_text(" ".join(f"-{c}" for c in v2))
                except OSError:
                    pass


def runner_cgroups(instance: str) -> RunnerCgroups:
    """This daemon's runner cgroup parents (``instance`` names the daemon)."""
    memory, memory_problem = controller_parent("memory")
    cpu, cpu_problem = controller_parent("cpu")
    v2 = next((p for p in (memory, cpu) if p is not None and p[1] == "v2"), None)
    if v2 is not None:
        unified: Path | None = v2[0] / instance
    else:
        own = _own_cgroup(None)
        root = next((r for r in (V2_ROOT, V2_HYBRID) if (r / "cgroup.controllers").exists()), None)
        unified = (
            root / own.lstrip("/") / RUNNERS / instance if own is not None and root is not None else None
        )
        if unified is not None and not _may_make(unified):
            unified = None
    return RunnerCgroups(unified, (memory[0] / instance, memory[1]) if memory else None,
                         (cpu[0] / instance, cpu[1]) if cpu else None, memory_problem, cpu_problem)  # fmt: skip


def _may_make(path: Path) -> bool:
    """Whether we may create ``path``: its nearest existing ancestor is writable to us."""
    while not path.exists():
        path = path.parent
    return os.access(path, os.W_OK)


def _make_parent(path: Path, v2_controllers: tuple[str, ...] = ()) -> None:
    """Make ``path`` (``<delegated>/necrod-runners/<instance>``); on cgroup v2, pass
    ``v2_controllers`` down to it, first moving the daemon into its leaf."""
    if not v2_controllers:
        path.mkdir(parents=True, exist_ok=True)
        return
    _enable(path.parent.parent, v2_controllers)
    for directory in (path.parent, path):
        directory.mkdir(exist_ok=True)
        control = directory / "cgroup.subtree_control"
        missing = [c for c in v2_controllers if c not in control.read_text().split()]
        if missing:
            control.write_text(" ".join(f"+{c}" for c in missing))


def controller_parent(controller: str, name: str = RUNNERS) -> tuple[tuple[Path, str] | None, str | None]:
    """A directory under which runner cgroups with ``controller`` ("memory" or "cpu") can be
    made, and its kind ("v2" or "v1"); or None and why this machine gives us none."""
    problems = []
    v2 = _own_cgroup(None)
    if v2 is not None and (V2_ROOT / "cgroup.controllers").exists():
        own = V2_ROOT / v2.lstrip("/")
        # Only looked at: the controller is passed down with the first runner that needs it
        # (``_make_parent``), and given back when the daemon stops (``tidy``).
        try:
            if controller not in (own / "cgroup.controllers").read_text(errors="replace").split():
                problems.append(f"cgroup v2: the {controller} controller is not delegated to {own} "
                                "(under systemd: Delegate=yes)")  # fmt: skip
            elif not _may_make(own / name):
                problems.append(f"cgroup v2: cannot make cgroups in {own}: {_not_writable(own)}")
            elif own == V2_ROOT or not all(_ours(pid) for pid in _procs(own)):
                problems.append(f"cgroup v2: {own} holds processes that are not necrod's: not reorganizing it "
                                "(under systemd, Delegate=yes gives necrod a cgroup of its own)")  # fmt: skip
            else:
                return (own / name, "v2"), None
        except OSError as exc:
            problems.append(f"cgroup v2: cannot read {own}: {exc.strerror or exc}")
    v1 = _own_cgroup(controller)
    mount = _V1_MOUNTS[controller]
    if v1 is not None and mount.is_dir():
        parent = mount / v1.lstrip("/") / name
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
        problems.append(f"no cgroup hierarchy with a {controller} controller is mounted")
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


def _enable(own: Path, controllers: tuple[str, ...]) -> None:
    """Enable ``controllers`` for our cgroup's children. cgroup v2 forbids that while
    processes sit in the cgroup itself, so (as systemd documents for delegated subtrees) the
    daemon first moves into a leaf of its own."""
    control = own / "cgroup.subtree_control"
    missing = [c for c in controllers if c not in control.read_text().split()]
    if not missing:
        return
    pids = _procs(own)
    if own == V2_ROOT or not all(_ours(pid) for pid in pids):
        raise PermissionError(f"{own} is not a cgroup of ours alone; not reorganizing it")
    leaf = own / LEAF
    leaf.mkdir(exist_ok=True)
    for pid in pids:
        (leaf / "cgroup.procs").write_text(str(pid))
    control.write_text(" ".join(f"+{c}" for c in missing))


def _ours(pid: int) -> bool:
    """Whether process ``pid`` is necrod's: the daemon or one of its descendants, or the wrapper
    (``runshim``) of a runner an earlier daemon started, which outlives it where it stood."""
    if _descends_from_us(pid):
        return True
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes()[:4096].split(b"\0")
    except OSError:
        return True  # gone already
    return is_runshim(argv)


def is_runshim(argv: list[bytes]) -> bool:
    """Whether a command line is a runner's wrapper: ``perl .../necrod/io/runshim.pl``, or
    ``python -I -S .../necrod/io/runshim.py`` (``python -m necrod.io.runshim`` before issue 22)."""
    return (
        argv[1:3] == [b"-m", b"necrod.io.runshim"]
        or (argv[1:3] == [b"-I", b"-S"] and len(argv) > 3 and argv[3].endswith(b"/necrod/io/runshim.py"))
        or (len(argv) > 1 and argv[0].endswith(b"/perl") and argv[1].endswith(b"/necrod/io/runshim.pl"))
    )


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
        """The cgroups of a new runner: the v2 one wherever there is a parent for it; the memory
        one with a memory limit, and on cgroup v1 for every runner (its peak memory); the CPU
        one with a CPU limit. None when there is none. Raises ``LimitUnenforceable``, before it
        makes anything, for a limit no controller here enforces."""
        why = parents.unenforceable(limit, cpu_limit)
        if why is not None:
            raise LimitUnenforceable(why)
        # On cgroup v2, only the controllers this runner's limits need are passed down.
        v2 = tuple(c for c, p, wanted in (("memory", parents.memory, limit), ("cpu", parents.cpu, cpu_limit))
                   if wanted is not None and p is not None and p[1] == "v2")  # fmt: skip
        memory = kind = cpu = cpu_kind = unified = None
        if parents.memory is not None and (limit is not None or parents.memory[1] == "v1"):
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
        if parents.cpu is not None and cpu_limit is not None:
            _make_parent(parents.cpu[0], v2)
            cpu, cpu_kind = parents.cpu[0] / name, parents.cpu[1]
            cpu.mkdir(exist_ok=True)
            quota = max(1000, round(cpu_limit * CPU_PERIOD_US))
            if cpu_kind == "v2":
                (cpu / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
            else:
                (cpu / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
                (cpu / "cpu.cfs_quota_us").write_text(str(quota))
        if parents.unified is not None:
            _make_parent(parents.unified)
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
        """The most memory its processes held at once, in bytes (None when unknown: on cgroup
        v2, a runner without a memory limit has the controller only while another's limit
        passed it down)."""
        if self.memory is None:
            return _read_int(self.unified / "memory.peak") if self.unified is not None else None
        return _read_int(self.memory / ("memory.peak" if self.kind == "v2" else "memory.max_usage_in_bytes"))
