"""Starting, watching and stopping runners: a process of our own, or a tmux session.

Both launchers run the command through ``runshim`` (cgroup and limits first), in the slot's
directory, with exactly the environment given, in a process group of its own, with stdout and
stderr appended to the attempt's log file.

- ``process``: a child of the daemon; its exit is noticed at once. It does not outlive the
  daemon: a daemon stop ends it, and after a crash the orphan is stopped and its task re-queued.
- ``tmux``: a session ``necro-<task>-<attempt>`` on necrod's own tmux server (its own socket, so
  operators' tmux is untouched). An operator can attach to watch or help. The session outlives
  a daemon restart and is found again by name; a small wrapper script records the exit status
  in a file, and tmux's ``pipe-pane`` copies the output to the log.

Stopping is always the same: SIGTERM to the process group (and to everything in the runner's
cgroup), a grace, then SIGKILL. When the runner has ended, by itself or stopped, whatever is
left in its cgroup (a child that left the process group with ``setsid``) is killed whole
(``close``) before the slot goes back to be cleaned.
"""

from __future__ import annotations

import os
import shlex
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import aiofiles
import anyio
import structlog

from necrod.io.cgroups import RunnerCgroup, RunnerCgroups

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


@dataclass(frozen=True, slots=True)
class Exit:
    code: int | None
    signal: int | None = None
    oom: bool = False
    #: The runner vanished without leaving an exit status (a tmux session killed from outside).
    lost: bool = False
    #: Why, when the launcher knows better than "lost".
    detail: str | None = None


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


def _shim(spec: LaunchSpec, cgroup: RunnerCgroup | None) -> list[str]:
    argv = [sys.executable, "-m", "necrod.io.runshim"]
    for path in cgroup.paths if cgroup is not None else []:
        argv += ["--cgroup", str(path)]
    return [*argv, "--", *spec.argv]


def _cgroup(parents: RunnerCgroups, spec: LaunchSpec) -> RunnerCgroup | None:
    """The runner's cgroups (to hold all its processes, and for its memory limit), where the
    machine lets us make them. A runner with a memory limit that cannot be enforced is not
    started: ``OSError`` (``LimitNotEnforced``) says why."""
    try:
        return RunnerCgroup.create(parents, spec.name, spec.memory_limit)
    except OSError as exc:
        half_made = RunnerCgroup.find(parents, spec.name)
        if half_made is not None:
            half_made.remove()
        if spec.memory_limit is not None:
            raise
        log.warning("cgroup_unavailable", error=str(exc))
        return None


async def end_cgroup(cgroup: RunnerCgroup, wait: float = CGROUP_DRAIN_S) -> bool:
    """Kill everything left in a runner's cgroup and remove it. False when something in it
    would not die within ``wait`` (the cgroup is kept, to be looked at)."""
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


def _killpg(pgid: int | None, sig: int) -> bool:
    if not pgid:
        return False
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


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

    async def close(self) -> bool:
        """The runner has ended: kill whatever it left in its cgroup (children that left its
        process group) and remove the cgroup. False when something there would not die."""
        if self.cgroup is None:
            return True
        return await end_cgroup(self.cgroup)


class ProcessRun(Run):
    def __init__(self, process: anyio.abc.Process, cgroup: RunnerCgroup | None) -> None:
        self.process = process
        self.pid = process.pid
        self.cgroup = cgroup

    async def wait(self) -> Exit:
        code = await self.process.wait()
        oom = self.cgroup.oom_killed() if self.cgroup else False
        return Exit(code=code if code >= 0 else None, signal=-code if code < 0 else None, oom=oom)

    async def stop(self, grace: float) -> None:
        await stop_group(self.pid, grace, self.cgroup)


class ProcessLauncher:
    def __init__(self, cgroup_parents: RunnerCgroups) -> None:
        self.cgroup_parents = cgroup_parents

    async def start(self, spec: LaunchSpec) -> Run:
        cgroup = _cgroup(self.cgroup_parents, spec)
        try:
            spec.log.parent.mkdir(parents=True, exist_ok=True)
            with open(spec.log, "ab") as out:  # noqa: ASYNC230 (opened for the child, not read here)
                process = await anyio.open_process(
                    _shim(spec, cgroup), cwd=spec.cwd, env=spec.env, stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
        except Exception:
            if cgroup is not None:  # nothing was started in it
                cgroup.remove()
            raise
        return ProcessRun(process, cgroup)


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
        try:
            text = self.exit_file.read_text().strip()
        except OSError:
            return None
        code = int(text) if text.lstrip("-").isdigit() else None
        oom = self.cgroup.oom_killed() if self.cgroup else False
        if code is not None and code > 128:  # the shell reports "killed by signal n" as 128+n
            return Exit(code=None, signal=code - 128, oom=oom)
        return Exit(code=code, oom=oom)

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

    @staticmethod
    def files(log: Path) -> tuple[Path, Path, Path]:
        """The wrapper script, its start signal, and its exit status file, beside the log."""
        stem = log.with_suffix("")
        return stem.with_suffix(".sh"), stem.with_suffix(".go"), stem.with_suffix(".exit")

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
        script, go, exit_file = self.files(spec.log)
        for stale in (go, exit_file):
            stale.unlink(missing_ok=True)
        env = " ".join(shlex.quote(f"{k}={v}") for k, v in spec.env.items())
        command = " ".join(shlex.quote(a) for a in _shim(spec, cgroup))
        # Wait for pipe-pane to be in place, so no output is lost; then run; then record the status.
        script.write_text(
            "#!/bin/sh\n"
            f"i=0; while [ ! -e {shlex.quote(str(go))} ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done\n"
            f"env -i {env} {command}\n"
            f"echo $? > {shlex.quote(str(exit_file))}.tmp && mv {shlex.quote(str(exit_file))}.tmp "
            f"{shlex.quote(str(exit_file))}\n"
        )
        script.chmod(0o700)
        spec.log.touch()
        await self._tmux("new-session", "-d", "-s", spec.name, "-c", spec.cwd, "-x", "200", "-y", "50",
                         f"sh {shlex.quote(str(script))}")  # fmt: skip
        await self._tmux("pipe-pane", "-o", "-t", f"={spec.name}:", f"cat >> {shlex.quote(str(spec.log))}")
        pid = await self.pane_pid(spec.name)
        go.touch()
        return TmuxRun(self, spec.name, exit_file, pid, cgroup)

    async def adopt(self, name: str, log_path: Path, pid: int | None, cgroup: RunnerCgroup | None) -> TmuxRun:
        _, _, exit_file = self.files(log_path)
        return TmuxRun(self, name, exit_file, pid or await self.pane_pid(name), cgroup)
