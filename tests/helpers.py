"""Real things for tests: git repositories in a temporary directory, and necrod as a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from necrod.client import Client
from necrod.proto.errors import DaemonUnreachable

GIT_ENV = {
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    "HOME": tempfile.gettempdir(),
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_AUTHOR_NAME": "Test Author",
    "GIT_AUTHOR_EMAIL": "author@example.invalid",
    "GIT_COMMITTER_NAME": "Test Author",
    "GIT_COMMITTER_EMAIL": "author@example.invalid",
    "LC_ALL": "C",
}


def git(cwd: str | os.PathLike[str], *args: str, check: bool = True) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {result.stderr}")
    return result.stdout.strip()


def make_origin(path: Path, files: int = 24) -> Path:
    """A small repository with nested files, an ignored build/ directory and two commits."""
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    for i in range(files):
        d = path / f"pkg{i % 4}" / f"sub{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"file{i}.txt").write_text(f"content {i}\n")
    (path / ".gitignore").write_text("build/\n*.o\n")
    (path / "README").write_text("origin\n")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "initial")
    (path / "README").write_text("origin, second commit\n")
    git(path, "commit", "-q", "-am", "second")
    return path


def commit_file(
    repo: Path, name: str, content: str, message: str | None = None, branch: str | None = None
) -> str:
    if branch is not None:
        git(repo, "checkout", "-q", "-B", branch)
    (repo / name).parent.mkdir(parents=True, exist_ok=True)
    (repo / name).write_text(content)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message or f"change {name}")
    return git(repo, "rev-parse", "HEAD")


def wait_for(
    predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (DaemonUnreachable, ConnectionError, OSError) as exc:
            last_exc = exc
            value = None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_exc})" if last_exc else "")
    )


def short_tmpdir() -> Path:
    """A short directory: a Unix socket path must fit in 108 bytes."""
    return Path(tempfile.mkdtemp(prefix="nd-", dir="/tmp"))


class Necrod:
    """necrod as a real subprocess with its own config, socket and state directory."""

    def __init__(
        self,
        root: Path,
        config: str | None = None,
        *,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        cwd: Path | None = None,
        wrapper: list[str] | None = None,
    ) -> None:
        self.root = root
        self.socket = root / "necrod.sock"
        self.state_dir = root / "state"
        self.config_path: Path | None = None
        if config is not None:
            self.config_path = root / "pools.yaml"
            self.config_path.write_text(config)
        self.log_path = root / "necrod.log"
        self.env = env
        self.args = args or []
        self.cwd = cwd or root
        #: A command that runs necrod (``setpriv ... --``), for a daemon with fewer privileges.
        self.wrapper = wrapper or []
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        cmd = [
            *self.wrapper,
            sys.executable,
            "-m",
            "necrod",
            "--socket",
            str(self.socket),
            "--state-dir",
            str(self.state_dir),
            "--log-format",
            "json",
            "--log-level",
            "debug",
        ]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        return cmd + self.args

    def start(self, *, wait: bool = True) -> Necrod:
        env = dict(os.environ if self.env is None else self.env)
        env.pop("NECROD_SOCKET", None)
        log = open(self.log_path, "ab")  # noqa: SIM115 (handed to the child)
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log, env=env, cwd=self.cwd)
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"necrod exited with {self.proc.returncode}:\n{self.log()}")
            with self.client(timeout=5) as c:
                status = c.status()
                pools = c.pools()["pools"]

            def settled(p: dict[str, Any]) -> bool:
                s = p["slots"]
                usable = s["available"] + s["allocated"] + s["cleaning"]
                return p["state"] == "ready" and s["creating"] == 0 and usable >= p["size"]["baseline"]

            return status if all(settled(p) for p in pools) else None

        return wait_for(ready, timeout, what="necrod to be ready")  # type: ignore[no-any-return]

    def client(self, timeout: float | None = 30.0) -> Client:
        return Client(self.socket, timeout=timeout)

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        with self.client() as c:
            return c.call(method, params)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def wait_slots(self, pool: str, state: str, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        def check() -> list[dict[str, Any]] | None:
            slots = self.call("slots.list", {"pool": pool})["slots"]
            matching = [s for s in slots if s["state"] == state]
            return slots if len(matching) == count else None

        return wait_for(check, timeout, what=f"{count} {state} slot(s) in {pool}")  # type: ignore[no-any-return]


def same_turn(d: Necrod, *calls: tuple[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Send each call on a connection of its own, all before reading any answer: the daemon reads
    them in one loop turn, so each runs while the others' commits are pending."""
    conns = [socket.socket(socket.AF_UNIX) for _ in calls]
    try:
        for conn in conns:
            conn.connect(str(d.socket))
        for conn, (method, params) in zip(conns, calls, strict=True):
            conn.sendall(
                json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode() + b"\n"
            )
        return [json.loads(conn.makefile().readline()) for conn in conns]
    finally:
        for conn in conns:
            conn.close()


#: Defaults every ``pool_config`` carries unless a test says otherwise: the ``slot_kind``
#: fixture sets ``isolation`` here, so one suite runs on both kinds of pool.
POOL_DEFAULTS: dict[str, Any] = {}


def pool_config(pools: dict[str, Path | str], **defaults: Any) -> str:
    defaults = {**POOL_DEFAULTS, **defaults}
    lines = []
    if defaults:
        lines.append("defaults:")
        lines += [f"  {k}: {json.dumps(v)}" for k, v in defaults.items()]
    lines.append("pools:")
    for name, url in pools.items():
        lines += [f"  {name}:", f"    repo_url: {url}"]
    return "\n".join(lines) + "\n"


def cleanup_dir(path: Path) -> None:
    """Remove a test's directory, overlay slots mounted in it first (a daemon killed with -9
    leaves its slots mounted)."""
    mounts = []
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split()[1] for line in f if line.split()[1].startswith(str(path) + "/")]
    except OSError:
        pass
    for mount in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], capture_output=True, check=False)
    shutil.rmtree(path, ignore_errors=True)


def delete_slot(path: str | os.PathLike[str]) -> None:
    """What an agent can do to its slot's directory: delete everything in it, and the directory
    itself, unless it is a mount point (an overlay slot's is)."""
    path = Path(path)
    if os.path.ismount(path):
        for entry in path.iterdir():
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    else:
        shutil.rmtree(path)
