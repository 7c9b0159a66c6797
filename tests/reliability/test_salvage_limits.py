"""Salvage is bounded and kept for a while, not for ever (issue 16, defects 9 and 15).

An agent can leave a 256 MiB file or 200,000 files in its slot; each release would add them to
the mirror. Past a pool's ``salvage_max_*`` limits files are left out and listed (never dropped
silently); past its ``salvage_keep_*`` retention old salvage goes (``necroctl salvage prune``,
and every hour by itself). Salvage refs are in the mirror, under the workspaces directory, which
only the daemon's user may enter.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Necrod, git, short_tmpdir
from tests.reliability.conftest import FIGURES, daemon_config, slots_by_id, wait_settled, workspaces_of

pytestmark = pytest.mark.reliability


def ctl(d: Necrod, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "necrod.ctl.main", "--socket", str(d.socket), *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def leave_and_release(d: Necrod, write: Callable[[Path], None], holder: str) -> dict[str, Any]:
    wait_settled(d)
    with d.client() as c:
        lease = c.allocate("repo", holder=holder, wait_s=60)
        write(Path(lease["path"]))
        c.release(lease["lease_id"])
    wait_settled(d, timeout=120)
    assert slots_by_id(d)[lease["slot_id"]]["state"] == "available"
    return lease


def objects_bytes(mirror: Path) -> int:
    return sum(f.stat().st_size for f in (mirror / "objects").rglob("*") if f.is_file())


def salvage_tree(d: Necrod, lease_id: str) -> tuple[dict[str, Any], list[str], str]:
    with d.client() as c:
        shown = c.salvage_show(lease_id)
    mirror = workspaces_of(d) / "repo" / "mirror.git"
    tree = git(mirror, "ls-tree", "-r", "--name-only", shown["commit"]).splitlines()
    return shown, tree, git(mirror, "log", "-1", "--format=%B", shown["commit"])


def test_files_past_the_limits_are_left_out_and_listed(module_daemon: Callable[..., Necrod]) -> None:
    d = module_daemon(lambda o: daemon_config({"repo": o}, slots=1, max_slots=1, min_idle=0,
                                              salvage_max_file_bytes="1MiB", salvage_max_files=8,
                                              salvage_max_bytes="64KiB"))  # fmt: skip
    mirror = workspaces_of(d) / "repo" / "mirror.git"
    before = objects_bytes(mirror)

    def write(slot: Path) -> None:
        with open(slot / "huge.bin", "wb") as f:  # sparse: free to make, costly to hash
            f.truncate(256 << 20)
        (slot / "big.bin").write_bytes(os.urandom(2 << 20))
        for i in range(6):
            (slot / f"small-{i}.txt").write_text(f"small {i}\n")
        (slot / "medium.bin").write_bytes(os.urandom(100 << 10))
        os.mkfifo(slot / "pipe")

    lease = leave_and_release(d, write, "hoarder")
    _, tree, message = salvage_tree(d, lease["lease_id"])
    assert {f"small-{i}.txt" for i in range(6)} <= set(tree)
    assert not {"huge.bin", "big.bin", "medium.bin", "pipe"} & set(tree), tree
    for name in ("huge.bin", "big.bin", "medium.bin"):  # a FIFO is nothing git would take
        assert f'"{name}"' in message, message
    assert "Necrod-Skipped: 3" in message
    grew = objects_bytes(mirror) - before
    assert grew < 256 << 10, f"the mirror grew by {grew} bytes"
    FIGURES["salvage paths left out over the limits"] += 3


def test_many_files_are_capped_by_count(module_daemon: Callable[..., Necrod]) -> None:
    d = module_daemon(lambda o: daemon_config({"repo": o}, slots=1, max_slots=1, min_idle=0,
                                              salvage_max_files=500))  # fmt: skip

    def write(slot: Path) -> None:
        many = slot / "many"
        many.mkdir()
        for i in range(20_000):
            (many / f"f{i:05d}").write_text("x")

    started = time.monotonic()
    lease = leave_and_release(d, write, "many-files")
    elapsed = time.monotonic() - started
    _, tree, message = salvage_tree(d, lease["lease_id"])
    assert len([p for p in tree if p.startswith("many/")]) == 500
    assert "Necrod-Skipped: 19500" in message and "... and" in message
    assert elapsed < 90, f"a salvage of 20,000 files took {elapsed:.0f}s"
    FIGURES["salvage paths left out over the limits"] += 19_500


def test_a_listing_longer_than_a_salvage_reads_is_cut_and_said(module_daemon: Callable[..., Necrod]) -> None:
    """How much ``git status`` prints is the agent's to decide: 19,000 empty files under a path
    of 3.7 KB list 68 MiB. The salvage reads 64 MiB of it, takes what fits the limits, and
    says where it stopped; the slot comes back."""
    d = module_daemon(lambda o: daemon_config({"repo": o}, slots=1, max_slots=1, min_idle=0,
                                              salvage_max_files=100))  # fmt: skip

    def write(slot: Path) -> None:
        fd = os.open(slot, os.O_RDONLY | os.O_DIRECTORY)
        for _ in range(15):  # one at a time: the whole path is past what a system call takes
            os.mkdir("d" * 250, dir_fd=fd)
            deeper = os.open("d" * 250, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = deeper
        for i in range(19_000):
            os.close(os.open(f"f{i:05d}", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
        os.close(fd)

    lease = leave_and_release(d, write, "long-listing")
    _, tree, message = salvage_tree(d, lease["lease_id"])
    assert len([p for p in tree if p.startswith("d" * 250)]) == 100
    assert "the paths past the first 64 MiB of git status (not looked at)" in message, message[:2000]
    skipped = int(re.search(r"Necrod-Skipped: (\d+)", message).group(1))  # type: ignore[union-attr]
    assert 17_000 < skipped + 100 - 1 < 19_000, skipped


def test_a_holder_that_splits_lines_hides_no_salvage(module_daemon: Callable[..., Necrod]) -> None:
    """``str.splitlines`` splits at U+2028, U+0085, ``\\x1c`` and more: a holder (in the salvage's
    subject) holding one hid its salvage from the list and from retention, which then pruned
    others' in its place while the hidden ones filled the disk."""
    d = module_daemon(lambda o: daemon_config({"repo": o}, slots=1, max_slots=1, min_idle=0,
                                              salvage_keep_count=1))  # fmt: skip
    leases = []
    for n, holder in enumerate(["split\u2028me", "fs\x1cme", "next\x85line"]):
        time.sleep(1.05)  # commit dates are whole seconds: one salvage per second keeps their order
        lease = leave_and_release(d, lambda s, n=n: (s / "w.txt").write_text(f"work {n}\n"), holder)
        leases.append(lease["lease_id"])
    with d.client() as c:
        assert {i["lease_id"] for i in c.salvage_list()["salvage"]} >= set(leases)
    done = ctl(d, "salvage", "prune")
    assert done.returncode == 0, done.stdout + done.stderr
    with d.client() as c:
        assert {i["lease_id"] for i in c.salvage_list()["salvage"]} == {leases[-1]}
    mirror = workspaces_of(d) / "repo" / "mirror.git"
    assert git(mirror, "for-each-ref", "--format=%(refname)", "refs/necrod/salvage/").split() == [
        f"refs/necrod/salvage/{leases[-1]}"
    ]


