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
    """Run the command in the login's home, as sshd does; all output is sent before the exit
    status, and a command whose channel the client closes is ended."""
    command = process.command or "exec sh"
    proc = await asyncio.create_subprocess_exec(
        "/bin/sh", "-c", command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=os.environ.copy(), cwd=os.path.expanduser("~"), start_new_session=True,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None

    async def feed() -> None:
        try:
            while data := await process.stdin.read(65536):
                proc.stdin.write(data)
                await proc.stdin.drain()
        except (asyncssh.Error, ConnectionError, BrokenPipeError):
            pass
        finally:
            proc.stdin.close()

    async def pump(source: asyncio.StreamReader, sink: asyncssh.SSHWriter[bytes]) -> None:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()

    async def hang_up() -> None:
        await process.wait_closed()
        try:
            os.killpg(proc.pid, 9)  # the client closed the channel
        except ProcessLookupError:
            pass

    feeding = asyncio.ensure_future(feed())
    closing = asyncio.ensure_future(hang_up())
    try:
        await asyncio.gather(pump(proc.stdout, process.stdout), pump(proc.stderr, process.stderr))
        status = await proc.wait()
        process.exit(status)
    except (asyncssh.Error, ConnectionError, BrokenPipeError):
        try:
            os.killpg(proc.pid, 9)  # the client went away: so does the command
        except ProcessLookupError:
            pass
    finally:
        feeding.cancel()
        closing.cancel()


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
