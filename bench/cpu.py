"""The CPU time of another process (user plus system, all its threads, not its children).

/proc/PID/stat counts it in clock ticks (10 ms): too coarse for a floor that spends 3 ms on a
level of 64 requests, or for a 0.1 ms-per-allocation target. The kernel's per-process CPU clock
(what ``clock_getcpuclockid(3)`` names: ``(~pid << 3) | CPUCLOCK_SCHED``) counts the same time in
nanoseconds, threads that have exited included, and any process may read it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_CPUCLOCK_SCHED = 2


def process_cpu_seconds(pid: int) -> float:
    try:
        return time.clock_gettime((~pid << 3) | _CPUCLOCK_SCHED)
    except OSError:  # not Linux, or a kernel without it: the ticks of /proc
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds(pid: int) -> float:
    """User plus system CPU of the children ``pid`` has waited for (and theirs): for the daemon,
    its git processes and its runners' wrappers with their commands. In clock ticks (10 ms): read
    over hundreds of tasks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
