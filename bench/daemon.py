"""A real necrod for one measurement: its pools.yaml, the subprocess, readiness and its /proc figures."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.cpu import children_cpu_seconds, process_cpu_seconds
from bench.scratch import Scratch, env_without_socket
from necrod.client import Client
from necrod.proto.errors import DaemonUnreachable


def config_yaml(
    pools: dict[str, dict[str, Any]], daemon: dict[str, Any] | None = None, **sections: dict[str, Any]
) -> str:
    """pools.yaml text; ``sections`` (``runners``, ``dispatcher``) are written as JSON flow mappings."""
    # JSON values are valid YAML flow scalars, which spares quoting rules.
    lines = [f"{name}: {json.dumps(value)}" for name, value in sections.items()]
    if daemon:
        lines.append("daemon:")
        lines += [f"  {k}: {json.dumps(v)}" for k, v in daemon.items()]
    lines.append("pools:")
    for name, keys in pools.items():
        lines.append(f"  {name}:")
        lines += [f"    {k}: {json.dumps(v)}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


class Daemon:
    def __init__(self, scratch: Scratch, name: str, config: str, log_level: str = "warning") -> None:
        self.scratch = scratch
        self.root = scratch.path(name)
        self.root.mkdir(exist_ok=True)
        self.socket = self.root / "necrod.sock"
        self.state_dir = self.root / "state"
        self.config = self.root / "pools.yaml"
        self.config.write_text(config)
        self.log = self.root / "necrod.log"
        self.log_level = log_level
        self.proc = None

    def start(self, timeout: float = 600.0) -> Daemon:
        argv = [sys.executable, "-m", "necrod", "--config", str(self.config), "--socket", str(self.socket)]
        argv += ["--state-dir", str(self.state_dir), "--log-format", "json", "--log-level", self.log_level]
        self.proc = self.scratch.spawn(argv, log=self.log, env=env_without_socket())
        self.wait_ready(timeout)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def client(self, timeout: float = 120.0) -> Client:
        return Client(self.socket, timeout=timeout)

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        with self.client() as c:
            return c.call(method, params)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace").splitlines()[-5:]
                raise RuntimeError(
                    f"necrod exited with {self.proc.returncode}; its log ends:\n" + "\n".join(tail)
                )
            try:
                if all(settled(p) for p in self.call("pools.list")["pools"]):
                    return
            except (DaemonUnreachable, OSError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"necrod was not ready within {timeout:g}s; log: {self.log}")

    def wait_available(self, pool: str, timeout: float = 600.0) -> None:
        """Until every slot of ``pool`` is available (cleanups after release are done)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p = self.call("pools.get", {"pool": pool})
            if settled(p) and p["slots"]["available"] >= p["size"]["baseline"]:
                return
            time.sleep(0.1)
        raise RuntimeError(f"pool {pool} did not come back to available within {timeout:g}s")

    def wait_quiet(self, busy_below: float = 0.05, window_s: float = 0.25, timeout: float = 30.0) -> float:
        """Until the daemon's own CPU use stays below ``busy_below`` of a core for two windows in a
        row (background work after cleanups, e.g. disk measurement, is done); returns the wait."""
        started = time.monotonic()
        calm = 0
        while calm < 2 and time.monotonic() - started < timeout:
            before = self.cpu_seconds()
            time.sleep(window_s)
            calm = calm + 1 if self.cpu_seconds() - before < busy_below * window_s else 0
        return time.monotonic() - started

    def stop(self) -> None:
        if self.proc is not None:
            self.scratch.stop(self.proc)
            self.proc = None

    def workspace(self, pool: str) -> Path:
        return self.state_dir / "workspaces" / pool

    def cpu_seconds(self) -> float:
        """User plus system CPU of the daemon process itself (not of its git children), in ns steps."""
        return process_cpu_seconds(self.pid)

    def all_cpu_seconds(self) -> float:
        """The daemon's CPU and its waited-for children's (git, runners), in clock ticks."""
        return process_cpu_seconds(self.pid) + children_cpu_seconds(self.pid)

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0


def settled(p: dict[str, Any]) -> bool:
    s = p["slots"]
    return (
        p["state"] == "ready"
        and s["creating"] == 0
        and s["cleaning"] == 0
        and s["available"] + s["allocated"] >= p["size"]["baseline"]
    )
