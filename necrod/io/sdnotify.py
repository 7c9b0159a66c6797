"""The systemd notification protocol: a datagram to ``$NOTIFY_SOCKET`` (DESIGN.md, trap 6).

Ten lines over a socket, no package: READY, STATUS, STOPPING, RELOADING with MONOTONIC_USEC
(what ``Type=notify-reload`` requires), and WATCHDOG pings. Without ``$NOTIFY_SOCKET`` every
call does nothing.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping


class Notifier:
    def __init__(self, env: Mapping[str, str] = os.environ) -> None:
        address = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._watchdog_usec = 0
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and (not pid or pid == str(os.getpid())):
            self._watchdog_usec = int(usec)

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG pings (half the timeout systemd gave), or None."""
        return self._watchdog_usec / 2e6 if self._watchdog_usec and self.enabled else None

    def send(self, **fields: str) -> bool:
        if not self._address:
            return False
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items()).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            try:
                sock.sendto(message, self._address)
            except OSError:
                return False
        return True

    def ready(self, status: str) -> None:
        self.send(ready="1", status=status)

    def status(self, status: str) -> None:
        self.send(status=status)

    def reloading(self) -> None:
        self.send(reloading="1", monotonic_usec=str(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000))

    def stopping(self) -> None:
        self.send(stopping="1", status="stopping")

    def watchdog(self) -> None:
        self.send(watchdog="1")
