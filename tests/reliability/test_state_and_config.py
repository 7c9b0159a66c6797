"""The daemon's own files under attack or trouble: pools.yaml made hostile (nested past the
parser's recursion, a FIFO, a device, huge, naming what cannot start), a small or full state file
system, and fencing tokens that must outlive a pool. Every refusal keeps the running config and
says why; the daemon keeps serving throughout."""

from __future__ import annotations

import contextlib
import grp
import json
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from necrod.client import Client
from necrod.io.store import CHECKPOINT_IDLE_S
from necrod.proto.errors import NecrodError, Unavailable
from tests.helpers import Necrod, wait_for
from tests.reliability.conftest import FIGURES, daemon_config, fill, rss_kb, tmpfs

pytestmark = pytest.mark.reliability

#: A client timeout well under the test's: a frozen daemon fails the test, it does not hang it.
PROMPT_S = 10.0


# --- a daemon whose pools.yaml the tests replace --------------------------------------------------


@pytest.fixture(scope="module")
def config_daemon(module_daemon: Callable[..., Necrod]) -> Necrod:
    return module_daemon(lambda origin: daemon_config({"repo": origin}, slots=1, min_idle=0))


@pytest.fixture
def guarded(config_daemon: Necrod) -> Iterator[tuple[Necrod, Client, Client]]:
    """The shared daemon, a client, and a subscriber to config events; the good pools.yaml is put
    back afterwards (atomically, as a regular file) and must be applied again."""
    d = config_daemon
    assert d.config_path is not None
    good = d.config_path.read_text()
    with d.client(timeout=PROMPT_S) as watcher, d.client(timeout=PROMPT_S) as c:
        watcher.subscribe(["config"], snapshot=False)
        try:
            yield d, c, watcher
        finally:
            replace_config(d, good)
            if c.status()["config"]["last_reload_error"] is not None:
                c.call("daemon.reload")
            wait_for(lambda: c.status()["state"] == "running", 30, what="the good config back")


def replace_config(d: Necrod, text: str) -> None:
    """Write pools.yaml as an editor would: a new file renamed over the old one."""
    replace_config_with(d, lambda tmp: tmp.write_text(text))


def replace_config_with(d: Necrod, make: Callable[[Path], None]) -> None:
    """Put whatever ``make`` creates (a FIFO, a symlink, a sparse file, a directory) in
    pools.yaml's place, by a rename."""
    assert d.config_path is not None
    tmp = d.config_path.with_name(".pools.yaml.tmp")
    _remove(tmp)
    make(tmp)
    if _is_real_dir(tmp) != _is_real_dir(d.config_path):
        _remove(d.config_path)  # a rename cannot put a file over a directory, nor the reverse
    os.replace(tmp, d.config_path)


def _is_real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _remove(path: Path) -> None:
    if _is_real_dir(path):
        path.rmdir()
    else:
        path.unlink(missing_ok=True)


def trigger_reload(d: Necrod, c: Client, how: str) -> None:
    """Make the daemon read its (already replaced) pools.yaml: by SIGHUP, by daemon.reload, or by
    leaving it to the file watcher."""
    if how == "sighup":
        assert d.proc is not None
        os.kill(d.proc.pid, signal.SIGHUP)
    elif how == "rpc":
        with pytest.raises(NecrodError) as info:
            c.reload()
        assert info.value.kind == "failed_precondition", info.value
    else:
        assert how == "watcher"


