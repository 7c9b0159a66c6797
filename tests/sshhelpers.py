"""Hosts on this one machine, reached over a real SSH server on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import asyncssh

ROOT = Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Keys:
    client_key: Path
    authorized_keys: Path
    other_key: Path  # a key the servers do not accept

    @classmethod
    def make(cls, directory: Path) -> Keys:
        directory.mkdir(parents=True, exist_ok=True)
        client = asyncssh.generate_private_key("ssh-ed25519")
        other = asyncssh.generate_private_key("ssh-ed25519")
        (directory / "id_client").write_bytes(client.export_private_key())
        (directory / "id_client").chmod(0o600)
        (directory / "id_other").write_bytes(other.export_private_key())
        (directory / "id_other").chmod(0o600)
        (directory / "authorized_keys").write_bytes(client.export_public_key())
        return cls(directory / "id_client", directory / "authorized_keys", directory / "id_other")


class SSHHost:
    """A real SSH server (tests/sshd.py) in its own process, on a loopback port."""

    def __init__(self, directory: Path, keys: Keys) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.keys = keys
        self.port = free_port()
        key = asyncssh.generate_private_key("ssh-ed25519")
        self.host_key = directory / "host_key"
        self.host_key.write_bytes(key.export_private_key())
        self.host_key.chmod(0o600)
        self.public_line = f"[127.0.0.1]:{self.port} " + key.export_public_key().decode().strip()
        self.proc: subprocess.Popen[bytes] | None = None

    def known_hosts(self, path: Path) -> Path:
        with path.open("a") as f:
            f.write(self.public_line + "\n")
        return path

    def start(self) -> SSHHost:
        ready = self.dir / "ready"
        ready.unlink(missing_ok=True)
        (self.dir / "home").mkdir(exist_ok=True)
        log = open(self.dir / "sshd.log", "ab")  # noqa: SIM115 (handed to the child)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.sshd", "--port", str(self.port), "--host-key", str(self.host_key),
             "--authorized-keys", str(self.keys.authorized_keys), "--ready", str(ready)],
            cwd=ROOT, stdout=log, stderr=log, start_new_session=True,
            env={**os.environ, "HOME": str(self.dir / "home")},  # a login of its own, as on another host
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 20
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"sshd did not start: {(self.dir / 'sshd.log').read_text()}")
            time.sleep(0.05)
        return self

    def kill(self) -> None:
        """The host dies: its sshd, and every process started through it."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)

    def url(self, socket_path: Path | str, user: str | None = None) -> str:
        who = f"{user}@" if user else ""
        return f"ssh://{who}127.0.0.1:{self.port}{socket_path}"
