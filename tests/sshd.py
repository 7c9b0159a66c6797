"""A small real SSH server for tests (asyncssh), standing in for a host's sshd.

``python -m tests.sshd --port P --host-key KEY --authorized-keys KEYS [--ready FILE]``

It accepts public keys only, runs exec requests with ``/bin/sh -c`` as the current user, and
forwards direct-streamlocal channels to local Unix sockets — what OpenSSH's sshd does for
``ssh host cmd`` and ``ssh -L local:/remote.sock``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import asyncssh


class Server(asyncssh.SSHServer):
    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def unix_connection_requested(self, dest_path: str) -> bool:
        return True


async def run_command(process: asyncssh.SSHServerProcess[bytes]) -> None:
    command = process.command or "exec sh"
    proc = await asyncio.create_subprocess_exec(
        "/bin/sh", "-c", command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=os.environ.copy(),
    )  # fmt: skip
    await process.redirect(stdin=proc.stdin, stdout=proc.stdout, stderr=proc.stderr)
    process.exit(await proc.wait())


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host-key", required=True)
    p.add_argument("--authorized-keys", required=True)
    p.add_argument("--ready")
    args = p.parse_args()
    await asyncssh.create_server(
        Server, "127.0.0.1", args.port, server_host_keys=[args.host_key],
        authorized_client_keys=args.authorized_keys, process_factory=run_command, encoding=None,
        allow_scp=False, agent_forwarding=False, x11_forwarding=False,
    )  # fmt: skip
    if args.ready:
        Path(args.ready).write_text(str(os.getpid()))
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
