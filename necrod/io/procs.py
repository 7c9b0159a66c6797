"""Which processes work inside a directory, read from /proc (Linux), and stopping them.

A process works in a slot when the working directory or root of one of its threads, one of its
open files or one of its memory-mapped files is in it, or when its working directory is the
slot itself seen from another mount namespace (a container with the slot mounted as its
workdir). All of it is learnt from the kernel's own /proc entries with ``readlink`` and
``stat``: the kernel names each file, nothing in the slot is opened or followed.

Resource handling: a scan reads every process's /proc entries, and reading another process's
memory maps waits on its memory lock, which a process stuck in the kernel may hold for as long
as it likes. So scans run in worker threads of their own (at most ``SCAN_THREADS``), each with a
deadline; a scan past it is abandoned (its thread ends when the kernel lets it) and reported as
``ScanStuck``, never waited for on the event loop. One pass answers many askers at once
(``holders_of``; ``procscan.py`` gathers them): a process is read once, the cheap entries
first, its maps only while an asker has not seen it yet, and only parsed when they could name
one of the directories.

Error handling: a process that exits while it is being read is simply gone. One whose entries
cannot be read (another user's, when necrod is not root) cannot be seen at all; see
docs/reliability.md for what that leaves open.
"""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import anyio

#: Worker threads scanning /proc at once: a stuck scan must not take the daemon's shared ones.
SCAN_THREADS = 2
#: A scan of a few hundred processes takes milliseconds; one this slow is stuck in the kernel.
SCAN_TIMEOUT_S = 20.0
#: How often a stop looks whether what it signalled is gone.
POLL_S = 0.05
#: After SIGKILL a process is gone within milliseconds unless the kernel holds it (D state).
KILL_WAIT_S = 1.0
#: SIGKILL rounds before giving up: each one also catches processes started since the last.
KILL_ROUNDS = 3
#: Largest /proc/<pid>/maps read (a process with that many mappings is read in part).
MAPS_CAP = 8 << 20

#: The ``flags`` bit of /proc/<pid>/stat that marks a kernel thread (most of /proc, skipped).
_PF_KTHREAD = 0x00200000

_scan_threads = anyio.CapacityLimiter(SCAN_THREADS)
T = TypeVar("T")


class ScanStuck(Exception):
    """A scan of /proc did not finish within its deadline."""

    def __init__(self, timeout: float) -> None:
        super().__init__(f"reading /proc took longer than {timeout:g}s (a process is stuck in the kernel)")


@dataclass(frozen=True, slots=True)
class Holder:
    """A process working in a directory, and how it was seen to."""

    pid: int
    ppid: int
    name: str
    #: The one-letter state from /proc/<pid>/stat: D cannot be killed until the kernel lets go.
    state: str
    #: "cwd", "root", "thread <tid> cwd", "open file", "mapped file", "cwd in another mount namespace".
    via: str
    path: str

    def describe(self) -> str:
        return f"pid {self.pid} ({self.name}, state {self.state}, parent {self.ppid}): {self.via} {self.path[:160]}"


@dataclass(frozen=True, slots=True)
class Stop:
    """What a stop found: every process signalled, and those still there at the end."""

    stopped: list[Holder]
    left: list[Holder]


@functools.lru_cache(maxsize=1024)
def _resolved(directory: str) -> str:
    return os.path.realpath(directory)


def kernel_path(path: str, trusted: str | None = None) -> str:
    """``path`` as /proc names it. ``trusted``, a directory of the daemon's above it (by default
    the one just above it), is resolved, once: a pool's directories do not move while the
    daemon runs. What lies below it is joined as it is, never followed: it may be the agent's
    (a worktree's git directory is under the mirror, which an agent in such a pool can write),
    and a symlink planted there must not be followed, on the event loop, into a FUSE mount."""
    path = os.path.normpath(path)
    head = os.path.normpath(trusted) if trusted else os.path.dirname(path)
    rel = os.path.relpath(path, head)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        head, rel = os.path.dirname(path), os.path.basename(path)
    return os.path.normpath(os.path.join(_resolved(head), rel))


def processes_in(directory: str) -> list[int]:
    """Pids whose working directory is ``directory`` or below it."""
    prefix = directory.rstrip("/") + "/"
    found: list[int] = []
    for pid in _pids():
        cwd = _readlink(f"/proc/{pid}/cwd")
        if cwd is not None and (cwd == directory or cwd.startswith(prefix)):
            found.append(pid)
    return found


def holders(directories: Sequence[str], skip: Iterable[int] = ()) -> list[Holder]:
    """Processes working in any of ``directories`` (absolute paths as the kernel names them).
    Blocking: call it in a scan thread (``procscan.ProcScanner`` shares one pass among askers)."""
    return holders_of([(directories, frozenset(skip))])[0]


