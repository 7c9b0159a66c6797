"""Fixtures and fault seams for the reliability suite (docs/reliability.md).

The daemon always runs for real (``tests.helpers.Necrod``) against real git repositories. The
only fake is the git seam below: a shell script that the daemon runs as its git
(``daemon.git``) and that delegates to the real git, unless a trigger file tells it to hang,
to be killed part-way, or to fail like a full disk, for one verb.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Necrod, cleanup_dir, make_origin, pool_config, short_tmpdir, wait_for

#: NECROD_LONG=1 turns the bounded CI run into the long run (more rounds, more examples).
LONG = os.environ.get("NECROD_LONG", "") not in ("", "0")

REAL_GIT = "/usr/bin/git"


def scaled(default: int, long: int) -> int:
    """``default`` in the bounded run, ``long`` with NECROD_LONG=1."""
    return long if LONG else default


#: What the suite did, for docs/reliability.md: printed at the end of every run that used it.
FIGURES: Counter[str] = Counter()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("necrod reliability figures" + (" (NECROD_LONG=1)" if LONG else ""))
        for name, value in sorted(FIGURES.items()):
            terminalreporter.write_line(f"{name}: {value}")


# --- configuration ----------------------------------------------------------------------------


def daemon_config(pools: dict[str, Path | str], daemon: dict[str, Any] | None = None, **defaults: Any) -> str:
    """pools.yaml text: a ``daemon:`` section (if any) followed by ``pool_config``."""
    text = ""
    if daemon:
        text = "daemon:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in daemon.items())
    return text + pool_config(pools, **defaults)


def workspaces_of(d: Necrod) -> Path:
    return Path(d.call("daemon.status")["workspaces"])


def slots_by_id(d: Necrod, pool: str = "repo") -> dict[str, dict[str, Any]]:
    return {s["slot_id"]: s for s in d.call("slots.list", {"pool": pool})["slots"]}


def wait_settled(d: Necrod, pool: str = "repo", timeout: float = 60.0) -> dict[str, dict[str, Any]]:
    """Wait until no slot of ``pool`` is being created or cleaned; return the slots."""

    def settled() -> dict[str, dict[str, Any]] | None:
        slots = slots_by_id(d, pool)
        busy = [s for s in slots.values() if s["state"] in ("creating", "cleaning", "removing")]
        return None if busy else slots

    return wait_for(settled, timeout, interval=0.1, what=f"pool {pool} to settle")  # type: ignore[no-any-return]


def index_locks(workspaces: Path) -> list[Path]:
    """Lock files a killed git leaves in a worktree's admin directory."""
    return sorted(workspaces.glob("*/mirror.git/worktrees/*/index.lock"))


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def raise_nofile(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


def alive(pid: int) -> bool:
    """Running (a killed child nobody reaped yet is a zombie, not alive)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    return state != "Z"


# --- the git seam -----------------------------------------------------------------------------

_SEAM_SCRIPT = r"""#!/bin/sh
# necrod's git for the reliability tests: the real git, unless a trigger file in SEAM names the
# verb of this call. Triggers hold "once ARG" (removed when it fires) or "always ARG":
#   hang-VERB   sleep until the process group is killed (pids appended to SEAM/hung)
#   die-VERB    start the real git, SIGKILL it after ARG seconds, then die by SIGKILL too
#   fail-VERB   print ARG on stderr, as git would, and exit 128
#   after-VERB  run the real git, then the shell command ARG in git's directory; git's status
seam=@SEAM@
real=@REAL@
verb=
skip=
for arg in "$@"; do
    if [ -n "$skip" ]; then skip=; continue; fi
    case $arg in
        -c) skip=1 ;;
        -*) ;;
        *) verb=$arg; break ;;
    esac
done
printf '%s\0' "$$" "$verb" "$@" "@END@" >> "$seam/calls"
if [ -e "$seam/dump-env" ]; then env -0 > "$seam/env.$$"; fi
fire() {
    how=; arg=
    read -r how arg < "$1" || true
    if [ "$how" = once ]; then
        mv "$1" "$1.fired.$$" 2>/dev/null || return 1
    else
        : > "$1.fired.$$"
    fi
    return 0
}
if [ -n "$verb" ]; then
    if [ -e "$seam/hang-$verb" ] && fire "$seam/hang-$verb"; then
        echo "$$" >> "$seam/hung"
        sleep 3600 &
        echo "$!" >> "$seam/hung"
        wait
        exit 1
    fi
    if [ -e "$seam/die-$verb" ] && fire "$seam/die-$verb"; then
        "$real" "$@" &
        pid=$!
        sleep "${arg:-0}"
        kill -KILL "$pid" 2>/dev/null
        wait "$pid"
        kill -KILL $$
    fi
    if [ -e "$seam/fail-$verb" ] && fire "$seam/fail-$verb"; then
        echo "$arg" >&2
        exit 128
    fi
    if [ -e "$seam/after-$verb" ] && fire "$seam/after-$verb"; then
        "$real" "$@"
        status=$?
        sh -c "$arg"
        exit $status
    fi