def wait_refused(d: Necrod, c: Client, watcher: Client, generation: int, how: str) -> dict[str, Any]:
    """The bad file was refused, reported everywhere, and changed nothing; returns the error."""
    wait_for(
        lambda: c.status()["config"]["last_reload_error"] is not None, 30, what="the bad config to be refused"
    )
    status = c.status()
    assert d.proc is not None and d.proc.poll() is None, "the daemon died"
    assert status["pid"] == d.proc.pid
    assert status["config"]["generation"] == generation, "the bad config was applied"
    assert status["state"] == "degraded" and any("config rejected" in r for r in status["degraded"])
    assert sorted(status["pools"]) == ["repo"] and status["pools"]["repo"]["state"] == "ready"
    error: dict[str, Any] = status["config"]["last_reload_error"]
    assert error["file"] == str(d.config_path), error
    rejected = [e for e in watcher.events(timeout=2) if e["type"] == "config.rejected"]
    assert rejected and rejected[0]["message"] == error["message"], rejected
    reason = {"sighup": "SIGHUP", "rpc": "rpc", "watcher": "file changed"}[how]
    wait_for(
        lambda: any(
            e.get("event") == "config_rejected" and e.get("reason") == reason for e in d.log_events()
        ),
        10,
        what=f"config_rejected logged for {reason}",
    )
    # Still serving, on the old config.
    lease = c.allocate("repo", holder="after-refusal", wait_s=30)
    c.release(lease["lease_id"], salvage=False)
    FIGURES["hostile pools.yaml refused while serving"] += 1
    return error


TRIGGERS = ["sighup", "rpc", "watcher"]


# --- issue 16 #8: any failure of a reload keeps the old config and is reported --------------------


def _deep_flow(good: str) -> str:
    return "pools: " + "[" * 5000 + "]" * 5000 + "\n"


def _deep_block(good: str) -> str:
    return "pools:\n" + "".join(f"{' ' * i}k{i}:\n" for i in range(1, 800)) + " " * 800 + "x: 1\n"


def _unreadable_value(good: str) -> str:
    return good.replace("slots: 1", "slots: !!int one")


def _python_tag(good: str) -> str:
    return good.replace("min_idle: 0", "min_idle: !!python/name:os.system ''")


@pytest.mark.parametrize("how", TRIGGERS)
@pytest.mark.parametrize(
    ("make", "expected"),
    [
        pytest.param(_deep_flow, "nested too deeply", id="deep-flow"),
        pytest.param(_deep_block, "nested too deeply", id="deep-block"),
        pytest.param(_unreadable_value, "cannot read this value", id="bad-int-tag"),
        pytest.param(_python_tag, "cannot read this value", id="python-tag"),
    ],
)
def test_a_config_the_parser_cannot_read_is_refused_and_the_daemon_keeps_serving(
    guarded: tuple[Necrod, Client, Client], how: str, make: Callable[[str], str], expected: str
) -> None:
    d, c, watcher = guarded
    assert d.config_path is not None
    generation = c.status()["config"]["generation"]
    replace_config(d, make(d.config_path.read_text()))
    trigger_reload(d, c, how)
    error = wait_refused(d, c, watcher, generation, how)
    assert expected in error["message"], error


@pytest.mark.parametrize(
    "make", [_deep_flow, _deep_block, _python_tag], ids=["deep-flow", "deep-block", "python-tag"]
)
def test_a_config_the_parser_cannot_read_stops_a_start_with_one_clear_line(
    necrod_factory: Callable[..., Necrod], origin: Path, make: Callable[[str], str]
) -> None:
    d = necrod_factory(make(daemon_config({"repo": origin}, slots=1, min_idle=0)), start=False)
    d.start(wait=False)
    assert d.proc is not None
    assert d.proc.wait(30) == 1
    log = d.log()
    assert "necrod: " in log and str(d.config_path) in log, log
    assert "Traceback" not in log, log
    FIGURES["hostile pools.yaml refused at start"] += 1


# --- issue 16 #19: pools.yaml must be a regular file, read with a cap ----------------------------


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _dev_zero(path: Path) -> None:
    path.symlink_to("/dev/zero")