def holders_of(asks: Sequence[tuple[Sequence[str], frozenset[int]]]) -> list[list[Holder]]:
    """One pass over every process answering several askers: for each ``(directories, skip)``,
    the processes working in its directories, less the pids of its ``skip``. A process is read
    once whoever asks; each asker gets how the process was seen in its own directories.
    Blocking: call it in a scan thread."""
    targets = _Targets([dirs for dirs, _ in asks])
    answers: list[list[Holder]] = [[] for _ in asks]
    own = os.getpid()
    for pid in _pids():
        if pid == own:
            continue
        seen = _process(pid, targets)
        if seen is None:
            continue
        (name, state, ppid), found = seen
        for i, (via, path) in found.items():
            if pid not in asks[i][1]:
                answers[i].append(Holder(pid, ppid, name, state, via, path))
    return answers


async def in_scan_thread(func: Callable[..., T], *args: object) -> T:
    """``func`` in a scan thread, without a deadline: the caller keeps its own (a cancelled
    call returns at once and leaves the thread to end when the kernel lets it)."""
    return await anyio.to_thread.run_sync(func, *args, abandon_on_cancel=True, limiter=_scan_threads)


async def scan_off_loop(func: Callable[..., T], *args: object) -> T:
    """Another reader of every process's /proc entries (``cmdline`` waits on a process's memory
    lock too), run the same way: a scan thread, a deadline, ``ScanStuck``."""
    with anyio.move_on_after(SCAN_TIMEOUT_S):
        return await in_scan_thread(func, *args)
    raise ScanStuck(SCAN_TIMEOUT_S)