fi
exec "$real" "$@"
"""


@dataclass(frozen=True, slots=True)
class GitCall:
    pid: int
    verb: str
    argv: list[str]


class GitSeam:
    """The daemon's git (``daemon.git: seam.path``) with triggers; see ``_SEAM_SCRIPT``."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "git"
        script = _SEAM_SCRIPT.replace("@SEAM@", str(directory)).replace("@REAL@", REAL_GIT)
        self.path.write_text(script)
        self.path.chmod(0o755)

    def _trigger(self, mode: str, verb: str, once: bool, arg: str) -> None:
        (self.dir / f"{mode}-{verb}").write_text(f"{'once' if once else 'always'} {arg}\n")

    def hang(self, verb: str, *, once: bool = False) -> None:
        self._trigger("hang", verb, once, "")

    def die(self, verb: str, *, after: float = 0.0, once: bool = True) -> None:
        self._trigger("die", verb, once, f"{after:g}")

    def fail(self, verb: str, message: str, *, once: bool = False) -> None:
        self._trigger("fail", verb, once, message)

    def after(self, verb: str, command: str, *, once: bool = True) -> None:
        """Run ``command`` (sh) where git ran, once a ``verb`` call of it has ended."""
        self._trigger("after", verb, once, command)

    def clear(self) -> None:
        for mode in ("hang", "die", "fail", "after"):
            for p in self.dir.glob(f"{mode}-*"):
                if ".fired." not in p.name:
                    p.unlink(missing_ok=True)

    def fired(self, mode: str, verb: str) -> int:
        return len(list(self.dir.glob(f"{mode}-{verb}.fired.*")))

    def calls(self) -> list[GitCall]:
        try:
            raw = (self.dir / "calls").read_bytes()
        except FileNotFoundError:
            return []
        out = []
        fields: list[str] = []
        for field in raw.split(b"\0")[:-1]:
            text = field.decode("utf-8", "replace")
            if text == "@END@":
                out.append(GitCall(int(fields[0]), fields[1], fields[2:]))
                fields = []
            else:
                fields.append(text)
        return out

    def hung_pids(self) -> list[int]:
        try:
            return [int(x) for x in (self.dir / "hung").read_text().split()]
        except FileNotFoundError:
            return []

    def environments(self) -> list[dict[str, str]]:
        envs = []
        for p in sorted(self.dir.glob("env.*")):
            pairs = [e.split("=", 1) for e in p.read_bytes().decode("utf-8", "replace").split("\0") if e]
            envs.append(dict(pair for pair in pairs if len(pair) == 2))
        return envs


# --- raw sockets --------------------------------------------------------------------------------


class Raw:
    """A bare connection to the daemon's socket, for bytes no client library would send."""

    def __init__(self, path: Path, timeout: float = 20.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.buf = b""
        try:
            # Blocking connect: with a timeout set, a full listen backlog is EAGAIN at once.
            self.sock.connect(str(path))
        except BaseException:
            self.sock.close()
            raise
        self.sock.settimeout(timeout)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> dict[str, Any] | None:
        """The next reply line, decoded; None when the daemon closed the connection."""
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(1 << 16)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)  # type: ignore[no-any-return]

    def ask(self, data: bytes) -> dict[str, Any] | None:
        self.send(data)
        return self.line()

    def closed_by_peer(self, timeout: float = 10.0) -> bool:
        """Whether the daemon closes the connection within ``timeout`` (reading and discarding)."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(1 << 16):
                pass
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def request(method: str, params: dict[str, Any] | None = None, id: Any = 1) -> bytes:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": id, "method": method}
    if params is not None:
        msg["params"] = params
    return json.dumps(msg).encode() + b"\n"


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def seam(workdir: Path) -> Iterator[GitSeam]:
    s = GitSeam(workdir / "seam")
    yield s
    FIGURES["git processes killed, hung or failed on purpose"] += len(list(s.dir.glob("*-*.fired.*")))


@pytest.fixture
def marker_dir() -> Iterator[Path]:
    """Where injected commands would leave their marker files."""
    path = short_tmpdir()
    yield path
    cleanup_dir(path)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small tmpfs at ``path`` (root only), unmounted on the way out whatever happened."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip()}")
    try:
        yield path
    finally:
        deadline = time.monotonic() + 10
        while subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                subprocess.run(["umount", "-l", str(path)], capture_output=True)
                break
            time.sleep(0.2)


def fill(directory: Path, leave: int = 0) -> Path:
    """Fill the file system holding ``directory`` up to ``leave`` free bytes; returns the filler."""
    filler = directory / "filler"
    chunk = b"\0" * (1 << 16)
    with open(filler, "wb", buffering=0) as f:
        while True:
            st = os.statvfs(directory)
            free = st.f_bavail * st.f_frsize
            if free <= leave:
                break
            try:
                f.write(chunk[: max(1, min(len(chunk), free - leave))])
            except OSError:
                break
    return filler


@pytest.fixture(scope="module")
def module_daemon() -> Iterator[Callable[..., Necrod]]:
    """One daemon (or a few) shared by a module's tests: hostile input runs against a daemon that
    has already seen everything the tests before sent it."""
    started: list[Necrod] = []
    roots: list[Path] = []

    def make(config: Callable[[Path], str], *, files: int = 24, **kwargs: Any) -> Necrod:
        root = short_tmpdir()
        roots.append(root)
        origin = make_origin(root / "origin", files=files)
        (root / "d").mkdir()
        d = Necrod(root / "d", config(origin), **kwargs)
        started.append(d)
        d.start()
        return d

    yield make
    for d in started:
        d.stop()
    for root in roots:
        cleanup_dir(root)
