"""Starting, watching and stopping runners: a process of our own, or a tmux session.

Both launchers run the command through ``runshim`` (cgroups and limits first), in the slot's
directory, with exactly the environment given, in a process group of its own, with stdout and
stderr appended to the attempt's log file. ``runshim`` stays as the command's parent and writes
how it ended (exit status, CPU seconds, peak memory, or why it could not start) to a file
beside the log, so that a daemon that did not start the runner can still learn its end. The
runner's output is untrusted: a log keeps at most ``attemptlog.MAX_LOG_BYTES`` of it (the process
runner's wrapper copies it; tmux's copy stops there), then a line saying it was cut.

- ``process``: a child of the daemon, in a session of its own; its exit is noticed at once.
  It outlives the daemon: a stop or restart leaves it running (the systemd unit's
  ``KillMode=process`` leaves it alone too), and the next daemon adopts it by its pid, checked
  against its command line, and reads its end from the exit file. A reboot ends it.
- ``tmux``: a session ``necro-<task>-<attempt>`` on necrod's own tmux server (its own socket, so
  operators' tmux is untouched). An operator can attach to watch or help. The session outlives
  a daemon restart and is found again by name; tmux's ``pipe-pane`` copies the output to the log.

Stopping is always the same: SIGTERM to the process group (and to everything in the runner's
cgroup), a grace, then SIGKILL. When the runner has ended, by itself or stopped, whatever is
left in its cgroup (a child that left the process group with ``setsid``) is killed whole
(``close``) before the slot goes back to be cleaned.
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import signal
import stat
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiofiles
import anyio
import structlog

from necrod.io import attemptlog
from necrod.io.cgroups import LimitUnenforceable, RunnerCgroup, RunnerCgroups
from necrod.io.children import exited, wait_exit
from necrod.io.procs import ScanStuck, scan_off_loop

log = structlog.get_logger("necrod.launch")

TMUX_POLL_S = 0.25
TMUX_SESSION_CHECK_EVERY = 8
#: After cgroup.kill, its processes are gone within milliseconds unless the kernel holds one.
CGROUP_DRAIN_S = 5.0


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    name: str
    argv: list[str]
    cwd: str
    env: dict[str, str]
    log: Path
    memory_limit: int | None = None
    #: CPUs the runner may use (1.5: one and a half), enforced by its cgroup.
    cpu_limit: float | None = None


@dataclass(frozen=True, slots=True)
class Exit:
    code: int | None
    signal: int | None = None
    oom: bool = False
    #: The runner vanished without leaving an exit status (a tmux session killed from outside).
    lost: bool = False
    #: Why, when the launcher knows better than "lost".
    detail: str | None = None
    #: The command could not be started at all (not found, not executable): why.
    start_failed: str | None = None
    #: What the kernel counted for the command (``getrusage``), when it was recorded.
    cpu_s: float | None = None
    peak_rss_bytes: int | None = None


def runner_files(log: Path) -> tuple[Path, Path, Path]:
    """A runner's wrapper script (tmux), its start signal (tmux), and its exit record, beside
    its log."""
    stem = log.with_suffix("")
    return stem.with_suffix(".sh"), stem.with_suffix(".go"), stem.with_suffix(".exit")


#: An exit record is a line of JSON: what is past this is not one.
EXIT_RECORD_BYTES = 4096


def read_exit(exit_file: Path, cgroup: RunnerCgroup | None) -> Exit | None:
    """The end ``runshim`` recorded (JSON; a bare number from a shell), or None before it has.
    What runs can write where the record lies: the first 4 KiB of a regular file only, never
    through a symlink nor waiting on a FIFO (this is read on the event loop)."""
    try:
        fd = os.open(exit_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        text = os.read(fd, EXIT_RECORD_BYTES).decode(errors="replace").strip()
    except OSError:
        return None
    finally:
        os.close(fd)
    oom = cgroup.oom_killed() if cgroup else False
    if text.lstrip("-").isdigit():
        code = int(text)
        if code > 128:  # the shell reports "killed by signal n" as 128+n
            return Exit(code=None, signal=code - 128, oom=oom)
        return Exit(code=code, oom=oom)
    try:
        record = json.loads(text)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None

    def number(key: str) -> float | None:
        value = record.get(key)
        return value if isinstance(value, int | float) and not isinstance(value, bool) else None

    status, sig = number("code"), number("signal")
    failed = record.get("start_failed")
    peak = number("peak_rss_bytes")
    return Exit(code=int(status) if status is not None else None, signal=int(sig) if sig is not None else None,
                oom=oom, start_failed=str(failed) if failed else None, cpu_s=number("cpu_s"),
                peak_rss_bytes=int(peak) if peak is not None else None)  # fmt: skip


async def read_log(path: Path, offset: int, limit: int) -> bytes:
    """Up to ``limit`` bytes of an attempt's log from ``offset`` (b"" when there is no such
    file), read in a worker thread (aiofiles): a log can be large and its disk slow, and the
    event loop serves every lease meanwhile. The runner can write where its log lies: the path
    is not followed if it was replaced by a symlink, and anything but a regular file is refused
    (``OSError``) rather than waited on."""

    def opener(name: str, flags: int) -> int:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)

    try:
        async with aiofiles.open(path, "rb", opener=opener) as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise OSError(f"{path} is not a regular file")
            await f.seek(offset)
            return await f.read(limit)
    except FileNotFoundError:
        return b""


#: ``runshim`` is run as a file, isolated and without site (``-I -S``): it imports nothing of
#: necrod, and a Python without site starts in half the time (it runs once per task).
RUNSHIM = str(Path(__file__).with_name("runshim.py"))
#: The same wrapper in Perl, used where perl is installed: 3 ms of CPU per task, not 17 (issue 22).
RUNSHIM_PL = str(Path(__file__).with_name("runshim.pl"))
#: What the Perl wrapper's own environment calls the runner's ``PERL*`` variables.
PERL_PREFIX = "NECROD_RUNSHIM_"
#: None where there is no perl (or the script is missing): the Python wrapper then.
PERL = next(
    (p for p in ("/usr/bin/perl", "/bin/perl") if os.access(p, os.X_OK) and os.path.isfile(RUNSHIM_PL)), None
)


def wrapped(
    command: Sequence[str],
    env: Mapping[str, str],
    exit_file: Path,
    *,
    cgroups: Sequence[Path] = (),
    log_limit: int | None = None,
    perl: str | None = PERL,
) -> tuple[list[str], dict[str, str]]:
    """``command`` under the wrapper, which records its end in ``exit_file``, and the wrapper's
    environment. Perl's start is changed by ``PERL*`` variables (``PERL5OPT`` loads modules):
    the wrapper gets them as ``NECROD_RUNSHIM_PERL*`` and names them back for the command
    alone. With ``log_limit`` the wrapper copies the command's output to its own stdout, that
    many bytes of it at most."""
    if perl is not None:
        argv = [perl, RUNSHIM_PL, "--exit-file", str(exit_file)]
        env = {(PERL_PREFIX + k if k.startswith("PERL") else k): v for k, v in env.items()}
    else:
        argv = [sys.executable, "-I", "-S", RUNSHIM, "--exit-file", str(exit_file)]
    for path in cgroups:
        argv += ["--cgroup", str(path)]
    if log_limit is not None:
        argv += ["--log-limit", str(log_limit)]
    return [*argv, "--", *command], dict(env)


def _shim(
    spec: LaunchSpec, cgroup: RunnerCgroup | None, perl: str | None = PERL, log_limit: int | None = None
) -> tuple[list[str], dict[str, str]]:
    """A runner's wrapper: its command line and environment (``wrapped``)."""
    return wrapped(spec.argv, spec.env, runner_files(spec.log)[2], cgroups=cgroup.paths if cgroup is not None else (),
                   log_limit=log_limit, perl=perl)  # fmt: skip


