"""The daemon as operators and clients meet it: the socket, bad input, instances, signals, systemd."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from necrod import __version__
from necrod.client import Client
from necrod.proto.errors import DaemonUnreachable, PermissionDenied
from tests.helpers import Necrod, make_origin, pool_config, wait_for

_open: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_raw_sockets() -> Any:
    yield
    while _open:
        _open.pop().close()


def raw(path: Path, timeout: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    _open.append(s)
    s.settimeout(timeout)
    s.connect(str(path))
    return s


def read_line(s: socket.socket) -> dict[str, Any] | None:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            return None
        buf += chunk
    return json.loads(buf)  # type: ignore[no-any-return]


def ask(s: socket.socket, data: bytes) -> dict[str, Any] | None:
    s.sendall(data)
    return read_line(s)


def test_hello_and_status(necrod: Necrod) -> None:
    with necrod.client() as c:
        hello = c.hello("tests")
        assert hello["server"] == "necrod" and hello["protocol"] == 1 and hello["version"] == __version__
        assert "slots.allocate" in hello["methods"]
        status = c.status()
    assert status["state"] == "running" and status["pid"] == necrod.proc.pid  # type: ignore[union-attr]
    assert status["config"]["generation"] == 1 and status["config"]["path"] == str(necrod.config_path)
    assert status["pools"]["repo"]["slots"]["available"] == 2
    assert status["uptime_s"] > 0


def test_protocol_version_mismatch_is_refused(necrod: Necrod) -> None:
    s = raw(necrod.socket)
    reply = ask(s, b'{"jsonrpc":"2.0","id":1,"method":"hello","params":{"protocol":99}}\n')
    assert reply is not None and reply["error"]["data"]["kind"] == "unsupported_protocol"


BAD_INPUTS = [
    (b"this is not json\n", "parse_error"),
    (b"\xc3\x28 invalid utf-8\n", "parse_error"),
    (b'[{"jsonrpc":"2.0","id":1,"method":"hello"}]\n', "invalid_request"),
    (b'"just a string"\n', "invalid_request"),
    (b'{"jsonrpc":"2.0","id":1,"method":"no.such.method"}\n', "method_not_found"),
    (b'{"jsonrpc":"2.0","id":1,"method":"slots.allocate","params":{}}\n', "invalid_params"),
    (b'{"jsonrpc":"2.0","id":1,"method":"slots.allocate","params":{"pool":7}}\n', "invalid_params"),
    (b'{"jsonrpc":"2.0","id":1,"method":"slots.allocate","params":{"pool":"-x"}}\n', "invalid_params"),
    (b'{"jsonrpc":"2.0","id":1,"method":"slots.allocate","params":{"pool":"nope"}}\n', "not_found"),
    (b'{"jsonrpc":"2.0","id":1,"method":"slots.heartbeat","params":{"lease_id":"l-0"}}\n', "not_found"),
    (b'{"jsonrpc":"2.0","id":1,"method":"hello","params":{"x":NaN}}\n', "invalid_request"),
    (b'{"jsonrpc":"2.0","id":1,"method":"hello","id":2}\n', "invalid_request"),
    (b'{"jsonrpc":"2.0","id":1,"method":"hello","params":{"client":"\\ud800"}}\n', "invalid_request"),
    (b'{"jsonrpc":"2.0","id":1,"method":"hello","params":' + b"[" * 100_000 + b"\n", "invalid_request"),
]


def test_bad_input_gets_an_error_and_the_daemon_keeps_serving(necrod: Necrod) -> None:
    bystander = necrod.client()
    bystander.connect()
    s = raw(necrod.socket)
    for line, kind in BAD_INPUTS:
        reply = ask(s, line)
        assert reply is not None, line[:60]
        assert reply["jsonrpc"] == "2.0" and reply["error"]["data"]["kind"] == kind, (line[:60], reply)
        assert bystander.status()["state"] == "running"
    # The same connection still works after all of that.
    ok = ask(s, b'{"jsonrpc":"2.0","id":"last","method":"daemon.status"}\n')
    assert ok is not None and ok["id"] == "last" and ok["result"]["state"] == "running"
    bystander.close()


def test_an_over_long_line_closes_only_that_connection(necrod: Necrod) -> None:
    other = necrod.client()
    other.connect()
    s = raw(necrod.socket)
    s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"hello","params":{"client":"' + b"x" * (2 << 20))
    reply = read_line(s)
    assert reply is not None and reply["error"]["data"]["kind"] == "invalid_request"
    assert "longer than" in reply["error"]["message"]
    s.settimeout(5)
    rest = b""
    try:
        while chunk := s.recv(65536):
            rest += chunk
    except ConnectionResetError:
        pass
    assert b"\n" not in rest  # closed, with no further reply
    assert other.status()["state"] == "running"
    other.close()


def test_pipelined_requests_are_answered_in_order(necrod: Necrod) -> None:
    s = raw(necrod.socket)
    s.sendall(b"".join(b'{"jsonrpc":"2.0","id":%d,"method":"daemon.status"}\n' % i for i in range(200)))
    ids = []
    buf = b""
    while len(ids) < 200:
        buf += s.recv(1 << 20)
        *lines, buf = buf.split(b"\n")
        ids += [json.loads(line)["id"] for line in lines]
    assert ids == list(range(200))


def test_notifications_get_no_reply(necrod: Necrod) -> None:
    s = raw(necrod.socket)
    s.sendall(b'{"jsonrpc":"2.0","method":"daemon.status"}\n{"jsonrpc":"2.0","id":9,"method":"hello"}\n')
    reply = read_line(s)
    assert reply is not None and reply["id"] == 9


def test_a_client_that_stalls_mid_line_is_disconnected(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    d = necrod_factory("daemon:\n  read_timeout_s: 0.5\n" + pool_config({"repo": origin}, min_idle=0))
    s = raw(d.socket)
    s.sendall(b'{"jsonrpc":"2.0","id":1,"me')
    started = time.monotonic()
    assert s.recv(100) == b""
    assert time.monotonic() - started < 5
    idle = raw(d.socket)  # an idle connection (no partial line) is left alone
    time.sleep(1.0)
    assert ask(idle, b'{"jsonrpc":"2.0","id":1,"method":"hello"}\n') is not None


def test_second_instance_is_refused_and_the_first_keeps_serving(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    first = necrod_factory(pool_config({"repo": origin}, min_idle=0), name="first")
    # Same socket, other state directory: refused on the socket lock.
    second = Necrod(
        first.root, None, args=["--config", str(first.config_path), "--state-dir", str(first.root / "other")]
    )
    result = subprocess.run(second.command(), capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert f"pid {first.proc.pid}" in result.stderr and "already running" in result.stderr  # type: ignore[union-attr]
    # Same state directory, other socket: refused on the state lock.
    third = subprocess.run(
        [
            sys.executable,
            "-m",
            "necrod",
            "--config",
            str(first.config_path),
            "--state-dir",
            str(first.state_dir),
            "--socket",
            str(first.root / "other.sock"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert third.returncode != 0 and f"pid {first.proc.pid}" in third.stderr  # type: ignore[union-attr]
    assert first.socket.is_socket()
    with first.client() as c:
        assert c.status()["pid"] == first.proc.pid  # type: ignore[union-attr]


def test_sigterm_exits_zero_within_the_grace(necrod_factory: Callable[..., Necrod], origin: Path) -> None:
    d = necrod_factory(
        "daemon:\n  shutdown_grace_s: 3\n" + pool_config({"repo": origin}, min_idle=0, max_slots=2)
    )
    waiting = d.client()
    with d.client() as c:
        c.allocate("repo")
        c.allocate("repo")
    # A caller queued for a slot is answered, not dropped, when the daemon stops.
    import threading

    outcome: list[Any] = []

    def wait_for_slot() -> None:
        try:
            outcome.append(waiting.allocate("repo", wait_s=60))
        except Exception as exc:
            outcome.append(exc)

    t = threading.Thread(target=wait_for_slot)
    t.start()
    time.sleep(0.5)
    started = time.monotonic()
    assert d.terminate(timeout=15) == 0
    assert time.monotonic() - started < 5
    t.join(5)
    waiting.close()
    assert outcome and getattr(outcome[0], "kind", None) == "unavailable", outcome
    assert not d.socket.exists()


def python_for(uid: int) -> str | None:
    """A Python interpreter that ``uid`` may run (the venv's may sit under a private home)."""
    for exe in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        try:
            if subprocess.run([exe, "-c", "pass"], user=uid, group=uid, capture_output=True).returncode == 0:
                return exe
        except OSError:
            continue
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as a throwaway uid")
def test_a_peer_with_another_uid_is_refused(necrod: Necrod) -> None:
    # Loosen the file modes on purpose: SO_PEERCRED must refuse even then.
    for p in (necrod.root.parent, necrod.root, necrod.socket):
        os.chmod(p, 0o777)
    code = (
        "import json, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
        's.sendall(b\'{"jsonrpc":"2.0","id":1,"method":"daemon.status"}\\n\')\n'
        "data = b''\n"
        "while True:\n"
        "    chunk = s.recv(65536)\n"
        "    if not chunk: break\n"
        "    data += chunk\n"
        "print(data.decode())\n"
    )
    python = python_for(65534)
    if python is None:
        pytest.skip("no Python interpreter the throwaway uid may run")
    result = subprocess.run(
        [python, "-c", code, str(necrod.socket)],
        capture_output=True,
        text=True,
        user=65534,
        group=65534,
        timeout=20,
    )
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout.strip().splitlines()[0])
    assert reply["error"]["data"]["kind"] == "permission_denied" and "uid 65534" in reply["error"]["message"]
    with necrod.client() as c:
        assert c.status()["state"] == "running"