def _sparse_16g(path: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(16 << 30)


def _directory(path: Path) -> None:
    path.mkdir()


NOT_A_CONFIG = [
    pytest.param(_fifo, "a FIFO, not a regular file", id="fifo"),
    pytest.param(_dev_zero, "a character device, not a regular file", id="dev-zero-symlink"),
    pytest.param(_sparse_16g, "a config is at most", id="sparse-16GiB"),
    pytest.param(_directory, "a directory, not a regular file", id="directory"),
]


@pytest.mark.parametrize("how", TRIGGERS)
@pytest.mark.parametrize(("make", "expected"), NOT_A_CONFIG)
def test_a_config_that_is_not_a_small_regular_file_is_refused_without_blocking(
    guarded: tuple[Necrod, Client, Client], how: str, make: Callable[[Path], None], expected: str
) -> None:
    d, c, watcher = guarded
    assert d.proc is not None
    rss_before = rss_kb(d.proc.pid)
    generation = c.status()["config"]["generation"]
    replace_config_with(d, make)
    trigger_reload(d, c, how)
    error = wait_refused(d, c, watcher, generation, how)
    assert expected in error["message"], error
    # The loop was never blocked: status answers at once; and nothing was read into memory.
    with d.client(timeout=2) as quick:
        assert quick.status()["config"]["generation"] == generation
    assert rss_kb(d.proc.pid) - rss_before < 32 << 10


def test_a_symlinked_config_is_still_read_and_applied(guarded: tuple[Necrod, Client, Client]) -> None:
    """What the checks must not refuse: pools.yaml as a symlink to a regular file (a ConfigMap)."""
    d, c, _ = guarded
    assert d.config_path is not None
    generation = c.status()["config"]["generation"]
    target = d.config_path.with_name("..data-pools.yaml")
    target.write_text(d.config_path.read_text().replace("slots: 1", "slots: 2"))
    try:
        replace_config_with(d, lambda tmp: tmp.symlink_to(target.name))
        wait_for(lambda: c.status()["config"]["generation"] > generation, 30, what="the symlinked config")
        assert c.status()["config"]["last_reload_error"] is None
        assert c.pool("repo")["size"]["baseline"] == 2
    finally:
        replace_config(d, target.read_text().replace("slots: 2", "slots: 1"))
        target.unlink()


@pytest.mark.parametrize(("make", "expected"), NOT_A_CONFIG)
def test_a_config_that_is_not_a_small_regular_file_stops_a_start_at_once(
    necrod_factory: Callable[..., Necrod], origin: Path, make: Callable[[Path], None], expected: str
) -> None:
    d = necrod_factory(daemon_config({"repo": origin}), start=False)
    assert d.config_path is not None
    d.config_path.unlink()
    make(d.config_path)
    d.start(wait=False)
    assert d.proc is not None
    assert d.proc.wait(30) == 1
    log = d.log()
    assert expected in log and str(d.config_path) in log, log
    assert "Traceback" not in log, log
    FIGURES["hostile pools.yaml refused at start"] += 1


# --- issue 16 #16: a reload refuses a restart-only key the next start would refuse -------------


@pytest.fixture
def port_in_use() -> Iterator[int]:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


def _old_git(directory: Path) -> str:
    fake = directory / "old-git"
    fake.write_text("#!/bin/sh\necho 'git version 2.30.0'\n")
    fake.chmod(0o755)
    return str(fake)


def daemon_section(keys: dict[str, Any]) -> str:
    return "daemon:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in keys.items())


UNSTARTABLE: list[Any] = [
    pytest.param(lambda d, port: {"socket_group": "no-such-group-16"}, "socket_group", id="socket-group"),
    pytest.param(lambda d, port: {"workspaces": str(d.config_path) + "/ws"}, "is not a directory",
                 id="workspaces-under-a-file"),
    pytest.param(lambda d, port: {"workspaces": str(d.root / "dangling" / "ws")}, "dangling symlink",
                 id="workspaces-dangling-symlink"),
    pytest.param(lambda d, port: {"git": "/nonexistent/git"}, "cannot run", id="git-missing"),
    pytest.param(lambda d, port: {"git": _old_git(d.root)}, "2024 clone vulnerabilities", id="git-too-old"),
    pytest.param(lambda d, port: {"metrics_listen": f"127.0.0.1:{port}"}, "cannot listen", id="metrics-port-taken"),
    pytest.param(lambda d, port: {"metrics_listen": "192.0.2.1:9464"}, "cannot listen",
                 id="metrics-address-not-ours"),
]  # fmt: skip


@pytest.mark.parametrize("how", TRIGGERS)
@pytest.mark.parametrize(("keys", "expected"), UNSTARTABLE)
def test_a_restart_only_key_the_next_start_would_refuse_is_refused_at_reload(
    guarded: tuple[Necrod, Client, Client],
    port_in_use: int,
    how: str,
    keys: Callable[[Necrod, int], dict[str, Any]],
    expected: str,
) -> None:
    d, c, watcher = guarded
    assert d.config_path is not None
    dangling = d.root / "dangling"
    dangling.unlink(missing_ok=True)
    dangling.symlink_to(d.root / "nowhere")
    generation = c.status()["config"]["generation"]
    replace_config(d, daemon_section(keys(d, port_in_use)) + d.config_path.read_text())
    trigger_reload(d, c, how)
    error = wait_refused(d, c, watcher, generation, how)
    assert expected in error["message"] and "would not start again" in error["message"], error
    dangling.unlink()


def test_a_startable_restart_only_change_is_accepted_and_the_next_start_uses_it(
    necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path
) -> None:
    """What the checks must not refuse: restart-only changes that can start."""
    d = necrod_factory(daemon_config({"repo": origin}, slots=1, min_idle=0))
    assert d.config_path is not None
    group = grp.getgrgid(os.getgid()).gr_name
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    keys = {"socket_group": group, "metrics_listen": f"127.0.0.1:{port}", "workspaces": str(workdir / "ws2")}
    with d.client(timeout=PROMPT_S) as c:
        generation = c.status()["config"]["generation"]
        replace_config(d, daemon_section(keys) + d.config_path.read_text())
        wait_for(lambda: c.status()["config"]["generation"] > generation, 30, what="the change applied")
        status = c.status()
        assert status["config"]["last_reload_error"] is None
        assert status["workspaces"] != str(workdir / "ws2"), "a restart-only key took effect live"
    assert d.terminate() == 0
    d.start()
    assert d.call("daemon.status")["workspaces"] == str((workdir / "ws2").resolve())
    assert (os.stat(d.socket).st_mode & 0o777) == 0o660
    with socket.create_connection(("127.0.0.1", port), timeout=PROMPT_S) as scrape:
        scrape.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        assert scrape.recv(64).startswith(b"HTTP/1.1 200")


def test_a_workspaces_directory_that_cannot_be_made_stops_a_start_with_one_clear_line(
    necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path
) -> None:
    blocker = workdir / "a-file"
    blocker.write_text("not a directory\n")
    d = necrod_factory(daemon_config({"repo": origin}, {"workspaces": str(blocker / "ws")}), start=False)
    d.start(wait=False)
    assert d.proc is not None
    assert d.proc.wait(30) == 1
    log = d.log()
    assert f"cannot use the workspaces directory {blocker / 'ws'}" in log and "Traceback" not in log, log


# --- issue 16 #13: fencing tokens grow per slot id for the life of the state ----------------------


def lease_tokens(d: Necrod, rounds: int, seen: dict[str, int]) -> None:
    """Allocate and release ``rounds`` times, checking that every slot id's token only grows and
    recording the highest one seen per slot id."""
    with d.client(timeout=PROMPT_S) as c:
        for _ in range(rounds):
            lease = c.allocate("repo", holder="fenced", wait_s=30)
            sid, token = lease["slot_id"], lease["fencing_token"]
            assert token > seen.get(sid, 0), f"{sid}: token {token} after {seen[sid]}"
            seen[sid] = token
            c.release(lease["lease_id"], salvage=False)
        for s in c.slots("repo")["slots"]:
            assert s["fencing_token"] >= seen.get(s["slot_id"], 0)
            seen[s["slot_id"]] = max(seen.get(s["slot_id"], 0), s["fencing_token"])


def wait_forgotten(d: Necrod, pool: str) -> None:
    wait_for(lambda: pool not in d.call("daemon.status")["pools"], 60, what=f"pool {pool} to be forgotten")


@pytest.mark.parametrize("restart", ["none", "terminate", "kill9"])
def test_fencing_tokens_and_slot_ids_never_go_back_when_a_pool_is_removed_and_added_again(
    necrod_factory: Callable[..., Necrod], origin: Path, restart: str
) -> None:
    with_pool = daemon_config({"repo": origin, "other": origin}, slots=2, min_idle=0)
    without = daemon_config({"other": origin}, slots=2, min_idle=0)
    d = necrod_factory(with_pool)
    seen: dict[str, int] = {}
    for _ in range(2):  # removed and added twice: the second time over a fence record
        lease_tokens(d, 6, seen)
        before = set(seen)
        replace_config(d, without)
        wait_forgotten(d, "repo")
        if restart == "terminate":
            assert d.terminate() == 0
            d.start()
        elif restart == "kill9":
            d.kill9()
            d.start()
        replace_config(d, with_pool)
        d.call("daemon.reload")
        d.wait_ready()
        lease_tokens(d, 6, seen)
        assert not before & {s["slot_id"] for s in d.call("slots.list", {"pool": "repo"})["slots"]}, (
            "a slot id came back"
        )
    FIGURES["fencing tokens checked across pool removal"] += len(seen)


# --- issue 16 #10: a small or full state file system ----------------------------------------------

#: The WAL's bound under load: SQLite checkpoints it at 256 pages (necrod.io.store), plus the
#: frames of the transaction that crossed the line.
WAL_BOUND = (256 + 64) * 4096


def heartbeats(c: Client, lease_id: str, count: int, wal: Path) -> int:
    """``count`` durable heartbeats (one transaction each); returns the largest WAL seen."""
    largest = 0
    for _ in range(count):
        c.heartbeat(lease_id)
        largest = max(largest, wal.stat().st_size if wal.exists() else 0)
    return largest


def wait_wal_truncated(d: Necrod, wal: Path) -> None:
    wait_for(lambda: not wal.exists() or wal.stat().st_size == 0, 15, what="the WAL to be truncated")
    store = d.call("daemon.status")["store"]
    assert store["checkpoints"] >= 1 and store["wal_bytes"] in (0, None), store


def test_the_wal_stays_near_1_mib_under_load_and_is_truncated_when_idle(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    d = necrod_factory(daemon_config({"repo": origin}, slots=2, min_idle=0))
    wal = d.state_dir / "necrod.db-wal"
    with d.client(timeout=PROMPT_S) as c:
        lease = c.allocate("repo", holder="beating")
        largest = heartbeats(c, lease["lease_id"], 3000, wal)
        assert largest <= WAL_BOUND, f"the WAL reached {largest} bytes"
        wait_wal_truncated(d, wal)
        # Truncated again after every burst, and nothing is lost by it.
        heartbeats(c, lease["lease_id"], 200, wal)
        wait_wal_truncated(d, wal)
    FIGURES["durable transactions while measuring the WAL"] += 3200
    d.kill9()
    d.start()
    assert [s["lease_id"] for s in d.call("slots.list")["slots"] if s["lease_id"]] == [lease["lease_id"]]


def test_a_small_state_file_system_is_never_filled_by_the_wal(
    necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path
) -> None:
    """3 MiB for the state: the WAL used to grow to ~4 MB and fill it in a few hundred changes."""
    with tmpfs(workdir / "statedisk", "3m") as disk:
        d = necrod_factory(
            daemon_config({"repo": origin}, {"workspaces": str(workdir / "ws")}, slots=2, min_idle=0),
            start=False,
        )
        d.state_dir = disk / "state"
        try:
            d.start()
            with d.client(timeout=PROMPT_S) as c:
                lease = c.allocate("repo", holder="beating")
                for _ in range(3):
                    heartbeats(c, lease["lease_id"], 1500, d.state_dir / "necrod.db-wal")
                    status = c.status()
                    assert status["store"]["commits_failed"] == 0 and status["state"] == "running", status
            FIGURES["durable transactions while measuring the WAL"] += 4500
        finally:
            d.stop()


def degraded_with(c: Client, words: str) -> list[str]:
    def found() -> list[str] | None:
        status = c.status()
        reasons = [r for r in status["degraded"] if words in r]
        return reasons if status["state"] == "degraded" and reasons else None

    return wait_for(found, 30, what=f"status degraded with {words!r}")  # type: ignore[no-any-return]


def make_read_only(c: Client, disk: Path, lease_id: str) -> Path:
    """Fill ``disk`` and make changes until one is refused at once; returns the filler.

    A second after its last commit the daemon truncates its WAL, which can give space back; so
    each round waits for that first, fills, and beats until refused: a round refused at its
    first beat had no commit, so no truncation is pending and the daemon stays read-only."""
    for _ in range(10):
        time.sleep(CHECKPOINT_IDLE_S + 0.5)
        filler = fill(disk)
        accepted = 0
        while True:
            try:
                c.heartbeat(lease_id)
            except Unavailable:
                break
            accepted += 1
            assert accepted < 2000, "a full state disk refused no change"
        if accepted == 0:
            return filler
    raise AssertionError("the state disk never stayed full")


def assert_read_only(c: Client, held: dict[str, Any]) -> None:
    """Reads are served; every change is refused with ``unavailable``, saying why, and undone."""
    status = c.status()
    assert any(r.startswith("state read-only: ") for r in status["degraded"]), status["degraded"]
    slots = {s["slot_id"]: s for s in c.slots("repo")["slots"]}
    assert slots[held["slot_id"]]["lease_id"] == held["lease_id"]
    with pytest.raises(Unavailable) as info:
        c.allocate("repo", holder="refused")
    assert "is full" in info.value.message and "read-only until there is room" in info.value.message
    assert "refused" not in [s["holder"] for s in c.slots("repo")["slots"]]
    with pytest.raises(Unavailable):
        c.heartbeat(held["lease_id"])
    FIGURES["changes refused on a full state disk"] += 2


@contextlib.contextmanager
def state_on_tmpfs(
    necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path, *, slots: int
) -> Iterator[tuple[Necrod, Path]]:
    """A daemon whose state directory is on a 4 MiB tmpfs (its workspaces elsewhere), stopped
    and unmounted on the way out."""
    with tmpfs(workdir / "statedisk", "4m") as disk:
        d = necrod_factory(
            daemon_config({"repo": origin}, {"workspaces": str(workdir / "ws"), "disk_check_interval_s": 1},
                          slots=slots, min_idle=0),
            start=False,
        )  # fmt: skip
        d.state_dir = disk / "state"
        try:
            d.start()
            yield d, disk
        finally:
            d.stop()


def test_a_full_state_disk_is_degraded_read_only_and_recovers_by_itself(
    necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path
) -> None:
    with (
        state_on_tmpfs(necrod_factory, origin, workdir, slots=2) as (d, disk),
        d.client(timeout=PROMPT_S) as c,
    ):
        held = c.allocate("repo", holder="held")
        # Nearly full: said before anything fails.
        filler = fill(disk, leave=512 << 10)
        (reason,) = degraded_with(c, "state disk full: ")
        assert str(d.state_dir) in reason
        filler.unlink()
        wait_for(lambda: c.status()["state"] == "running", 30, what="room again")
        # Full: the first change that fails makes the daemon read-only.
        filler = make_read_only(c, disk, held["lease_id"])
        (reason,) = degraded_with(c, "state read-only: ")
        assert str(d.state_dir) in reason and "is full" in reason
        assert_read_only(c, held)
        # Room again: back by itself, with no change asked for.
        filler.unlink()
        wait_for(lambda: c.status()["state"] == "running", 30, what="the store to be writable again")
        assert c.status()["store"]["read_only"] is None
        c.heartbeat(held["lease_id"])
        other = c.allocate("repo", holder="after")
        c.release(other["lease_id"], salvage=False)


def test_no_lease_expires_while_the_state_is_read_only(
    necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path
) -> None:
    with (
        state_on_tmpfs(necrod_factory, origin, workdir, slots=1) as (d, disk),
        d.client(timeout=PROMPT_S) as c,
    ):
        held = c.allocate("repo", holder="held", ttl_s=3)
        filler = make_read_only(c, disk, held["lease_id"])
        time.sleep(5)  # past the TTL, with every heartbeat refused
        slots = {s["slot_id"]: s for s in c.slots("repo")["slots"]}
        assert slots[held["slot_id"]]["lease_id"] == held["lease_id"], "the lease expired"
        filler.unlink()
        wait_for(lambda: c.status()["store"]["read_only"] is None, 30, what="writable again")
        time.sleep(1.5)  # a fresh TTL (3 s) from when the state became writable
        c.heartbeat(held["lease_id"])
        c.release(held["lease_id"], salvage=False)


def test_a_full_workspaces_disk_is_degraded_and_recovers(
    necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path
) -> None:
    with tmpfs(workdir / "wsdisk", "16m") as disk:
        d = necrod_factory(
            daemon_config(
                {"repo": origin}, {"workspaces": str(disk / "ws"), "min_free_disk": 0, "disk_check_interval_s": 1},
                slots=1, min_idle=0,
            )
        )  # fmt: skip
        try:
            with d.client(timeout=PROMPT_S) as c:
                filler = fill(disk)
                (reason,) = degraded_with(c, "workspaces disk full: ")
                assert str(disk / "ws") in reason
                lease = c.allocate("repo", holder="still-served")  # the clean slot is still handed out
                c.release(lease["lease_id"], salvage=False)
                filler.unlink()
                wait_for(lambda: c.status()["state"] == "running", 60, what="room again")
        finally:
            d.stop()


@pytest.mark.parametrize("layout", ["state-disk", "state-and-workspaces-disk"])
def test_after_kill9_on_a_full_disk_the_daemon_starts_read_only_and_recovers(
    necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path, layout: str
) -> None:
    with tmpfs(workdir / "disk", "16m") as disk:
        keys: dict[str, Any] = {"disk_check_interval_s": 1, "min_free_disk": 0}
        if layout == "state-disk":
            keys["workspaces"] = str(workdir / "ws")
        d = necrod_factory(daemon_config({"repo": origin}, keys, slots=3, min_idle=0), start=False)
        d.state_dir = disk / "state"
        try:
            d.start()
            with d.client(timeout=PROMPT_S) as c:
                held = c.allocate("repo", holder="held")
                returned = c.allocate("repo", holder="returned")
                c.release(returned["lease_id"])  # cleaned in the background: caught mid-way, perhaps
            fill(disk)
            d.kill9()
            FIGURES["faults injected"] += 1
            d.start()  # it used to exit at once, and again at every restart
            assert any(e.get("event") == "state_read_only" for e in d.log_events())
            with d.client(timeout=PROMPT_S) as c:
                filler = make_read_only(c, disk, held["lease_id"])
                assert_read_only(c, held)
                filler.unlink()
                wait_for(lambda: c.status()["state"] == "running", 60, what="the daemon to recover by itself")
                c.heartbeat(held["lease_id"])
                wait_for(
                    lambda: sorted(s["state"] for s in c.slots("repo")["slots"])
                    == ["allocated", "available", "available"],
                    60, what="the returned slot cleaned",
                )  # fmt: skip
            # Nothing acknowledged was lost, and nothing half-done was kept.
            d.kill9()
            d.start()
            slots = {s["slot_id"]: s for s in d.call("slots.list", {"pool": "repo"})["slots"]}
            assert slots[held["slot_id"]]["lease_id"] == held["lease_id"]
            assert "error" not in {s["state"] for s in slots.values()}
        finally:
            d.stop()