def _cgroup(parents: RunnerCgroups, spec: LaunchSpec) -> RunnerCgroup | None:
    """The runner's cgroups (to hold all its processes, enforce its limits and count its use),
    where the machine lets us make them. A runner with a limit that cannot be enforced is not
    started: ``LimitUnenforceable`` says which limit and why."""
    try:
        return RunnerCgroup.create(parents, spec.name, spec.memory_limit, spec.cpu_limit)
    except LimitUnenforceable:
        raise
    except OSError as exc:
        half_made = RunnerCgroup.find(parents, spec.name)
        if half_made is not None:
            half_made.remove()
        why = parents.unenforceable(spec.memory_limit, spec.cpu_limit, f"its cgroup cannot be made ({exc})")
        if why is not None:
            raise LimitUnenforceable(why) from None
        log.warning("cgroup_unavailable", error=str(exc))
        return None


def process_alive(pid: int, exit_file: Path) -> bool:
    """Whether ``pid`` is still the runner that records its end in ``exit_file`` (a pid reused
    by another process since does not count, nor does a zombie). The wrapper runs as the
    daemon's uid with ``--exit-file <exit_file>`` in its command line: another user's process
    that says the same (the path is in every peer's ``tasks.get``) is not it."""
    try:
        owner = os.stat(f"/proc/{pid}").st_uid
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()[:65536]
    except OSError:
        return False
    if owner != os.geteuid() or stat.rsplit(")", 1)[1].split()[0] == "Z":
        return False
    argv = cmdline.split(b"\0")
    wanted = str(exit_file).encode()
    return any(a == b"--exit-file" and b == wanted for a, b in itertools.pairwise(argv))


