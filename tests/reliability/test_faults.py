"""Faults from outside: files deleted or damaged under the daemon, its database unusable, the disk
full. The daemon keeps serving, hands out nothing broken, loses nothing it acknowledged, and
says clearly what is wrong when it cannot start."""

from __future__ import annotations

import random
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from necrod.proto.errors import ResourceExhausted, Unavailable
from tests.helpers import Necrod, git, wait_for
from tests.reliability.conftest import (
    FIGURES,
    GitSeam,
    daemon_config,
    fill,
    slots_by_id,
    tmpfs,
    wait_settled,
    workspaces_of,
)

pytestmark = pytest.mark.reliability


def assert_usable(path: str, commit: str) -> None:
    """A slot as a caller expects it: there, clean, at the commit."""
    assert Path(path, "README").is_file(), f"{path} is not a checkout"
    assert (
        git(path, "--no-optional-locks", "status", "--porcelain", "--ignored", "--untracked-files=all") == ""
    )
    assert git(path, "rev-parse", "HEAD") == commit


# --- files deleted under the daemon ----------------------------------------------------------------


def _delete_dir(slot: dict[str, object], mirror: Path) -> None:
    shutil.rmtree(str(slot["path"]))


def _delete_dotgit(slot: dict[str, object], mirror: Path) -> None:
    Path(str(slot["path"]), ".git").unlink()


def _delete_admin(slot: dict[str, object], mirror: Path) -> None:
    shutil.rmtree(mirror / "worktrees" / str(slot["slot_id"]).split("/")[1])


def _delete_all_slots(slot: dict[str, object], mirror: Path) -> None:
    shutil.rmtree(Path(str(slot["path"])).parent)


@pytest.mark.parametrize(
    "damage",
    [_delete_dir, _delete_dotgit, _delete_admin, _delete_all_slots],
    ids=["slot-directory", "dotgit-file", "admin-directory", "all-slot-directories"],
)
def test_an_idle_slot_damaged_under_the_daemon_is_not_handed_out_broken(
    necrod_factory: Callable[..., Necrod], origin: Path, damage: Callable[[dict[str, object], Path], None]
) -> None:
    d = necrod_factory(daemon_config({"repo": origin}, slots=2, max_slots=2, min_idle=0))
    base = git(origin, "rev-parse", "HEAD")
    mirror = workspaces_of(d) / "repo" / "mirror.git"
    victim = slots_by_id(d)["repo/1"]
    damage(victim, mirror)
    FIGURES["faults injected"] += 1
    with d.client() as c:
        # Whatever the daemon hands out now is whole: the damaged slot is rebuilt first, or skipped.
        first = c.allocate("repo", wait_s=30)
        assert_usable(first["path"], base)
        second = c.allocate("repo", wait_s=30)
        assert_usable(second["path"], base)
        c.release(first["lease_id"])
        c.release(second["lease_id"])
    slots = wait_settled(d)
    assert sorted(s["state"] for s in slots.values()) == ["available", "available"]