def signal_holders(found: Iterable[Holder], directories: Sequence[str], sig: int) -> list[Holder]:
    """Send ``sig`` to each process of ``found`` that still works in ``directories``; return
    those that may not be signalled. Each is checked again through a pidfd, so a pid reused by
    another process since the scan is never signalled."""
    targets = _Targets([directories])
    refused = []
    for h in found:
        try:
            pidfd = os.pidfd_open(h.pid)
        except OSError:
            continue  # gone
        try:
            seen = _process(h.pid, targets)
            if seen is not None and seen[1]:
                signal.pidfd_send_signal(pidfd, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            refused.append(h)
        finally:
            os.close(pidfd)
    return refused


# --- reading /proc --------------------------------------------------------------------------


def _pids() -> list[int]:
    try:
        return [int(e) for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []


def _readlink(path: str, dir_fd: int | None = None) -> str | None:
    try:
        return os.readlink(path, dir_fd=dir_fd)
    except OSError:
        return None


class _Targets:
    """The directories of every asker of one pass, each mapped to the askers it is one of."""

    def __init__(self, dir_sets: Sequence[Sequence[str]]) -> None:
        self.count = len(dir_sets)
        self.owners: dict[str, set[int]] = {}
        for i, dirs in enumerate(dir_sets):
            for d in dirs:
                self.owners.setdefault(d.rstrip("/"), set()).add(i)
        #: Every path inside a directory starts with it: a cheap test that rejects most.
        self.heads = tuple(self.owners)
        #: ... and its parent's name is somewhere in a line of the maps that names it.
        self.needles = tuple({os.fsencode(os.path.dirname(d)) for d in self.owners})
        #: (device, inode) of each directory, to know it from another mount namespace.
        self.identities: dict[tuple[int, int], set[int]] = {}
        for d, askers in self.owners.items():
            try:
                st = os.lstat(d)
            except OSError:
                continue
            self.identities.setdefault((st.st_dev, st.st_ino), set()).update(askers)

    def askers_of(self, path: str) -> set[int] | None:
        """The askers with a directory that is ``path`` or holds it, matching whole components
        (``/slots/a1`` does not hold ``/slots/a10``); None when there are none."""
        if not path.startswith(self.heads):
            return None
        found: set[int] | None = None
        # A deleted directory reads as "<path> (deleted)"; files below it keep their prefix.
        candidates = [path, path.removesuffix(" (deleted)")] if path.endswith(" (deleted)") else [path]
        at = path.rfind("/")
        while at >= 0:
            candidates.append(path[:at])
            at = path.rfind("/", 0, at)
        for candidate in candidates:
            askers = self.owners.get(candidate)
            if askers is not None:
                found = askers if found is None else found | askers
        return found


#: How a process is named, and for each asker (by index) how it was seen in its directories.
_Seen = tuple[tuple[str, str, int], dict[int, tuple[str, str]]]
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _process(pid: int, targets: _Targets) -> _Seen | None:
    """Read one process's entries relative to its /proc directory (one lookup of the pid, not
    one per entry). None when it is gone, exited, a kernel thread or cannot be read."""
    try:
        proc = os.open(f"/proc/{pid}", _DIR)
    except OSError:
        return None
    try:
        return _look(proc, proc, f"/proc/{pid}", pid, targets)
    finally:
        os.close(proc)


def _look(proc: int, where: int, base: str, pid: int, targets: _Targets) -> _Seen | None:
    """The process of ``proc`` (its /proc directory), its entries read in ``where`` (named
    ``base``): the same directory, or a live thread's when its first thread has exited."""
    try:
        fd = os.open("stat", os.O_RDONLY | os.O_CLOEXEC, dir_fd=where)
    except OSError:
        return None
    try:
        stat = os.read(fd, 4096)  # one record, far below a page: one read has all of it
    except OSError:
        return None
    finally:
        os.close(fd)
    text = stat.decode("utf-8", "replace")
    name = text[text.find("(") + 1 : text.rfind(")")]
    fields = text[text.rfind(")") + 1 :].split()
    if len(fields) < 18 or int(fields[6]) & _PF_KTHREAD:
        return None  # a kernel thread: no files, no working directory of a slot's
    state, ppid, threads = fields[0], int(fields[1]), int(fields[17])
    if state in ("Z", "X"):
        # Exited; but when only its first thread did (pthread_exit), the others work on, and
        # the process's own fd/ and maps read empty: they are read through a live thread's.
        return _through_live_thread(proc, pid, targets) if where == proc and threads > 1 else None
    found: dict[int, tuple[str, str]] = {}

    def note(path: str, via: str, askers: set[int] | None) -> bool:
        """Record how the askers saw it (the first way each did); True once every asker has."""
        for i in askers or ():
            found.setdefault(i, (via, path))
        return len(found) == targets.count

    # The cheap entries first; the maps only while an asker has not seen it. One whose
    # entries may not be read (another user's) is not read further: none of them may be.
    seen = _threads(proc, where, pid, threads, targets, note)
    if seen is False and not _moved_in(where, targets, note):
        files = _open_files(where, base, targets, note)
        if files is False and state != "D":  # a D process may hold its memory lock for ever
            _mapped(where, targets, note)
    return (name, state, ppid), found


def _through_live_thread(proc: int, pid: int, targets: _Targets) -> _Seen | None:
    try:
        tids = [t for t in os.listdir(f"/proc/{pid}/task") if t != str(pid)]
    except OSError:
        return None
    for tid in tids:
        try:
            live = os.open(f"task/{tid}", _DIR, dir_fd=proc)
        except OSError:
            continue  # that one ended too
        try:
            seen = _look(proc, live, f"/proc/{pid}/task/{tid}", pid, targets)
        finally:
            os.close(live)
        if seen is not None:
            return seen
    return None


#: Records how a process was seen, by a path, a "via" and the askers whose directories hold the
#: path; True once every asker of the pass has seen it (nothing more to read).
_Note = Callable[[str, str, "set[int] | None"], bool]


def _threads(proc: int, where: int, pid: int, threads: int, targets: _Targets, note: _Note) -> bool | None:
    """Each thread's working directory and root (a thread may have its own). None when they
    may not be read."""
    if threads == 1:
        # One thread: its working directory and root are the process's; no need to list task/.
        for link in ("cwd", "root"):
            try:
                target = os.readlink(link, dir_fd=where)
            except PermissionError:
                return None
            except OSError:
                continue
            if note(target, link, targets.askers_of(target)):
                return True
        return False
    # Names listed by path (listing through a descriptor costs a dup, two fcntl and a seek),
    # read through ``proc``: a pid reused meanwhile is not read as this process.
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        tids = [str(pid)]
    for tid in tids:
        for link in ("cwd", "root"):
            try:
                path = os.readlink(f"task/{tid}/{link}", dir_fd=proc)
            except PermissionError:
                return None  # neither may any other thread's (nor its files, nor its maps)
            except OSError:
                continue  # that thread is gone
            via = link if tid == str(pid) else f"thread {tid} {link}"
            if note(path, via, targets.askers_of(path)):
                return True
    return False


def _moved_in(where: int, targets: _Targets, note: _Note) -> bool:
    """A working directory that is one of the directories seen from another mount namespace
    (the path it reads as is not ours)."""
    if not targets.identities:
        return False
    try:
        st = os.stat("cwd", dir_fd=where)
    except OSError:
        return False
    askers = targets.identities.get((st.st_dev, st.st_ino))
    return bool(askers) and note(_readlink("cwd", where) or "?", "cwd in another mount namespace", askers)


def _open_files(where: int, base: str, targets: _Targets, note: _Note) -> bool | None:
    """Files it holds open; None when they may not be read (nor may its maps)."""
    try:
        fds = os.listdir(f"{base}/fd")
    except PermissionError:
        return None
    except OSError:
        return False
    for fd in fds:
        target = _readlink(f"fd/{fd}", where)
        if target is not None and note(target, "open file", targets.askers_of(target)):
            return True
    return False


def _read_at(where: int, name: str, cap: int) -> bytes | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=where)
    except OSError:
        return None
    try:
        chunks, size = [], 0
        while size < cap and (chunk := os.read(fd, min(1 << 16, cap - size))):
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def _mapped(where: int, targets: _Targets, note: _Note) -> None:
    maps = _read_at(where, "maps", MAPS_CAP)
    if not maps or not any(needle in maps for needle in targets.needles):
        return  # most processes: no line could name a file in the directories
    for line in maps.split(b"\n"):
        parts = line.split(maxsplit=5)
        if len(parts) == 6:
            path = os.fsdecode(parts[5])
            if note(path, "mapped file", targets.askers_of(path)):
                return