async def end_cgroup(cgroup: RunnerCgroup, wait: float = CGROUP_DRAIN_S) -> bool:
    """Kill everything left in a runner's cgroup and remove it. False when something in it
    would not die within ``wait`` (the cgroup is kept, to be looked at)."""
    if not cgroup.empty():  # mostly it is: the runner ended, and nothing it started is left
        with anyio.move_on_after(wait):
            while True:
                cgroup.kill()  # again each time: without cgroup.kill, a fork may slip between kills
                if cgroup.empty():
                    break
                await anyio.sleep(0.05)
    if not cgroup.empty():
        return False
    cgroup.remove()
    return True


async def alive_off_loop(pid: int, exit_file: Path) -> bool:
    """``process_alive`` in a scan thread: reading a command line waits on the process's memory
    lock, and the pid may be anyone's by now. One that cannot be read in time is not taken for
    the runner (never signal or wait on a process that could not be told apart)."""
    try:
        return await scan_off_loop(process_alive, pid, exit_file)
    except ScanStuck:
        log.warning("runner_unreadable", pid=pid, exit_file=str(exit_file))
        return False


def find_runner(exit_file: Path) -> int | None:
    """The pid of the wrapper that records its end in ``exit_file``, among every process (after
    a restart, for a runner whose pid was not saved); None when there is none."""
    try:
        entries = [int(e) for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return None
    found = [pid for pid in entries if process_alive(pid, exit_file)]
    # Between its fork and its exec the command's process has the wrapper's command line too.
    parents = [pid for pid in found if _parent(pid) not in found]
    return min(parents or found, default=None)


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _killpg(pgid: int | None, sig: int) -> bool:
    if not pgid:
        return False
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def kill_now(pgid: int | None, cgroup: RunnerCgroup | None) -> None:
    """SIGKILL a local runner's process group and cgroup at once."""
    _killpg(pgid, signal.SIGKILL)
    if cgroup is not None:
        cgroup.kill()


def group_alive(pgid: int) -> bool:
    """Whether any process of process group ``pgid`` is still running (zombies do not count)."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return False
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


async def stop_group(pgid: int | None, grace: float, cgroup: RunnerCgroup | None = None) -> None:
    """SIGTERM the group (and the cgroup), wait up to ``grace`` for it to go, then SIGKILL."""
    with anyio.CancelScope(shield=True):
        _killpg(pgid, signal.SIGTERM)
        if cgroup is not None:
            cgroup.signal_all(signal.SIGTERM)
        with anyio.move_on_after(grace):
            while (pgid and group_alive(pgid)) or (cgroup is not None and not cgroup.empty()):
                await anyio.sleep(0.05)
        _killpg(pgid, signal.SIGKILL)
        if cgroup is not None:
            cgroup.kill()


class Run:
    """A started runner."""

    pid: int | None = None
    session: str | None = None
    cgroup: RunnerCgroup | None = None

    async def wait(self) -> Exit:
        raise NotImplementedError

    async def stop(self, grace: float) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        """SIGKILL the runner now (a forced cancel), where the launcher can; its end is then seen
        as usual. Others are stopped by ``stop`` with no grace."""

    async def close(self) -> bool:
        """The runner has ended: kill whatever it left in its cgroup (children that left its
        process group) and remove the cgroup. False when something there would not die."""
        if self.cgroup is None:
            return True
        return await end_cgroup(self.cgroup)

    def usage(self, end: Exit | None) -> tuple[float | None, int | None]:
        """CPU seconds and peak memory (bytes) the runner used: from its cgroup (read before
        ``close``), else what the kernel told its wrapper (``end``)."""
        cpu = self.cgroup.cpu_seconds() if self.cgroup else None
        peak = self.cgroup.peak_memory() if self.cgroup else None
        if end is not None:
            cpu = cpu if cpu is not None else end.cpu_s
            peak = peak if peak is not None else end.peak_rss_bytes
        return cpu, peak


class ProcessRun(Run):
    """A process runner this daemon started: its child, started with ``subprocess.Popen``, not
    asyncio's subprocess transports, which kill their processes when the event loop closes (a
    daemon stop must leave the runner running). Its end is awaited on a pidfd."""

    def __init__(
        self, process: subprocess.Popen[bytes], exit_file: Path, cgroup: RunnerCgroup | None
    ) -> None:
        self.process = process
        self.pid = process.pid
        self.exit_file = exit_file
        self.cgroup = cgroup

    async def wait(self) -> Exit:
        code = await exited(self.process)
        recorded = read_exit(self.exit_file, self.cgroup)
        if recorded is not None:
            return recorded
        oom = self.cgroup.oom_killed() if self.cgroup else False
        return Exit(code=code if code >= 0 else None, signal=-code if code < 0 else None, oom=oom)

    async def stop(self, grace: float) -> None:
        await stop_group(self.pid, grace, self.cgroup)

    def kill(self) -> None:
        kill_now(self.pid, self.cgroup)


class AdoptedProcessRun(Run):
    """A process runner a daemon before this one started: not our child, so it is watched by
    its pid, and its end read from the record its wrapper writes."""

    def __init__(self, pid: int, exit_file: Path, cgroup: RunnerCgroup | None) -> None:
        self.pid = pid
        self.exit_file = exit_file
        self.cgroup = cgroup

    async def wait(self) -> Exit:
        while self.pid and await alive_off_loop(self.pid, self.exit_file):
            await wait_exit(self.pid)
        return read_exit(self.exit_file, self.cgroup) or Exit(
            code=None, lost=True, detail="the runner ended without recording its exit status"
        )

    async def stop(self, grace: float) -> None:
        await stop_group(self.pid, grace, self.cgroup)

    def kill(self) -> None:
        kill_now(self.pid, self.cgroup)


class ProcessLauncher:
    def __init__(self, cgroup_parents: RunnerCgroups) -> None:
        self.cgroup_parents = cgroup_parents

    async def start(self, spec: LaunchSpec) -> Run:
        cgroup = _cgroup(self.cgroup_parents, spec)
        exit_file = runner_files(spec.log)[2]
        try:
            spec.log.parent.mkdir(parents=True, exist_ok=True)
            exit_file.unlink(missing_ok=True)
            with open(spec.log, "ab") as out:  # noqa: ASYNC230 (opened for the child, not read here)
                argv, env = _shim(spec, cgroup, log_limit=attemptlog.MAX_LOG_BYTES)
                process = subprocess.Popen(  # noqa: ASYNC220 (a fork and exec, as open_process does; see ProcessRun)
                    argv, cwd=spec.cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
        except Exception:
            if cgroup is not None:  # nothing was started in it
                cgroup.remove()
            raise
        return ProcessRun(process, exit_file, cgroup)

    async def locate(self, log_path: Path) -> int | None:
        """The pid of the runner logging to ``log_path``, found by its exit record's path among
        every process (for one whose pid a daemon stopped before saving): off the loop, since
        reading a process's command line waits on its memory lock; None if not found in time."""
        try:
            return await scan_off_loop(find_runner, runner_files(log_path)[2])
        except ScanStuck as exc:
            log.warning("runner_not_located", log=str(log_path), error=str(exc))
            return None

    async def adopt(self, name: str, log_path: Path, pid: int | None) -> Run | None:
        """The runner ``name`` a daemon before this one started, if it still runs or recorded
        how it ended; None when it is known neither way (a runner of a necrod before exit
        records, or one whose end was lost with a reboot). Without ``pid`` only its exit record
        can tell (``locate`` finds a pid that was not saved)."""
        exit_file = runner_files(log_path)[2]
        running = bool(pid) and await alive_off_loop(pid or 0, exit_file)
        if not running and not exit_file.exists():
            return None
        return AdoptedProcessRun(pid or 0, exit_file, RunnerCgroup.find(self.cgroup_parents, name))