def test_a_slot_deleted_while_the_daemon_is_down_is_rebuilt_at_start(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    d = necrod_factory(daemon_config({"repo": origin}, slots=2, max_slots=2, min_idle=0))
    base = git(origin, "rev-parse", "HEAD")
    with d.client() as c:
        held = c.allocate("repo", holder="keeps-it")
    d.terminate()
    for s in slots_by_id_offline(d):
        shutil.rmtree(s)
        FIGURES["faults injected"] += 1
    d.start()
    slots = wait_settled(d)
    # The lease survives (its holder decides what to do), the idle slot is whole again.
    assert slots[held["slot_id"]]["lease_id"] == held["lease_id"]
    idle = next(s for s in slots.values() if s["state"] == "available")
    assert_usable(idle["path"], base)


def slots_by_id_offline(d: Necrod) -> list[Path]:
    return sorted((d.state_dir / "workspaces" / "repo" / "slots").iterdir())


# --- a mirror missing objects -------------------------------------------------------------------------


def _loose_object_of(mirror: Path, commit: str, path: str) -> Path:
    blob = git(mirror, "rev-parse", f"{commit}:{path}")
    return mirror / "objects" / blob[:2] / blob[2:]


def test_a_mirror_missing_an_object_never_hands_out_a_broken_checkout(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    d = necrod_factory(daemon_config({"repo": origin}, slots=2, max_slots=2, min_idle=0))
    base = git(origin, "rev-parse", "HEAD")
    mirror = workspaces_of(d) / "repo" / "mirror.git"
    loose = _loose_object_of(mirror, base, "README")
    assert loose.is_file(), "the small test mirror keeps loose objects"
    loose.unlink()
    FIGURES["faults injected"] += 1
    handed_out = 0
    with d.client() as c:
        victim = c.allocate("repo")
        (Path(victim["path"]) / "README").write_text("the agent changed it\n")
        c.release(victim["lease_id"], salvage=False)  # restoring README needs the lost object
        deadline = time.monotonic() + 40
        while slots_by_id(d)[victim["slot_id"]]["state"] == "cleaning" and time.monotonic() < deadline:
            try:
                lease = c.allocate("repo", wait_s=1)
            except (ResourceExhausted, Unavailable):
                continue
            handed_out += 1
            # The victim itself may come back healed while this call waits: whichever slot it
            # is, what is handed out must be whole.
            assert_usable(lease["path"], base)
            c.release(lease["lease_id"], salvage=False)
        slot = slots_by_id(d)[victim["slot_id"]]
        status = c.status()
    # Healed (the object fetched again) or quarantined with a reason the operator sees.
    if slot["state"] == "available":
        assert_usable(slot["path"], base)
    else:
        assert slot["state"] == "error" and "cleanup failed twice" in slot["error"], slot
        assert status["state"] == "degraded"
    assert handed_out >= 1


@pytest.fixture(scope="module")
def packless(module_daemon: Callable[..., Necrod]) -> tuple[Necrod, str, dict[str, object]]:
    """A daemon whose mirror lost its objects after a slot was leased and dirtied; the slot released.
    Shared by the two tests below (the second one, which allocates, runs last)."""
    origins: list[Path] = []

    def config(origin: Path) -> str:
        origins.append(origin)
        return daemon_config({"repo": origin}, slots=2, max_slots=2, min_idle=0)

    d = module_daemon(config, files=150)  # enough objects that the mirror keeps a pack
    base = git(origins[0], "rev-parse", "HEAD")
    with d.client() as c:
        lease = c.allocate("repo")
        (Path(lease["path"]) / "README").write_text("changed\n")
        (Path(lease["path"]) / "pkg0" / "sub0" / "file0.txt").unlink()
        # Its objects, packed or loose (a local origin's are hard-linked in, loose as they are).
        objects = workspaces_of(d) / "repo" / "mirror.git" / "objects"
        lost = [*objects.glob("pack/*.pack"), *objects.glob("??/*")]
        assert lost
        for path in lost:
            path.unlink()
        FIGURES["faults injected"] += 1
        c.release(lease["lease_id"], salvage=False)
    wait_for(
        lambda: slots_by_id(d)[lease["slot_id"]]["state"] in ("error", "available"),
        40,
        what="the slot to be cleaned or quarantined",
    )
    return d, base, lease


def test_a_cleanup_on_a_mirror_missing_its_pack_is_healed_or_quarantined(
    packless: tuple[Necrod, str, dict[str, object]],
) -> None:
    d, base, lease = packless
    slot = slots_by_id(d)[str(lease["slot_id"])]
    if slot["state"] == "available":
        assert_usable(slot["path"], base)  # healed: the mirror fetched its objects again
    else:
        assert "cleanup failed twice" in slot["error"]
        status = d.call("daemon.status")
        assert status["state"] == "degraded" and any("in error" in r for r in status["degraded"])


def test_no_slot_of_a_mirror_missing_its_pack_is_handed_out_unusable(
    packless: tuple[Necrod, str, dict[str, object]],
) -> None:
    d, base, _ = packless
    with d.client() as c:
        try:
            lease = c.allocate("repo", wait_s=30)
        except (ResourceExhausted, Unavailable):
            return  # refusing is fine; handing out a checkout git cannot read is not
    assert_usable(lease["path"], base)


# --- the state database ------------------------------------------------------------------------------


def start_once(d: Necrod) -> subprocess.CompletedProcess[str]:
    return subprocess.run(d.command(), capture_output=True, text=True, timeout=60)


def assert_clear_startup_error(result: subprocess.CompletedProcess[str], db: Path, *words: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert str(db) in result.stderr, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


@pytest.fixture
def stopped_daemon(necrod_factory: Callable[..., Necrod], origin: Path) -> Iterator[Necrod]:
    """A daemon that has run once (its database exists), with a lease held, now stopped."""
    d = necrod_factory(daemon_config({"repo": origin}, slots=2, max_slots=2, min_idle=0))
    with d.client() as c:
        lease = c.allocate("repo", holder="agent")
    (Path(lease["path"]) / "unsaved.txt").write_text("work in progress\n")
    d.terminate()
    yield d


def test_a_database_locked_by_another_process_is_a_clear_error(stopped_daemon: Necrod) -> None:
    db = stopped_daemon.state_dir / "necrod.db"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time\n"
            "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "c.execute('BEGIN EXCLUSIVE')\n"
            "print('locked', flush=True)\n"
            "time.sleep(120)\n",
            str(db),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        FIGURES["faults injected"] += 1
        result = start_once(stopped_daemon)
        assert_clear_startup_error(result, db, "locked by another process", "fuser")
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    # Once the other process is gone, it starts and every lease is still there.
    stopped_daemon.start()
    slots = slots_by_id(stopped_daemon)
    assert [s["holder"] for s in slots.values() if s["state"] == "allocated"] == ["agent"]


def _garbage_everywhere(db: Path) -> None:
    db.write_bytes(random.Random(1).randbytes(db.stat().st_size or 8192))


def _garbage_after_header(db: Path) -> None:
    data = bytearray(db.read_bytes())
    rng = random.Random(2)
    for offset in range(100, len(data), 97):
        data[offset] = rng.randrange(256)
    db.write_bytes(bytes(data))


def _truncated(db: Path) -> None:
    with open(db, "r+b") as f:
        f.truncate(max(1, db.stat().st_size // 3) | 1)


def _text_file(db: Path) -> None:
    db.write_text("this is not a database\n" * 100)


@pytest.mark.parametrize(
    "damage",
    [_garbage_everywhere, _garbage_after_header, _truncated, _text_file],
    ids=["garbage", "garbage-after-header", "truncated", "text"],
)
def test_a_damaged_database_is_a_clear_error_and_the_documented_recovery_works(
    stopped_daemon: Necrod, origin: Path, damage: Callable[[Path], None]
) -> None:
    d = stopped_daemon
    db = d.state_dir / "necrod.db"
    # Checkpoint so the damage hits the real data, not a WAL that would be replayed over it.
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    damage(db)
    FIGURES["faults injected"] += 1
    result = start_once(d)
    assert_clear_startup_error(result, db, "damaged", "mv ")
    # The recovery the message gives: move the files aside, start again.
    for suffix in ("", "-wal", "-shm"):
        p = Path(f"{db}{suffix}")
        if p.exists():
            p.rename(f"{p}.damaged")
    d.start()
    slots = wait_settled(d)
    base = git(origin, "rev-parse", "HEAD")
    assert sorted(s["state"] for s in slots.values()) == ["available", "available"]
    for s in slots.values():
        assert_usable(s["path"], base)
    # The lease is gone, its work is not: it was salvaged when the slot was adopted.
    with d.client() as c:
        adopted = [i for i in c.salvage_list("repo")["salvage"] if i["lease_id"].startswith("adopted-")]
        assert adopted, "the held slot's work was not salvaged on adoption"
        files = [f["path"] for f in c.salvage_show(adopted[0]["lease_id"])["files"]]
    assert "unsaved.txt" in files


# --- a full disk -----------------------------------------------------------------------------------


def test_a_disk_full_during_cleanup_keeps_the_work_and_the_daemon_serving(
    necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path
) -> None:
    with tmpfs(workdir / "disk", "8m") as disk:
        d = necrod_factory(
            daemon_config(
                {"repo": origin},
                {"workspaces": str(disk / "ws"), "min_free_disk": 0},
                slots=2,
                max_slots=3,
                min_idle=0,
            )
        )
        try:
            base = git(origin, "rev-parse", "HEAD")
            with d.client() as c:
                lease = c.allocate("repo", holder="agent")
                work = Path(lease["path"]) / "results.txt"
                work.write_text("precious results\n")
                filler = fill(disk)
                FIGURES["faults injected"] += 1
                c.release(lease["lease_id"])  # acknowledged at once; salvage cannot write yet
                wait_for(
                    lambda: "cleanup_failed" in d.log() or "slot_quarantined" in d.log(),
                    30,
                    what="the cleanup to fail on the full disk",
                )
                # Meanwhile the daemon serves: the other slot can be leased and given back.
                other = c.allocate("repo")
                assert_usable(other["path"], base)
                c.release(other["lease_id"], salvage=False)
                assert work.exists(), "the work was thrown away before it was saved"
                filler.unlink()
                # Retried once there is room (or quarantined with the work kept for inspection).
                wait_for(
                    lambda: slots_by_id(d)[lease["slot_id"]]["state"] in ("available", "error"),
                    40,
                    what="the slot to be cleaned or quarantined",
                )
                slot = slots_by_id(d)[lease["slot_id"]]
                if slot["state"] == "available":
                    files = [f["path"] for f in c.salvage_show(lease["lease_id"])["files"]]
                    assert "results.txt" in files
                    assert_usable(slot["path"], base)
                else:
                    assert work.read_text() == "precious results\n"
                    assert "No space left" in slot["error"] or "space" in slot["error"].lower()
        finally:
            d.stop()


def test_injected_enospc_in_cleanup_quarantines_the_slot_and_the_pool_keeps_serving(
    necrod_factory: Callable[..., Necrod], origin: Path, seam: GitSeam
) -> None:
    d = necrod_factory(
        daemon_config({"repo": origin}, {"git": str(seam.path)}, slots=1, max_slots=2, min_idle=0)
    )
    base = git(origin, "rev-parse", "HEAD")
    with d.client() as c:
        lease = c.allocate("repo")
        (Path(lease["path"]) / "README").write_text("changed\n")
        seam.fail("checkout", "error: unable to write file README: No space left on device")
        c.release(lease["lease_id"], salvage=False)
        slot = wait_for(
            lambda: (s := slots_by_id(d)[lease["slot_id"]])["state"] == "error" and s,
            40,
            what="the slot to be quarantined",
        )
        seam.clear()
        assert "No space left on device" in slot["error"]
        fresh = c.allocate("repo", wait_s=60)
        assert fresh["slot_id"] != lease["slot_id"]
        assert_usable(fresh["path"], base)


def test_a_full_state_disk_fails_calls_with_unavailable_and_undoes_them(
    necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path
) -> None:
    with tmpfs(workdir / "statedisk", "2m") as disk:
        d = necrod_factory(
            daemon_config(
                {"repo": origin}, {"workspaces": str(workdir / "ws")}, slots=3, max_slots=3, min_idle=0
            ),
            start=False,
        )
        d.state_dir = disk / "state"
        try:
            d.start()
            acknowledged: dict[str, str] = {}
            refused: list[str] = []
            with d.client() as c:
                kept = c.allocate("repo", holder="kept")
                acknowledged[kept["lease_id"]] = kept["slot_id"]
                filler = fill(disk)
                FIGURES["faults injected"] += 1
                for i in range(300):
                    try:
                        lease = c.allocate("repo", holder=f"try-{i}")
                    except Unavailable as exc:
                        assert "could not be saved" in exc.message and "nothing was changed" in exc.message
                        refused.append(f"allocate try-{i}")
                        # Undone: nobody holds a slot for try-i.
                        holders = [s["holder"] for s in slots_by_id(d).values()]
                        assert f"try-{i}" not in holders
                        continue
                    except ResourceExhausted:
                        continue
                    acknowledged[lease["lease_id"]] = lease["slot_id"]
                    try:
                        c.release(lease["lease_id"], salvage=False)
                    except Unavailable:
                        refused.append(f"release {lease['lease_id']}")
                        # Undone: the lease is still held and still beats once there is room.
                        assert slots_by_id(d)[lease["slot_id"]]["lease_id"] == lease["lease_id"]
                        continue
                    del acknowledged[lease["lease_id"]]
                    if len(refused) > 5:
                        break
                assert refused, "the full disk never made a commit fail"
                assert c.status()["pid"] == d.proc.pid  # type: ignore[union-attr]
                filler.unlink()
                for lease_id in acknowledged:
                    c.heartbeat(lease_id)
                held = {s["lease_id"]: s["slot_id"] for s in slots_by_id(d).values() if s["lease_id"]}
            assert held == acknowledged
            # What the daemon acknowledged is what it finds after a crash.
            d.kill9()
            d.start()
            held = {s["lease_id"]: s["slot_id"] for s in slots_by_id(d).values() if s["lease_id"]}
            assert held == acknowledged
        finally:
            d.stop()