def test_old_salvage_is_pruned_by_count_bytes_and_age(module_daemon: Callable[..., Necrod]) -> None:
    d = module_daemon(lambda o: daemon_config({"repo": o}, slots=1, max_slots=1, min_idle=0,
                                              salvage_keep_count=2))  # fmt: skip
    leases = []
    for n in range(4):
        time.sleep(1.05)  # commit dates are whole seconds: one salvage per second keeps their order
        lease = leave_and_release(d, lambda s, n=n: (s / "w.txt").write_text(f"work {n}\n" * 100), f"w{n}")
        leases.append(lease["lease_id"])
    dry = ctl(d, "salvage", "prune", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    would = json.loads(dry.stdout)
    assert would["dry_run"] and {i["lease_id"] for i in would["pruned"]} == set(leases[:2])
    assert len(json.loads(ctl(d, "salvage", "list", "--json").stdout)["salvage"]) == 4
    done = ctl(d, "salvage", "prune")
    assert done.returncode == 0 and "deleted 2 salvage ref(s)" in done.stdout, done.stdout + done.stderr
    with d.client() as c:
        kept = {i["lease_id"] for i in c.salvage_list()["salvage"]}
        assert kept == set(leases[2:])
        # Bytes: each salvage holds about 900 bytes of work; 1,000 keeps only the newest.
        # Age: a retention of a few milliseconds keeps nothing.
        for key, value, left in (("salvage_keep_bytes", 1000, 1), ("salvage_keep_days", "0.0000001", 0)):
            assert d.config_path is not None
            text = re.sub(r"salvage_keep_\w+: \S+", f"{key}: {value}", d.config_path.read_text())
            d.config_path.write_text(text)
            c.call("daemon.reload")
            time.sleep(0.1)
            pruned = c.salvage_prune("repo")["pruned"]
            assert len(c.salvage_list()["salvage"]) == left, (key, pruned)
    FIGURES["salvage refs pruned"] += 4


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to test as another user")
def test_salvage_is_not_readable_by_other_users(necrod_factory: Callable[..., Necrod], origin: Path) -> None:
    workspaces = short_tmpdir() / "workspaces"
    workspaces.mkdir(mode=0o755)
    os.chmod(workspaces, 0o755)
    d = necrod_factory(daemon_config({"repo": origin}, {"workspaces": str(workspaces)}, slots=1, min_idle=0))
    leave_and_release(d, lambda s: (s / "secret.txt").write_text("salvaged secret\n"), "private")
    assert workspaces.stat().st_mode & 0o777 == 0o700
    mirror = workspaces / "repo" / "mirror.git"
    probe = subprocess.run(
        [sys.executable, "-c",
         "import os, sys; os.setgid(65534); os.setuid(65534); "
         "sys.exit(0 if os.access(sys.argv[1], os.R_OK | os.X_OK) else 3)", str(mirror / "refs")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert probe.returncode == 3, "another user can read the salvage refs"
