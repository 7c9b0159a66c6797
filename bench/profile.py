"""``python -m bench --profile``: py-spy on the daemon during item 1's 32-client level and item 7's
"nothing else queued" runs, and each flame's top functions by inclusive share of the samples.

py-spy comes from PyPI (``pip install -e '.[bench]'``); without it ``Profiler.missing`` says so
and ``record`` measures without profiling. It attaches to the running daemon
(``py-spy record -p PID -f raw -r 250 --nonblocking``: the daemon is never paused) and is stopped
with SIGINT, on which it writes its raw (collapsed stacks) file, kept under the bench's scratch
directory. Idle samples (the event loop waiting in epoll) are not recorded, so the shares are of
the time the daemon was busy.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.scratch import Scratch

RATE = 250
TOP = 15
#: py-spy's frame: ``function (file:line)``; the line is dropped so a function counts once.
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::\d+)?\)$")


@dataclass
class Flame:
    label: str
    path: Path
    #: What went wrong, if py-spy wrote nothing usable.
    problem: str = ""


def find_py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Profiler:
    def __init__(self, scratch: Scratch) -> None:
        self.scratch = scratch
        self.exe = find_py_spy()
        self.missing = (
            "" if self.exe else "py-spy is not installed (pip install -e '.[bench]'): no profiles taken"
        )
        self.flames: list[Flame] = []

    @contextmanager
    def record(self, pid: int, label: str) -> Iterator[None]:
        """Sample ``pid`` for as long as the ``with`` body runs."""
        if not self.exe:
            yield
            return
        n = len(self.flames) + 1
        out = self.scratch.path("profiles", f"{n}.raw")
        log = self.scratch.path("profiles", f"{n}.log")
        argv = [self.exe, "record", "-p", str(pid), "-f", "raw", "-r", str(RATE), "--nonblocking"]
        proc = self.scratch.spawn([*argv, "-o", str(out)], log=log)
        flame = Flame(label, out)
        self.flames.append(flame)
        try:
            yield
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            if proc in self.scratch.procs:
                self.scratch.procs.remove(proc)
            if not out.exists():
                tail = log.read_text(errors="replace").strip().splitlines()[-1:]
                flame.problem = f"py-spy wrote nothing ({tail[0] if tail else f'exit {proc.returncode}'})"

    def summaries(self, top: int = TOP) -> list[str]:
        """Each flame's top functions by inclusive share, the event loop's thread and the worker
        threads apart (``top`` in all; not those on 90% or more of their threads' samples: the
        loop's and the thread's own frames), as lines to print after the table."""
        lines = []
        if self.missing:
            lines.append(f"profile: {self.missing}")
        for flame in self.flames:
            if flame.problem:
                lines += ["", f"profile, {flame.label}: {flame.problem}"]
                continue
            stacks = parse(flame.path.read_text(errors="replace"))
            busy = [(frames, n) for frames, n in stacks if frames[-1] not in IDLE]
            total = sum(n for _, n in busy)
            idle = sum(n for _, n in stacks) - total
            lines += [
                "",
                f"profile, {flame.label}: {total:,} busy samples at {RATE}/s ({idle:,} of idle threads "
                "dropped); inclusive % of the busy samples",
            ]
            focus = [
                f"{name.split(' (')[0]} {100 * sum(n for f, n in busy if name in f) / total:.1f}%"
                for name in FOCUS
                if any(name in f for f, _ in busy)
            ]
            if focus:
                lines.append(f"  of which: {', '.join(focus)}")
            loop = [(f, n) for f, n in busy if not f[0].startswith(WORKER)]
            workers = [(f, n) for f, n in busy if f[0].startswith(WORKER)]
            for what, part, count in (
                ("event loop thread", loop, top - top // 3),
                ("worker threads (to_thread: off the loop)", workers, top // 3),
            ):
                share = sum(n for _, n in part)
                lines.append(f"  {what}: {100 * share / max(total, 1):.1f}%")
                # A function on (nearly) every stack of the group is the thread's scaffolding.
                shown = [(name, n) for name, n in inclusive(part) if n < 0.9 * share][:count]
                lines += [f"    {100 * n / max(total, 1):5.1f}%  {name}" for name, n in shown]
        return lines


#: The leaves of threads that wait for work; py-spy's own idle test misses some of them.
IDLE = frozenset({"Condition.wait (threading.py)", "EpollSelector.select (selectors.py)"})
#: The daemon's request path and its durable write, shown on their own where they were sampled.
FOCUS = ("RpcServer._request_loop (necrod/io/server.py)", "StateStore._flush (necrod/io/store.py)")
#: The first frame of a thread other than the main one.
WORKER = "Thread._bootstrap (threading.py)"


def parse(raw: str) -> list[tuple[list[str], int]]:
    """py-spy's raw lines (``frame;frame;... count``) as (frames root first, named by ``_name``,
    samples)."""
    out = []
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            out.append(([_name(frame) for frame in stack.split(";")], int(n)))
    return out


def inclusive(stacks: list[tuple[list[str], int]]) -> list[tuple[str, int]]:
    """Per function, the samples with it anywhere on the stack, most first.

    Functions that are on exactly the same stacks (a chain of callers above one function: the
    thread's bootstrap, ``runpy``, ``asyncio.run``...) count once, under the deepest of them,
    which names how many callers it stands for."""
    seen_on: dict[str, set[int]] = {}
    depth: dict[str, int] = {}
    for k, (frames, _) in enumerate(stacks):
        for d, name in enumerate(frames):
            seen_on.setdefault(name, set()).add(k)
            depth[name] = max(depth.get(name, 0), d)
    chains: dict[frozenset[int], list[str]] = {}
    for name, on in seen_on.items():
        chains.setdefault(frozenset(on), []).append(name)
    shares = []
    for on, names in chains.items():
        deepest = max(names, key=lambda name: depth[name])
        label = deepest + (f" (+{len(names) - 1} callers on the same stacks)" if len(names) > 1 else "")
        shares.append((label, sum(stacks[k][1] for k in on)))
    return sorted(shares, key=lambda kv: -kv[1])


def _name(frame: str) -> str:
    """``function (file:line)`` as ``function (short file)``: a function, not a line."""
    m = _FRAME.match(frame.strip())
    if m is None:
        return frame.strip()
    path = re.sub(r"^.*/lib/python3\.\d+/(site-packages/)?", "", m.group("file"))
    parts = Path(path).parts
    if "necrod" in parts:
        path = "/".join(parts[parts.index("necrod") :])
    return f"{m.group('func')} ({path})"