def _capped_copy(log: Path, limit: int) -> str:
    """A shell command appending its input to ``log`` up to ``limit`` bytes, then a line saying
    the rest was not kept (``pipe-pane`` stops copying once it has exited)."""
    q = shlex.quote(str(log))
    cut = shlex.quote(attemptlog.cut_line(limit).decode())
    return f"head -c {limit} >> {q}; [ $(wc -c < {q}) -lt {limit} ] || printf %s {cut} >> {q}"


class TmuxRun(Run):
    def __init__(self, launcher: TmuxLauncher, session: str, exit_file: Path, pid: int | None,
                 cgroup: RunnerCgroup | None) -> None:  # fmt: skip
        self.launcher = launcher
        self.name = session
        self.session = session
        self.exit_file = exit_file
        self.pid = pid
        self.cgroup = cgroup

    def read_exit(self) -> Exit | None:
        """The exit the wrapper wrote, if it has (also read by whoever adopts a finished session)."""
        return read_exit(self.exit_file, self.cgroup)

    async def wait(self) -> Exit:
        n = 0
        while True:
            found = self.read_exit()
            if found is not None:
                return found
            n += 1
            if n % TMUX_SESSION_CHECK_EVERY == 0 and not await self.launcher.has_session(self.name):
                await anyio.sleep(0.5)  # the wrapper may be writing the status right now
                return self.read_exit() or Exit(code=None, lost=True)
            await anyio.sleep(TMUX_POLL_S)

    async def stop(self, grace: float) -> None:
        await stop_group(self.pid, grace, self.cgroup)
        await self.launcher.kill_session(self.name)

    def kill(self) -> None:
        kill_now(self.pid, self.cgroup)


