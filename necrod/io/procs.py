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
``ScanStuck``, never waited for on the event loop.

Error handling: a process that exits while it is being read is simply gone. One whose entries
cannot be read (another user's, when necrod is not root) cannot be seen at all; see
docs/reliability.md for what that leaves open.
"""

from __future__ import annotations

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


def kernel_path(path: str) -> str:
    """``path`` as /proc names it: the directories above it resolved (they are the daemon's),
    its last component not followed (it may be the agent's)."""
    head, name = os.path.split(path.rstrip("/"))
    return os.path.join(os.path.realpath(head), name)


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
    Blocking: call it in a worker thread (``find_holders``)."""
    dirs = tuple(d.rstrip("/") for d in directories)
    identities = _identities(dirs)
    skipped = {os.getpid(), *skip}
    found = []
    for pid in _pids():
        if pid in skipped:
            continue
        holder = _holder(pid, dirs, identities)
        if holder is not None:
            found.append(holder)
    return found


async def find_holders(directories: Sequence[str], skip: Iterable[int] = ()) -> list[Holder]:
    """``holders`` in a worker thread, with a deadline (``ScanStuck``)."""
    return await _off_loop(holders, directories, tuple(skip))


async def scan_off_loop(func: Callable[..., T], *args: object) -> T:
    """Another reader of every process's /proc entries (``cmdline`` waits on a process's memory
    lock too), run the same way: a scan thread, a deadline, ``ScanStuck``."""
    return await _off_loop(func, *args)


async def _off_loop(func: Callable[..., T], *args: object) -> T:
    with anyio.move_on_after(SCAN_TIMEOUT_S):
        return await anyio.to_thread.run_sync(func, *args, abandon_on_cancel=True, limiter=_scan_threads)
    raise ScanStuck(SCAN_TIMEOUT_S)


async def stop_holders(directories: Sequence[str], grace: float, skip: Iterable[int] = ()) -> Stop:
    """Stop everything working in ``directories``: SIGTERM, up to ``grace`` for it to go, then
    SIGKILL (a few rounds, which also catch processes that came since), looking again each
    time. Raises ``ScanStuck`` when /proc cannot be read in time."""
    skipped = tuple(skip)
    seen: dict[int, Holder] = {}
    found = await find_holders(directories, skipped)
    if not found:
        return Stop([], [])
    seen.update((h.pid, h) for h in found)
    refused = await _off_loop(signal_holders, found, directories, signal.SIGTERM)
    found = await _wait_gone(directories, grace, skipped, seen)
    for _ in range(KILL_ROUNDS):
        if not found:
            break
        refused += await _off_loop(signal_holders, found, directories, signal.SIGKILL)
        found = await _wait_gone(directories, KILL_WAIT_S, skipped, seen)
    left = {h.pid: h for h in [*found, *refused]}
    return Stop(list(seen.values()), list(left.values()))


def signal_holders(found: Iterable[Holder], directories: Sequence[str], sig: int) -> list[Holder]:
    """Send ``sig`` to each process of ``found`` that still works in ``directories``; return
    those that may not be signalled. Each is checked again through a pidfd, so a pid reused by
    another process since the scan is never signalled."""
    dirs = tuple(d.rstrip("/") for d in directories)
    identities = _identities(dirs)
    refused = []
    for h in found:
        try:
            pidfd = os.pidfd_open(h.pid)
        except OSError:
            continue  # gone
        try:
            if _holder(h.pid, dirs, identities) is not None:
                signal.pidfd_send_signal(pidfd, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            refused.append(h)
        finally:
            os.close(pidfd)
    return refused


async def _wait_gone(
    directories: Sequence[str], timeout: float, skip: tuple[int, ...], seen: dict[int, Holder]
) -> list[Holder]:
    deadline = anyio.current_time() + timeout
    while True:
        await anyio.sleep(POLL_S)
        found = await find_holders(directories, skip)
        seen.update((h.pid, h) for h in found if h.pid not in seen)
        if not found or anyio.current_time() >= deadline:
            return found


# --- reading /proc --------------------------------------------------------------------------


def _pids() -> list[int]:
    try:
        return [int(e) for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _inside(path: str, dirs: tuple[str, ...]) -> bool:
    # A deleted directory reads as "<path> (deleted)"; files below it keep their prefix.
    return any(path in (d, f"{d} (deleted)") or path.startswith(d + "/") for d in dirs)


def _identities(dirs: tuple[str, ...]) -> set[tuple[int, int]]:
    """(device, inode) of each directory, to know it from another mount namespace."""
    out = set()
    for d in dirs:
        try:
            st = os.lstat(d)
        except OSError:
            continue
        out.add((st.st_dev, st.st_ino))
    return out


def _holder(pid: int, dirs: tuple[str, ...], identities: set[tuple[int, int]]) -> Holder | None:
    base = f"/proc/{pid}"
    try:
        with open(f"{base}/stat", "rb") as f:
            stat = f.read(4096).decode("utf-8", "replace")
    except OSError:
        return None
    name = stat[stat.find("(") + 1 : stat.rfind(")")]
    fields = stat[stat.rfind(")") + 1 :].split()
    if len(fields) < 7 or fields[0] in ("Z", "X"):
        return None  # exited: nothing left to write with
    if int(fields[6]) & _PF_KTHREAD:
        return None  # a kernel thread: no files, no working directory of a slot's
    state, ppid = fields[0], int(fields[1])
    found = _how(base, pid, state, dirs, identities)
    if found is None:
        return None
    return Holder(pid, ppid, name, state, found[0], found[1])


def _how(
    base: str, pid: int, state: str, dirs: tuple[str, ...], identities: set[tuple[int, int]]
) -> tuple[str, str] | None:
    try:
        tids = os.listdir(f"{base}/task")
    except OSError:
        tids = [str(pid)]
    for tid in tids:
        for link in ("cwd", "root"):
            target = _readlink(f"{base}/task/{tid}/{link}")
            if target is not None and _inside(target, dirs):
                return (link if tid == str(pid) else f"thread {tid} {link}"), target
    try:
        st = os.stat(f"{base}/cwd")
        if (st.st_dev, st.st_ino) in identities:
            return "cwd in another mount namespace", _readlink(f"{base}/cwd") or "?"
    except OSError:
        pass
    try:
        fds = os.listdir(f"{base}/fd")
    except OSError:
        fds = []
    for fd in fds:
        target = _readlink(f"{base}/fd/{fd}")
        if target is not None and _inside(target, dirs):
            return "open file", target
    if state != "D":  # its memory lock may be held for as long as it is stuck
        mapped = _mapped_inside(base, dirs)
        if mapped is not None:
            return "mapped file", mapped
    return None


def _mapped_inside(base: str, dirs: tuple[str, ...]) -> str | None:
    try:
        fd = os.open(f"{base}/maps", os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        chunks, size = [], 0
        while size < MAPS_CAP and (chunk := os.read(fd, 1 << 16)):
            chunks.append(chunk)
            size += len(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    for line in b"".join(chunks).decode("utf-8", "replace").splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and _inside(parts[5], dirs):
            return parts[5]
    return None
