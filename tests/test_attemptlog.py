"""A contained runner's log, as the daemon writes it: capped, what the file held counted."""

from __future__ import annotations

from pathlib import Path

from necrod.io.attemptlog import CappedLog


def test_a_runner_that_floods_its_output_fills_its_log_and_no_more(tmp_path: Path) -> None:
    log = tmp_path / "1.log"
    log.write_bytes(b"before a restart\n")  # 17 bytes already there count
    with open(log, "ab", buffering=0) as out:
        sink = CappedLog(out, limit=40)
        assert sink.write(b"y\n" * 10) and not sink.full
        assert not sink.write(b"z" * 1000) and sink.full
        assert not sink.write(b"more")
    text = log.read_bytes()
    assert text.startswith(b"before a restart\n" + b"y\n" * 10 + b"zzz")
    assert text[:40].endswith(b"zzz") and b"cut at 40 bytes" in text and b"more" not in text
    with open(log, "ab", buffering=0) as out:  # followed again (a wait cut short): nothing added
        assert CappedLog(out, limit=40).full
    assert log.read_bytes() == text