class TmuxLauncher:
    def __init__(self, socket: Path, cgroup_parents: RunnerCgroups) -> None:
        self.socket = socket
        self.cgroup_parents = cgroup_parents

    async def _tmux(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        result = await anyio.run_process(["tmux", "-S", str(self.socket), *args], check=False,
                                         env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TERM": "xterm"})  # fmt: skip
        if check and result.returncode != 0:
            raise OSError(f"tmux {args[0]} failed: {result.stderr.decode(errors='replace').strip()}")
        return result

    async def has_session(self, name: str) -> bool:
        return (await self._tmux("has-session", "-t", f"={name}", check=False)).returncode == 0

    async def sessions(self) -> set[str]:
        result = await self._tmux("list-sessions", "-F", "#{session_name}", check=False)
        return set(result.stdout.decode(errors="replace").split()) if result.returncode == 0 else set()

    async def kill_session(self, name: str) -> None:
        await self._tmux("kill-session", "-t", f"={name}", check=False)

    async def pane_pid(self, name: str) -> int | None:
        result = await self._tmux("display-message", "-p", "-t", f"={name}:", "#{pane_pid}", check=False)
        text = result.stdout.decode().strip()
        return int(text) if result.returncode == 0 and text.isdigit() else None

    async def start(self, spec: LaunchSpec) -> Run:
        cgroup = _cgroup(self.cgroup_parents, spec)
        try:
            return await self._start(spec, cgroup)
        except Exception:
            # A failed start must not run later: the session goes (it waits for its start
            # signal), and so does the cgroup. Not on cancellation (the daemon stopping): the
            # session then runs on, and the next daemon adopts it.
            await self.kill_session(spec.name)
            if cgroup is not None:
                await end_cgroup(cgroup, wait=1.0)
            raise

    async def _start(self, spec: LaunchSpec, cgroup: RunnerCgroup | None) -> TmuxRun:
        spec.log.parent.mkdir(parents=True, exist_ok=True)
        script, go, exit_file = runner_files(spec.log)
        for stale in (go, exit_file):
            stale.unlink(missing_ok=True)
        argv, environment = _shim(spec, cgroup)
        env = " ".join(shlex.quote(f"{k}={v}") for k, v in environment.items())
        command = " ".join(shlex.quote(a) for a in argv)
        # Wait for pipe-pane to be in place, so no output is lost; then run (runshim records the
        # end); if runshim itself could not run, record its status.
        exit_q = shlex.quote(str(exit_file))
        script.write_text(
            "#!/bin/sh\n"
            f"i=0; while [ ! -e {shlex.quote(str(go))} ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done\n"
            f"env -i {env} {command}\n"
            f"s=$?; [ -e {exit_q} ] || {{ echo $s > {exit_q}.tmp && mv {exit_q}.tmp {exit_q}; }}\n"
        )
        script.chmod(0o700)
        spec.log.touch()
        await self._tmux("new-session", "-d", "-s", spec.name, "-c", spec.cwd, "-x", "200", "-y", "50",
                         f"sh {shlex.quote(str(script))}")  # fmt: skip
        await self._tmux(
            "pipe-pane", "-o", "-t", f"={spec.name}:", _capped_copy(spec.log, attemptlog.MAX_LOG_BYTES)
        )
        pid = await self.pane_pid(spec.name)
        go.touch()
        return TmuxRun(self, spec.name, exit_file, pid, cgroup)

    async def adopt(self, name: str, log_path: Path, pid: int | None, cgroup: RunnerCgroup | None) -> TmuxRun:
        exit_file = runner_files(log_path)[2]
        return TmuxRun(self, name, exit_file, pid or await self.pane_pid(name), cgroup)