def test_client_raises_the_error_class_of_each_kind(necrod: Necrod) -> None:
    with necrod.client() as c:
        with pytest.raises(Exception) as info:
            c.allocate("nope")
        assert type(info.value).__name__ == "NotFound"
    with pytest.raises(DaemonUnreachable):
        Client(necrod.root / "nothing.sock").status()
    assert PermissionDenied.kind == "permission_denied"


def test_check_config(workdir: Path, origin: Path) -> None:
    good = workdir / "good.yaml"
    good.write_text(pool_config({"repo": origin}))
    r = subprocess.run(
        [sys.executable, "-m", "necrod", "--check-config", str(good)], capture_output=True, text=True
    )
    assert r.returncode == 0 and "ok (1 pool(s): repo)" in r.stdout
    bad = workdir / "bad.yaml"
    bad.write_text(f"pools:\n  repo:\n    repo_url: {origin}\n    slots: -1\n")
    r = subprocess.run(
        [sys.executable, "-m", "necrod", "--check-config", str(bad)], capture_output=True, text=True
    )
    assert r.returncode == 1 and f"{bad}:4:12:" in r.stderr and "between 1 and" in r.stderr


def test_embedded_default_serves_the_repository_it_starts_in(workdir: Path) -> None:
    repo = make_origin(workdir / "my-repo")
    (repo / "deep" / "er").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NECROD_", "XDG_"))}
    env.update(HOME=str(workdir / "home"), XDG_RUNTIME_DIR=str(workdir / "run"))
    d = Necrod(workdir / "embedded", env=env, cwd=repo / "deep" / "er")
    d.root.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "necrod", "--log-format", "json"],
        cwd=repo / "deep" / "er",
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        socket_path = workdir / "run" / "necrod" / "necrod.sock"
        wait_for(lambda: socket_path.exists(), 20, what="the socket")
        c = Client(socket_path)
        wait_for(lambda: c.status()["pools"]["my-repo"]["slots"]["available"] == 2, 30, what="2 slots")
        assert (workdir / "home" / ".local" / "state" / "necrod" / "necrod.db").exists()
        lease = c.allocate("my-repo")
        assert (Path(lease["path"]) / "README").read_text() == "origin, second commit\n"
        c.close()
        # The banner tells how to reach it.
        ctl = subprocess.run(
            [sys.executable, "-m", "necrod.ctl.main", "status"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert ctl.returncode == 0 and "my-repo" in ctl.stdout
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert "serving pool 'my-repo' (2 slots)" in err and "necroctl status" in err
    assert proc.returncode == 0


def test_no_config_outside_a_repository_is_a_clear_error(workdir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NECROD_", "XDG_"))}
    env.update(HOME=str(workdir), XDG_RUNTIME_DIR=str(workdir / "run"))
    r = subprocess.run(
        [sys.executable, "-m", "necrod"], cwd="/", env=env, capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 1 and "not inside a git repository" in r.stderr and "Traceback" not in r.stderr


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        _open.append(self.sock)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                return self.messages


def test_systemd_notifications(necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path) -> None:
    notify = NotifySocket(workdir / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(workdir / "notify.sock"), "WATCHDOG_USEC": "400000"}
    d = necrod_factory(pool_config({"repo": origin}, min_idle=0), env=env)
    assert d.proc is not None
    wait_for(lambda: any("READY=1" in m for m in notify.drain()), 10, what="READY=1")
    wait_for(lambda: sum("WATCHDOG=1" in m for m in notify.drain()) >= 3, 10, what="watchdog pings")
    d.proc.send_signal(1)  # SIGHUP: reload
    wait_for(
        lambda: any("RELOADING=1" in m and "MONOTONIC_USEC=" in m for m in notify.drain()),
        10,
        what="RELOADING",
    )
    assert d.terminate() == 0
    assert any("STOPPING=1" in m for m in notify.drain())
