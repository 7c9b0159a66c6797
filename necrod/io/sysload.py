"""How busy the machine is: memory in use and load per CPU (Linux)."""

from __future__ import annotations

import os


def memory_used_percent() -> float | None:
    """Memory in use, as the kernel's MemAvailable sees it."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
        total = int(fields["MemTotal"].split()[0])
        available = int(fields["MemAvailable"].split()[0])
    except (OSError, KeyError, ValueError):
        return None
    return 100.0 * (total - available) / total if total else None


def load_per_cpu() -> float | None:
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return None
