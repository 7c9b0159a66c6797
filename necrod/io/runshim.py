"""The first thing a runner runs: it starts the command in the runner's cgroups and records
how it ended.

``python -m necrod.io.runshim [--cgroup DIR]... [--exit-file PATH [--log-limit BYTES]] -- COMMAND...``

anyio's ``open_process`` has no ``preexec_fn``, and the command must be in its cgroups (its
limits) before its own code runs, so this tiny program does it in between.

Without ``--exit-file`` it replaces itself with the command: the runner's pid, process group and
exit status are the command's. With it, it stays as the command's parent — the runner's pid and
process group leader — and writes how the command ended to ``PATH`` (JSON, written whole with a
rename): ``code`` or ``signal``, the CPU seconds and peak memory the kernel counted for it and
the children it waited for (``getrusage``), or ``start_failed`` when the command could not be
started at all (not found, not executable). That record is what lets a restarted necrod learn
how a runner ended that the daemon before it started: the runner is no child of the new daemon.
With ``--log-limit`` the command's stdout and stderr are a pipe the wrapper copies to its own
stdout (the attempt's log) up to that many bytes in all, what the log held already counted,
then one line saying where it was cut; the rest is read and dropped, so the command is neither
blocked nor stopped by it. An agent's output must not fill the state directory's disk.
The wrapper ignores SIGTERM, SIGINT and SIGHUP (the command does not: they are reset before it
starts) so that it outlives a stop's SIGTERM to the process group and records the outcome; it
stays out of the runner's cgroups, so its own memory and CPU are not the runner's.

It runs once per task, so it starts lean (issue 22): the launchers run this file with ``-I -S``
(no site, no ``necrod`` import), and it imports neither ``signal`` nor ``json``, which pull in
``enum`` and ``re``: half of its start-up time. ``_signal`` is the same functions without the
enum wrappers, and the record is written by hand (``json`` is imported only to quote why a
command could not start).
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # signal without its enum wrappers
import os
import resource  # a built-in module, for the type of wait4's usage (typing would cost 25 ms)
import sys

#: Signals the wrapper rides out so that it can record how the command ended.
_SHIELDED = (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP)
#: Signals Python ignores from its start (an ignored signal stays ignored across exec): the
#: command gets them back as any program expects (``yes | head`` ends on SIGPIPE).
_PYTHON_IGNORES = (_signal.SIGPIPE, _signal.SIGXFSZ)


def _default_signals() -> None:
    for sig in (*_SHIELDED, *_PYTHON_IGNORES):
        _signal.signal(sig, _signal.SIG_DFL)


def _join(cgroups: list[str]) -> None:
    for cgroup in cgroups:
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as procs:
            procs.write(str(os.getpid()))


def _json(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return repr(value)
    import json  # only for the reason a start failed: the common path stays without it

    return json.dumps(value)


def _record(path: str, record: dict[str, object]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write("{" + ", ".join(f'"{key}": {_json(value)}' for key, value in record.items()) + "}")
    os.replace(tmp, path)


#: Once the command has ended, what it wrote is at most a pipe's buffer: output past this is a
#: background child's, which may never stop, and does not hold the exit record back.
_AFTER_END = 1 << 20
_CUT = "\n[necrod: this log was cut at {} bytes; the runner's output after it was not kept]\n"


def _copy_output(source: int, pid: int, limit: int) -> tuple[int, resource.struct_rusage]:
    """Copy the command's output to stdout, at most ``limit`` bytes of the log in all, until the
    command has ended and nothing more is ready; its wait status and usage."""
    import select

    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    _signal.signal(_signal.SIGCHLD, lambda *_: None)
    _signal.set_wakeup_fd(wake_w)  # the command's end wakes the select: no race with its check
    try:
        left = limit - os.fstat(1).st_size
    except OSError:
        left = limit
    ended: tuple[int, resource.struct_rusage] | None = None
    after = 0
    while True:
        if ended is None:
            waited, status, usage = os.wait4(pid, os.WNOHANG)
            if waited == pid:
                ended = status, usage
        ready, _, _ = select.select([source, wake_r], [], [], 0 if ended else None)
        if wake_r in ready:
            os.read(wake_r, 4096)  # a byte per signal: a few at most
        if source not in ready:
            if ended:
                break
            continue
        data = os.read(source, 65536)
        if not data:  # no writer is left
            break
        if ended and (after := after + len(data)) > _AFTER_END:
            break
        if left > 0:
            try:
                os.write(1, data[:left])
                if left <= len(data):
                    os.write(1, _CUT.format(limit).encode())
            except OSError:
                pass  # a full disk: the command runs on, its output dropped
            left -= len(data)
    os.close(source)
    if ended is None:
        _, status, usage = os.wait4(pid, 0)
        ended = status, usage
    return ended


def _supervise(cgroups: list[str], exit_file: str, command: list[str], log_limit: int | None = None) -> int:
    for sig in _SHIELDED:
        _signal.signal(sig, _signal.SIG_IGN)
    read_end, write_end = os.pipe()  # close-on-exec: EOF at exec, or the reason it failed
    output = os.pipe() if log_limit is not None else None
    pid = os.fork()
    if pid == 0:  # the command
        os.close(read_end)
        try:
            if output is not None:
                os.dup2(output[1], 1)
                os.dup2(output[1], 2)
            _default_signals()
            _join(cgroups)
            os.execvp(command[0], command)
        except OSError as exc:
            os.write(write_end, f"cannot run {command[0]!r}: {exc.strerror or exc}".encode())
        finally:
            os._exit(127)
    os.close(write_end)
    failed = b""
    while chunk := os.read(read_end, 4096):
        failed += chunk
    os.close(read_end)
    if output is not None and log_limit is not None:
        os.close(output[1])
        status, usage = _copy_output(output[0], pid, log_limit)
    else:
        _, status, usage = os.wait4(pid, 0)
    record: dict[str, object] = {
        "code": os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else None,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 6),
        "peak_rss_bytes": usage.ru_maxrss * 1024,
    }
    if failed:
        record["start_failed"] = failed.decode(errors="replace")
        print(f"runshim: {record['start_failed']}", file=sys.stderr)
    _record(exit_file, record)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


def main(argv: list[str]) -> int:
    cgroups: list[str] = []
    exit_file = None
    log_limit = None
    i = 0
    while i < len(argv) and argv[i] != "--":
        if argv[i] == "--cgroup":
            cgroups.append(argv[i + 1])
        elif argv[i] == "--exit-file":
            exit_file = argv[i + 1]
        elif argv[i] == "--log-limit" and argv[i + 1].isascii() and argv[i + 1].isdigit():
            log_limit = int(argv[i + 1])
        else:
            print(f"runshim: unknown option {argv[i]!r}", file=sys.stderr)
            return 127
        i += 2
    command = argv[i + 1 :]
    if not command:
        print("runshim: no command", file=sys.stderr)
        return 127
    if exit_file is not None:
        return _supervise(cgroups, exit_file, command, log_limit)
    _join(cgroups)
    _default_signals()
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"runshim: cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
