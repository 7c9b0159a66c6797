"""Item ``ctl``: the wall time of ``necroctl status`` against a real daemon, next to the time of
starting the same interpreter to do nothing (``python -c pass``), run in turn so that a drifting
machine moves both (issue 20: status should answer in under 150 ms, nearly all of it start-up).

``python -m bench.ctl_status [--runs N]`` runs it alone; ``python -m bench --only ctl`` in the
table with the others.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import report
from bench.daemon import Daemon, config_yaml
from bench.gitrepo import make_origin
from bench.report import Row
from bench.scratch import Scratch, env_without_socket
from bench.stats import median, percentile

RUNS = 20
TARGET_MS = 150.0


def necroctl() -> list[str]:
    """The console script an operator runs (beside this interpreter), else the module."""
    script = Path(sys.executable).parent / "necroctl"
    return [str(script)] if script.exists() else [sys.executable, "-m", "necrod.ctl.main"]


def _wall_ms(argv: list[str]) -> tuple[float, int]:
    started = time.perf_counter()
    done = subprocess.run(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env_without_socket()
    )
    return (time.perf_counter() - started) * 1000, done.returncode


def measure(scratch: Scratch, runs: int = RUNS) -> list[Row]:
    origin = make_origin(scratch.path("ctl-origin.git"), 20, 3)
    daemon = Daemon(scratch, "ctl", config_yaml({"repo": {"repo_url": str(origin), "slots": 1}})).start()
    try:
        status = [*necroctl(), "--socket", str(daemon.socket), "status"]
        baseline = [sys.executable, "-c", "pass"]
        _wall_ms(status), _wall_ms(baseline)  # warm the page cache
        ctl_ms, pass_ms, ratios = [], [], []
        for _ in range(runs):
            ms, code = _wall_ms(status)
            if code != 0:
                raise RuntimeError(f"necroctl status exited {code}")
            base, _ = _wall_ms(baseline)
            ctl_ms.append(ms)
            pass_ms.append(base)
            ratios.append(ms / base)
    finally:
        daemon.stop()
    ctl = median(ctl_ms)
    return [
        Row("ctl", "python -c pass", "ms", median(pass_ms), percentile(pass_ms, 99), runs),
        Row("ctl", "necroctl status (a real daemon)", "ms", ctl, percentile(ctl_ms, 99), runs,
            median(ratios), "python -c pass", f"< {TARGET_MS:g} ms", ctl < TARGET_MS),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ctl_status", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=RUNS, help=f"runs of each command (default {RUNS})")
    args = parser.parse_args(argv)
    if shutil.which("git") is None:
        print("bench: git is needed", file=sys.stderr)
        return 2
    scratch = Scratch()
    try:
        rows = measure(scratch, args.runs)
    finally:
        scratch.close()
    header = [
        f"command: python -m bench.ctl_status --runs {args.runs}",
        report.machine_line(report.machine()),
    ]
    print(report.render(rows, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
