"""Logging: structlog; readable on a terminal, JSON lines otherwise, native entries in the journal.

Three formats (``--log-format``; by default the first that applies):

- ``journal``, when stderr is the journal (``$JOURNAL_STREAM`` names it: necrod runs under
  systemd). journald stamps each entry with its own time and priority, so the message carries
  neither: it is the event name and its ``key=value`` pairs. Each entry goes to the journal
  over its native protocol (``necrod.io.journal``) with ``PRIORITY=``,
  ``SYSLOG_IDENTIFIER=necrod``, ``EVENT=`` (the event name) and one field per key, so
  ``journalctl -u necrod POOL=repo`` or ``-p warning`` filter on them (docs/operations.md has the
  mapping). When the journal's socket cannot take an entry, the same message goes to stderr
  with a ``<N>`` priority prefix (journald reads that too, without the fields).
- ``console``, on a terminal: colours unless ``$NO_COLOR`` is set (no-color.org).
- ``json``: one object per line, with ``timestamp`` and ``level``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, TextIO

import structlog

from necrod.io.journal import SOCKET, Journal, field_name

FORMATS = ("console", "json", "journal")
#: A value with any of these is quoted in the message (as JSON), so the pairs stay apart.
_QUOTE_IF = frozenset(' "=\n\t')
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "exception": 3, "critical": 2}


def stderr_is_journal(stream: TextIO) -> bool:
    """Whether ``stream`` is the journal's (``$JOURNAL_STREAM`` is its device and inode)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    if ":" not in value:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    dev, _, ino = value.partition(":")
    return f"{st.st_dev}:{st.st_ino}" == f"{dev}:{ino}"


def no_color() -> bool:
    return bool(os.environ.get("NO_COLOR"))


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str, separators=(",", ":"))


def _message(event: str, fields: dict[str, Any]) -> str:
    """``event key=value ...``: what a person reads in ``journalctl``; a traceback follows on
    its own lines."""
    parts = [event]
    for key, value in fields.items():
        if key == "exception":
            continue
        text = _text(value)
        # A string with a space, quote or "=" is quoted; JSON (lists, numbers) only with a space.
        quoted = not text or any(c in text for c in (_QUOTE_IF if isinstance(value, str) else " \n"))
        parts.append(f"{key}={json.dumps(text) if quoted else text}")
    message = " ".join(parts)
    if "exception" in fields:
        message += "\n" + str(fields["exception"]).rstrip("\n")
    return message


class JournalLogger:
    """structlog's logger for the journal: each call sends one entry (see the module docstring)."""

    def __init__(self, journal: Journal | None, fallback: TextIO) -> None:
        self._journal = journal
        self._fallback = fallback

    def msg(self, entry: dict[str, Any]) -> None:
        fields: dict[str, Any] = dict(entry)
        event = str(fields.pop("event", ""))
        level = str(fields.pop("level", "info"))
        fields.pop("timestamp", None)
        priority = _PRIORITY.get(level, 6)
        message = _message(event, fields)
        if self._journal is not None:
            record = [("MESSAGE", message), ("PRIORITY", str(priority)), ("SYSLOG_IDENTIFIER", "necrod"),
                      ("EVENT", event)]  # fmt: skip
            record += [(field_name(key), _text(value)) for key, value in fields.items()]
            try:
                self._journal.send(record)
                return
            except OSError:
                pass
        # journald reads stderr line by line: a traceback's lines each carry the priority.
        self._fallback.write("".join(f"<{priority}>{line}\n" for line in message.split("\n")))
        self._fallback.flush()

    log = debug = info = warn = warning = error = err = critical = exception = fatal = msg


#: The journal sender in use, closed when logging is configured again (or by ``close``).
_journal: Journal | None = None


def close() -> None:
    """Close the journal sender, if one is open."""
    global _journal
    if _journal is not None:
        _journal.close()
        _journal = None


def _to_journal(logger: Any, name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    return {"entry": event_dict}


def configure(fmt: str | None = None, level: str = "info", stream: TextIO | None = None,
              journal_socket: os.PathLike[str] | str = SOCKET) -> str:  # fmt: skip
    """Set up logging; ``fmt`` is one of ``FORMATS`` or None (see the module docstring).
    Returns the format chosen."""
    stream = stream or sys.stderr
    if fmt is None:
        fmt = "journal" if stderr_is_journal(stream) else "console" if stream.isatty() else "json"
    shared: list[Any] = [structlog.contextvars.merge_contextvars, structlog.processors.add_log_level]
    factory: Any = structlog.WriteLoggerFactory(file=stream)
    close()
    if fmt == "journal":
        global _journal
        journal = _journal = Journal.open(Path(journal_socket))
        processors = [*shared, structlog.processors.format_exc_info, _to_journal]
        factory = lambda *args: JournalLogger(journal, stream)  # noqa: E731 (structlog wants a factory)
    elif fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty() and not no_color())
        processors = [*shared, structlog.processors.TimeStamper(fmt="iso", utc=True), renderer]
    else:
        processors = [*shared, structlog.processors.TimeStamper(fmt="iso", utc=True),
                      structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]  # fmt: skip
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    return fmt
