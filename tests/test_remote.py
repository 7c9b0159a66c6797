"""necroctl and the clients reaching a necrod on another host through SSH."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from necrod.client import AsyncClient, Client
from necrod.proto.errors import DaemonUnreachable, NotFound
from tests.helpers import Necrod
from tests.sshhelpers import Keys, SSHHost, free_port


@pytest.fixture
def keys(workdir: Path) -> Keys:
    return Keys.make(workdir / "keys")


@pytest.fixture
def host(workdir: Path, keys: Keys) -> Iterator[SSHHost]:
    h = SSHHost(workdir / "host", keys).start()
    yield h
    h.kill()


def ctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "necrod.ctl.main", *args], capture_output=True, text=True,
                          timeout=60, env=env)  # fmt: skip


def test_necroctl_over_ssh_answers_as_the_local_socket(
    necrod: Necrod, host: SSHHost, keys: Keys, workdir: Path
) -> None:
    known = host.known_hosts(workdir / "known_hosts")
    ssh = ["-H", host.url(necrod.socket), "--ssh-key", str(keys.client_key), "--known-hosts", str(known)]
    local = json.loads(ctl("--socket", str(necrod.socket), "pools", "--json").stdout)
    remote = ctl(*ssh, "pools", "--json")
    assert remote.returncode == 0, remote.stderr
    assert json.loads(remote.stdout) == local
    status = ctl(*ssh, "status")
    assert status.returncode == 0 and "running" in status.stdout
    lease = json.loads(ctl(*ssh, "allocate", "repo", "--json").stdout)
    assert Path(lease["path"]).is_dir()
    assert ctl(*ssh, "release", lease["lease_id"]).returncode == 0
    missing = ctl(*ssh, "allocate", "nope")
    assert missing.returncode == 1 and "not_found" in missing.stderr
    env = {**os.environ, "NECROD_HOST": host.url(necrod.socket)}
    via_env = ctl("--ssh-key", str(keys.client_key), "--known-hosts", str(known), "status", "--json", env=env)
    assert json.loads(via_env.stdout)["pid"] == necrod.proc.pid  # type: ignore[union-attr]


def test_the_python_clients_take_the_same_url(
    necrod: Necrod, host: SSHHost, keys: Keys, workdir: Path
) -> None:
    options = {"key": str(keys.client_key), "known_hosts": str(host.known_hosts(workdir / "kh"))}
    with Client(host.url(necrod.socket), ssh_options=options) as c:
        lease = c.allocate("repo", holder="remote-agent")
        assert c.heartbeat(lease["lease_id"])["lease_id"] == lease["lease_id"]
        with pytest.raises(NotFound):
            c.allocate("nope")
        c.release(lease["lease_id"])

    async def main() -> None:
        async with AsyncClient(host.url(necrod.socket), ssh_options=options) as c:
            status = await c.status()
            assert status["pools"]["repo"]["state"] == "ready"

    anyio.run(main)


def test_failures_are_clear(necrod: Necrod, host: SSHHost, keys: Keys, workdir: Path) -> None:
    known = str(host.known_hosts(workdir / "known_hosts"))
    empty = workdir / "empty_known_hosts"
    empty.write_text("")
    cases = [
        (["-H", host.url(necrod.socket), "--ssh-key", str(keys.client_key), "--known-hosts", str(empty)],
         "is not trusted"),
        (["-H", host.url(necrod.socket), "--ssh-key", str(keys.other_key), "--known-hosts", known],
         "refused our keys"),
        (["-H", host.url("/nowhere/necrod.sock"), "--ssh-key", str(keys.client_key), "--known-hosts", known],
         "no necrod answers at /nowhere/necrod.sock"),
        (["-H", f"ssh://127.0.0.1:{free_port()}/x.sock", "--ssh-key", str(keys.client_key), "--known-hosts", known],
         "cannot reach"),
        (["-H", "ssh://-oProxyCommand=touch%20/tmp/pwned/x", "--known-hosts", known], "may not start with '-'"),
    ]  # fmt: skip
    for args, message in cases:
        r = ctl(*args, "status")
        assert r.returncode == 3 and message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert not Path("/tmp/pwned").exists()
    # An unknown key is accepted only when the operator says so.
    ok = ctl("-H", host.url(necrod.socket), "--ssh-key", str(keys.client_key), "--known-hosts", str(empty),
             "--accept-unknown-host-key", "status")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    with pytest.raises(DaemonUnreachable, match="not trusted"):
        Client(
            host.url(necrod.socket), ssh_options={"key": str(keys.client_key), "known_hosts": str(empty)}
        ).status()
