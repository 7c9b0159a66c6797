"""systemd's native journal protocol: one datagram per entry to ``/run/systemd/journal/socket``,
no package needed (``sd_journal_sendv``, written out).

An entry is fields ``NAME=value``, one per line; a value with a newline in it is sent as
``NAME\\n``, its length as 64-bit little-endian, the value, ``\\n``. An entry too big for one
datagram goes in a sealed memfd whose descriptor is passed instead (``SCM_RIGHTS``), as
journald requires.

Field names are what journald accepts: upper-case letters, digits and ``_``, not starting with
``_`` (those are the journal's own, trusted fields), at most 64 characters. ``field_name`` maps a
log key to one.

Error handling: ``send`` never blocks (a full socket buffer is ``BlockingIOError``) and raises
``OSError`` when the journal cannot take the entry; the caller decides what to do instead.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import re
import socket
import struct
from collections.abc import Iterable
from pathlib import Path

SOCKET = Path("/run/systemd/journal/socket")
#: Fields of the journal's own that a log key must not stand in for.
RESERVED = frozenset({
    "MESSAGE", "MESSAGE_ID", "PRIORITY", "CODE_FILE", "CODE_LINE", "CODE_FUNC", "ERRNO",
    "INVOCATION_ID", "USER_INVOCATION_ID", "SYSLOG_FACILITY", "SYSLOG_IDENTIFIER", "SYSLOG_PID",
    "SYSLOG_TIMESTAMP", "SYSLOG_RAW", "DOCUMENTATION", "TID", "UNIT", "USER_UNIT",
})  # fmt: skip
_NOT_ALLOWED = re.compile(r"[^A-Z0-9_]")
_SEALS = ("F_SEAL_SHRINK", "F_SEAL_GROW", "F_SEAL_WRITE", "F_SEAL_SEAL")


def field_name(key: str, prefix: str = "NECROD_") -> str:
    """A log key as a journal field: ``lease_id`` → ``LEASE_ID``; characters a field may not
    have become ``_``; a key that is one of the journal's own fields (``message``, ``errno``, ...)
    or does not start with a letter gets ``prefix``."""
    name = _NOT_ALLOWED.sub("_", key.upper()).lstrip("_")
    if not name or name in RESERVED or not name[0].isalpha():
        name = prefix + name
    return name[:64]


def encode(fields: Iterable[tuple[str, str]]) -> bytes:
    out = bytearray()
    for name, value in fields:
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


class Journal:
    """A connection-less sender to the journal's socket."""

    def __init__(self, path: Path = SOCKET) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)

    @classmethod
    def open(cls, path: Path = SOCKET) -> Journal | None:
        """A sender, or None when no journal listens at ``path``."""
        try:
            if not path.is_socket():
                return None
        except OSError:
            return None
        return cls(path)

    def send(self, fields: Iterable[tuple[str, str]]) -> None:
        data = encode(fields)
        try:
            self._sock.sendto(data, str(self.path))
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_memfd(data)

    def _send_memfd(self, data: bytes) -> None:
        fd = os.memfd_create("necrod-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            seals = 0
            for seal in _SEALS:
                seals |= getattr(fcntl, seal)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            self._sock.sendmsg([], rights, 0, str(self.path))
        finally:
            os.close(fd)

    def close(self) -> None:
        self._sock.close()
