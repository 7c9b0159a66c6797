"""The one table (and its JSON twin): rows of medians, p99s, ratios and targets, and the machine."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Row:
    section: str
    what: str
    unit: str
    median: float | None = None
    p99: float | None = None
    n: int | None = None
    #: ``ratio`` times ``ratio_to`` (a baseline measured in the same run).
    ratio: float | None = None
    ratio_to: str = ""
    target: str = ""
    met: bool | None = None


def _num(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "MB":
        return f"{value / 1e6:,.1f} MB"
    if unit == "%":
        return f"{value:.2f} %"
    if unit in ("/s", "count"):
        return f"{value:,.0f}{' /s' if unit == '/s' else ''}"
    if unit == "per interval":
        return f"{value:.2f}"
    if unit == "ms":
        return f"{value:.3g} ms" if value < 100 else f"{value:,.0f} ms"
    return f"{value:.3g} {unit}"


def _ratio(row: Row) -> str:
    if row.ratio is None:
        return ""
    text = f"{row.ratio:.3g}x" if row.ratio < 1000 else f"{row.ratio:,.0f}x"
    return f"{text} {row.ratio_to}".strip()


def _target(row: Row) -> str:
    if not row.target:
        return ""
    mark = {True: "met", False: "MISSED", None: "n/a"}[row.met]
    return f"{row.target}: {mark}"


def render(rows: list[Row], header: list[str]) -> str:
    table = [["#", "measure", "n", "median", "p99", "ratio", "target"]]
    for row in rows:
        table.append(
            [
                row.section,
                row.what,
                "" if row.n is None else str(row.n),
                _num(row.median, row.unit),
                _num(row.p99, row.unit),
                _ratio(row),
                _target(row),
            ]
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    right = {2, 3, 4}
    lines = [*header, ""]
    for k, r in enumerate(table):
        cells = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("| " + " | ".join(cells) + " |")
        if k == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def to_json(rows: list[Row], machine: dict[str, Any], command: str, profiles: list[str] | None = None) -> str:
    out: dict[str, Any] = {"command": command, "machine": machine, "rows": [asdict(r) for r in rows]}
    if profiles:
        out["profiles"] = profiles
    return json.dumps(out, indent=2)


def machine() -> dict[str, Any]:
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    git = subprocess.run(["git", "--version"], capture_output=True, text=True).stdout.strip()
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_bytes": mem,
        "python": sys.version.split()[0],
        "git": git.removeprefix("git version "),
        "kernel": platform.release(),
    }


def machine_line(m: dict[str, Any]) -> str:
    return (
        f"machine: {m['cores']} cores ({m['cpu']}), {m['memory_bytes'] / 2**30:.1f} GiB, "
        f"Python {m['python']}, git {m['git']}, Linux {m['kernel']}"
    )
