"""Copy-on-write slots (``isolation: overlay``): real overlay mounts, real git, the real daemon.

Each slot is an overlay of read-only layers (the pool's files, its prepare step's output, a
checkout at the base) under an upper of its own; a reset drops the upper. (The whole pool
suite runs on overlay pools too, through the ``slot_kind`` fixture.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import GIT_ENV, Necrod, commit_file, git, pool_config, wait_for


def overlay_pool(origin: Path, **options: Any) -> str:
    defaults: dict[str, Any] = {"slots": 1, "min_idle": 0, "max_slots": 1, "isolation": "overlay"}
    defaults.update(options)
    return pool_config({"repo": origin}, **defaults)


def with_prepare(config: str, prepare: str, files: str = "") -> str:
    """``config`` (one pool ``repo``) with a ``prepare:`` section (YAML lines, indented 6) and
    ``files:`` under the pool."""
    text = config + "    prepare:\n" + prepare
    if files:
        text += "    files:\n" + files
    return text


def slot_view(d: Necrod, slot_id: str) -> dict[str, Any]:
    return next(s for s in d.call("slots.list", {"pool": "repo"})["slots"] if s["slot_id"] == slot_id)


def pool_view(d: Necrod) -> dict[str, Any]:
    return d.call("pools.get", {"pool": "repo"})  # type: ignore[no-any-return]


def mounted(path: str | Path) -> bool:
    return os.path.ismount(path)


def agent_git(slot: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=slot, env=GIT_ENV, capture_output=True, text=True, check=True
    ).stdout


def cycle(d: Necrod, lease: dict[str, Any]) -> dict[str, Any]:
    """Release ``lease`` and take the (only) slot again."""
    d.call("slots.release", {"lease_id": lease["lease_id"]})
    d.wait_slots("repo", "available", 1, timeout=60)
    again: dict[str, Any] = d.call("slots.allocate", {"pool": "repo", "wait_s": 30})
    assert again["path"] == lease["path"]
    return again


def test_debris_of_every_kind_is_salvaged_then_gone_by_dropping_the_upper(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    d = necrod_factory(overlay_pool(origin))
    lease = d.call("slots.allocate", {"pool": "repo"})
    slot = Path(lease["path"])
    assert mounted(slot) and slot_view(d, lease["slot_id"])["kind"] == "overlay"
    assert agent_git(slot, "status", "--porcelain") == ""
    assert agent_git(slot, "rev-parse", "HEAD").strip() == lease["commit"]
    # Edits, untracked, ignored, a deleted tracked file, a mode change, a symlink, a commit and a
    # branch in the slot's own repository, its config changed.
    (slot / "README").write_text("edited by the agent\n")
    (slot / "notes.txt").write_text("untracked\n")
    (slot / "build").mkdir()
    (slot / "build" / "out.o").write_text("ignored build output\n")
    (slot / "pkg0" / "sub0" / "file0.txt").unlink()
    (slot / "pkg1" / "sub1" / "file1.txt").chmod(0o755)
    (slot / "link").symlink_to("/etc/passwd")
    agent_git(slot, "checkout", "-q", "-b", "agent-branch")
    (slot / "committed.txt").write_text("a commit of the agent's\n")
    agent_git(slot, "add", "committed.txt")
    agent_git(slot, "commit", "-q", "-m", "agent commit")
    agent_git(slot, "config", "core.hooksPath", "/tmp/evil-hooks")

    again = cycle(d, lease)
    assert agent_git(slot, "status", "--porcelain", "--ignored", "--untracked-files=all") == ""
    assert (
        not (slot / "build").exists()
        and not (slot / "link").exists()
        and not (slot / "committed.txt").exists()
    )
    assert (slot / "pkg0" / "sub0" / "file0.txt").exists()
    assert not os.access(slot / "pkg1" / "sub1" / "file1.txt", os.X_OK)
    assert agent_git(slot, "rev-parse", "HEAD").strip() == again["commit"]
    assert agent_git(slot, "for-each-ref", "refs/heads/").strip() == ""
    assert subprocess.run(
        ["git", "config", "core.hooksPath"], cwd=slot, env=GIT_ENV, capture_output=True
    ).returncode
    # The work was salvaged first, from the overlay's view: commits, edits, untracked files.
    shown = d.call("salvage.show", {"lease_id": lease["lease_id"]})
    files = {f["path"]: f["status"] for f in shown["files"]}
    assert files["README"] == "M" and files["notes.txt"] == "A" and files["committed.txt"] == "A"
    assert files["pkg0/sub0/file0.txt"] == "D" and "build/out.o" not in files
    # Nothing of the agent's is in the upper any more (the old one went to the trash, then away).
    uppers = Path(pool_view(d)["mirror"]).parent / "uppers"
    upper = uppers / slot.name / "upper"
    assert [p for p in upper.rglob("*") if not p.is_dir()] == []
    trash = Path(pool_view(d)["mirror"]).parent / "trash"
    wait_for(lambda: not trash.exists() or not any(trash.iterdir()), 10, what="the old upper to be removed")


def test_a_lease_that_changed_nothing_comes_back_without_salvage_or_git(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    d = necrod_factory(overlay_pool(origin))
    lease = d.call("slots.allocate", {"pool": "repo"})
    assert agent_git(Path(lease["path"]), "status", "--porcelain") == ""  # looked, changed nothing
    before = d.call("daemon.status")["git"]["started"]
    again = cycle(d, lease)
    assert d.call("daemon.status")["git"]["started"] == before
    assert d.call("salvage.list", {"pool": "repo"})["salvage"] == []
    (Path(again["path"]) / "new.txt").write_text("a change\n")
    cycle(d, again)
    assert [s["lease_id"] for s in d.call("salvage.list", {"pool": "repo"})["salvage"]] == [again["lease_id"]]


def test_a_base_move_builds_one_layer_and_moves_the_idle_slots(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    d = necrod_factory(overlay_pool(origin, slots=3, max_slots=3, fetch_interval_s=1))
    slots = d.wait_slots("repo", "available", 3)
    layers = Path(pool_view(d)["mirror"]).parent / "layers"
    first = git(origin, "rev-parse", "HEAD")
    assert os.listdir(layers) == [f"base-{first}"]
    held = d.call("slots.allocate", {"pool": "repo"})
    second = commit_file(origin, "moved.txt", "the base moved\n")

    def moved() -> bool:
        views = {s["slot_id"]: s for s in d.call("slots.list", {"pool": "repo"})["slots"]}
        return all(views[s["slot_id"]]["commit"] == second for s in slots if s["slot_id"] != held["slot_id"])

    wait_for(moved, 30, what="the idle slots to move")
    for s in d.call("slots.list", {"pool": "repo", "state": "available"})["slots"]:
        assert s["layers"] == [f"base-{second}"] and (Path(s["path"]) / "moved.txt").exists()
    # One layer per commit: the held slot still stands on the old one, until it comes back.
    assert set(os.listdir(layers)) == {f"base-{first}", f"base-{second}"}
    d.call("slots.release", {"lease_id": held["lease_id"]})
    wait_for(lambda: os.listdir(layers) == [f"base-{second}"], 30, what="the old layer to go")
    pins = git(Path(pool_view(d)["mirror"]), "for-each-ref", "--format=%(refname)", "refs/necrod/layers/")
    assert pins == f"refs/necrod/layers/{second}"


PREPARE = """      command: ["sh", "-c", "echo run >> {counter}; mkdir -p build; cat README > build/deps.txt; echo $NECROD_PREPARE_KEY > build/key"]
      key_files: ["deps.lock"]
"""


def test_the_prepare_step_runs_once_for_every_slot_and_its_output_comes_back(
    necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path
) -> None:
    counter = workdir / "runs"
    env = workdir / "app.env"
    env.write_text("TOKEN=one\n")
    commit_file(origin, "deps.lock", "v1\n")
    config = with_prepare(overlay_pool(origin, slots=3, max_slots=3, fetch_interval_s=1),
                          PREPARE.format(counter=counter), f"      .env: {env}\n")  # fmt: skip
    d = necrod_factory(config)
    wait_for(lambda: pool_view(d)["prepare"]["state"] == "ready", 30, what="the prepare step")
    # Idle slots move onto the output in the background, as onto a new base.
    wait_for(lambda: all(any(n.startswith("prepared-") for n in s["layers"])
                         for s in d.call("slots.list", {"pool": "repo"})["slots"]), 30, what="the slots to move")  # fmt: skip
    leases = [d.call("slots.allocate", {"pool": "repo", "wait_s": 30}) for _ in range(3)]
    assert counter.read_text() == "run\n"  # once, for three slots
    key = pool_view(d)["prepare"]["key"]
    for lease in leases:
        slot = Path(lease["path"])
        assert (slot / "build" / "deps.txt").read_text() == (slot / "README").read_text()
        assert (slot / "build" / "key").read_text().strip() == key
        assert (slot / ".env").read_text() == "TOKEN=one\n"
        assert agent_git(slot, "status", "--porcelain") == "?? .env\n"  # build/ is ignored
    # An agent that deletes the output and edits .env gets both back at its next lease; a host
    # file that changed is picked up.
    one = leases[0]
    for other in leases[1:]:
        d.call("slots.release", {"lease_id": other["lease_id"]})
    slot = Path(one["path"])
    subprocess.run(["rm", "-rf", str(slot / "build")], check=True)
    (slot / ".env").write_text("TOKEN=stolen\n")
    env.write_text("TOKEN=two\n")
    d.call("slots.release", {"lease_id": one["lease_id"]})
    d.wait_slots("repo", "available", 3, timeout=60)
    for _ in range(3):
        lease = d.call("slots.allocate", {"pool": "repo", "wait_s": 30})
        if lease["path"] == one["path"]:
            break
    assert (slot / "build" / "deps.txt").exists() and (slot / ".env").read_text() == "TOKEN=two\n"
    assert counter.read_text() == "run\n"


def test_a_base_move_with_the_same_key_reuses_the_output_and_a_new_key_prepares_again(
    necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path
) -> None:
    counter = workdir / "runs"
    commit_file(origin, "deps.lock", "v1\n")
    d = necrod_factory(with_prepare(overlay_pool(origin, slots=2, max_slots=2, fetch_interval_s=1),
                                    PREPARE.format(counter=counter)))  # fmt: skip
    wait_for(lambda: pool_view(d)["prepare"]["state"] == "ready", 30, what="the prepare step")
    first_key = pool_view(d)["prepare"]["key"]
    same = commit_file(origin, "unrelated.txt", "not a key file\n")
    wait_for(lambda: pool_view(d)["base_commit"] == same, 30, what="the base to move")
    d.wait_slots("repo", "available", 2)
    lease = d.call("slots.allocate", {"pool": "repo", "wait_s": 30})
    assert (
        lease["commit"] == same and (Path(lease["path"]) / "build" / "key").read_text().strip() == first_key
    )
    assert counter.read_text() == "run\n"
    d.call("slots.release", {"lease_id": lease["lease_id"]})
    changed = commit_file(origin, "deps.lock", "v2\n")
    wait_for(lambda: pool_view(d)["prepare"]["key"] != first_key and pool_view(d)["prepare"]["state"] == "ready",
             30, what="the step to run for the new key")  # fmt: skip
    assert counter.read_text() == "run\nrun\n"

    def on_new_key() -> dict[str, Any] | None:
        lease = d.call("slots.allocate", {"pool": "repo", "wait_s": 30})
        key = Path(lease["path"]) / "build" / "key"
        assert key.exists(), f"a slot without the step's output: {slot_view(d, lease['slot_id'])}"
        if lease["commit"] == changed and key.read_text().strip() == pool_view(d)["prepare"]["key"]:
            return lease
        d.call("slots.release", {"lease_id": lease["lease_id"]})
        return None

    wait_for(on_new_key, 30, interval=0.3, what="a slot on the new key's output")
    layers = Path(pool_view(d)["mirror"]).parent / "layers"
    wait_for(lambda: not (layers / f"prepared-{first_key}").exists(), 30, what="the old output to go")


def test_a_failing_step_keeps_the_pool_serving_and_says_why(
    necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path
) -> None:
    failing = '      command: "echo compiling; echo the step broke >&2; exit 3"\n'
    d = necrod_factory(with_prepare(overlay_pool(origin), failing))
    view = wait_for(lambda: (v := pool_view(d)["prepare"])["state"] == "failed" and v, 30, what="the failure")
    assert "exited with 3" in view["error"] and "the step broke" in view["error"]
    assert Path(view["log"]).read_text() == "compiling\nthe step broke\n"
    shown = d.call("pools.prepare_log", {"pool": "repo"})
    assert shown["data"] == "compiling\nthe step broke\n" and shown["eof"] and shown["state"] == "failed"
    ctl = [sys.executable, "-m", "necrod.ctl.main", "--socket", str(d.socket)]
    assert (
        subprocess.run([*ctl, "prepare-log", "repo"], capture_output=True, text=True).stdout == shown["data"]
    )
    listing = subprocess.run([*ctl, "pools"], capture_output=True, text=True).stdout
    assert "failed" in listing.splitlines()[1] and "prepare failed: the prepare step exited with 3" in listing
    lease = d.call("slots.allocate", {"pool": "repo", "wait_s": 30})  # a bare slot, all the same
    assert (Path(lease["path"]) / "README").exists() and not (Path(lease["path"]) / "build").exists()
    with d.client() as c:
        c.subscribe(["pools"], since=0)
        events = [e for e in c.events(timeout=0.5) if e["type"] == "pool.prepare"]
    assert [e["state"] for e in events][:2] == ["running", "failed"]
    assert "retry_in_s" in events[1]


def test_held_uppers_survive_a_crash_and_a_reboot(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    d = necrod_factory(overlay_pool(origin, slots=2, max_slots=2))
    held = d.call("slots.allocate", {"pool": "repo"})
    slot = Path(held["path"])
    (slot / "work.txt").write_text("an agent's work in progress\n")
    d.kill9()
    assert mounted(slot)  # mounts outlive the daemon
    d.start()
    assert (slot / "work.txt").exists()
    # A reboot takes every mount: the held slot is mounted again on its upper, the idle one remade.
    d.kill9()
    for path in sorted(Path(held["path"]).parent.iterdir()):
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)
    assert not mounted(slot)
    d.start()
    assert mounted(slot) and (slot / "work.txt").read_text() == "an agent's work in progress\n"
    d.wait_slots("repo", "available", 1)
    assert all(mounted(s["path"]) for s in d.call("slots.list", {"pool": "repo"})["slots"])
    d.call("slots.heartbeat", {"lease_id": held["lease_id"]})
    d.call("slots.release", {"lease_id": held["lease_id"]})
    d.wait_slots("repo", "available", 2, timeout=60)
    shown = d.call("salvage.show", {"lease_id": held["lease_id"]})
    assert {"status": "A", "path": "work.txt"} in shown["files"]


@pytest.mark.parametrize("pause_s", [0.0, 0.05, 0.2])
def test_a_kill_9_during_the_reset_is_recovered(
    necrod_factory: Callable[..., Necrod], origin: Path, pause_s: float
) -> None:
    d = necrod_factory(overlay_pool(origin))
    lease = d.call("slots.allocate", {"pool": "repo"})
    slot = Path(lease["path"])
    for i in range(200):
        (slot / f"debris-{i}.txt").write_text("x" * 4096)
    (slot / "README").write_text("the agent's edit\n")
    d.call("slots.release", {"lease_id": lease["lease_id"]})
    time.sleep(pause_s)
    d.kill9()  # somewhere in salvage, the remount, or after
    d.start()
    d.wait_slots("repo", "available", 1, timeout=60)
    again = d.call("slots.allocate", {"pool": "repo"})
    assert again["path"] == lease["path"] and mounted(slot)
    assert agent_git(slot, "status", "--porcelain", "--untracked-files=all") == ""
    files = {f["path"] for f in d.call("salvage.show", {"lease_id": lease["lease_id"]})["files"]}
    assert "README" in files and "debris-0.txt" in files


def test_a_daemon_that_cannot_mount_refuses_overlay_and_says_what_is_missing(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    if subprocess.run(["setpriv", "--help"], capture_output=True).returncode != 0:
        pytest.skip("setpriv (util-linux) is not installed")
    d = necrod_factory(overlay_pool(origin), start=False,
                       wrapper=["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin", "--"])  # fmt: skip
    d.start(wait=False)
    view = wait_for(lambda: (v := pool_view(d))["state"] == "failed" and v, 30, what="the pool to be refused")
    assert "isolation: overlay" in view["error"] and "CAP_SYS_ADMIN" in view["error"]
    assert not any(mounted(p) for p in (Path(view["mirror"]).parent / "slots").glob("*"))


@pytest.mark.parametrize("kind", ["worktree", "shared-clone"])
def test_prepare_on_git_slots_runs_per_slot_and_cleanup_keeps_its_output(
    necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path, kind: str
) -> None:
    counter = workdir / "runs"
    env = workdir / "app.env"
    env.write_text("TOKEN=one\n")
    commit_file(origin, "deps.lock", "v1\n")
    config = with_prepare(pool_config({"repo": origin}, slots=2, max_slots=2, min_idle=0, isolation=kind),
                          PREPARE.format(counter=counter), f"      .env: {env}\n")  # fmt: skip
    d = necrod_factory(config)
    wait_for(lambda: counter.exists() and counter.read_text() == "run\nrun\n", 30, what="one run per slot")
    lease = d.call("slots.allocate", {"pool": "repo"})
    slot = Path(lease["path"])
    assert (slot / "build" / "deps.txt").exists() and (slot / ".env").read_text() == "TOKEN=one\n"
    (slot / ".env").write_text("TOKEN=changed by the agent\n")
    (slot / "scratch.o").write_text("ignored debris\n")
    d.call("slots.release", {"lease_id": lease["lease_id"]})
    d.wait_slots("repo", "available", 2, timeout=60)
    assert (slot / "build" / "deps.txt").exists() and (slot / ".env").read_text() == "TOKEN=one\n"
    assert counter.read_text() == "run\nrun\n"  # the key did not change: not run again


def test_a_lease_that_changed_nothing_is_cleaned_while_the_pools_git_is_held(
    necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path
) -> None:
    """An overlay's reset is a remount: a cleanup with nothing to salvage runs no git and does
    not wait for the pool's git slots (``git_concurrency``), which a salvage here holds. Every
    git the daemon starts waits while ``hold`` exists."""
    hold, bin_dir = workdir / "hold", workdir / "bin"
    bin_dir.mkdir()
    real_git = subprocess.run(["sh", "-c", "command -v git"], capture_output=True, text=True).stdout.strip()
    (bin_dir / "git").write_text(
        f'#!/bin/sh\nwhile [ -e "{hold}" ]; do sleep 0.05; done\nexec {real_git} "$@"\n'
    )
    (bin_dir / "git").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    d = necrod_factory(overlay_pool(origin, slots=2, max_slots=2, git_concurrency=1), env=env)
    d.wait_slots("repo", "available", 2, timeout=60)
    written = d.call("slots.allocate", {"pool": "repo"})
    untouched = d.call("slots.allocate", {"pool": "repo"})
    (Path(written["path"]) / "work.txt").write_text("the lease's work\n")
    hold.touch()
    try:
        d.call("slots.release", {"lease_id": written["lease_id"]})
        wait_for(
            lambda: d.call("daemon.status")["git"]["running"] >= 1, 30, what="the salvage's git to start"
        )
        d.call("slots.release", {"lease_id": untouched["lease_id"]})
        d.wait_slots("repo", "available", 1, timeout=30)
        assert slot_view(d, untouched["slot_id"])["state"] == "available"
        assert slot_view(d, written["slot_id"])["state"] != "available"
    finally:
        hold.unlink()
    d.wait_slots("repo", "available", 2, timeout=60)
    assert [s["lease_id"] for s in d.call("salvage.list", {"pool": "repo"})["salvage"]] == [
        written["lease_id"]
    ]


def test_work_in_a_slot_found_unmounted_at_release_is_still_salvaged(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    """An overlay that is not mounted when its cleanup starts (one that failed half-way left it
    so; here it is unmounted from outside) is mounted again on its layers and upper before its
    work is salvaged: the salvage must come from the lease's view, not the bare mount point."""
    d = necrod_factory(overlay_pool(origin))
    lease = d.call("slots.allocate", {"pool": "repo"})
    slot = Path(lease["path"])
    (slot / "work.txt").write_text("the lease's work\n")
    subprocess.run(["umount", str(slot)], check=True)
    assert not mounted(slot)
    again = cycle(d, lease)
    files = {f["path"] for f in d.call("salvage.show", {"lease_id": lease["lease_id"]})["files"]}
    assert "work.txt" in files
    assert mounted(slot) and not (Path(again["path"]) / "work.txt").exists()


def test_the_mirror_is_checked_beside_the_remount_of_an_untouched_slot(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    """The cleanup of a lease that changed nothing is a remount under a fresh upper, with the
    mirror's check run beside it rather than before it: what was planted in the mirror is still
    removed and reported, and the slot comes back clean."""
    d = necrod_factory(overlay_pool(origin))
    mirror = Path(pool_view(d)["mirror"])
    lease = d.call("slots.allocate", {"pool": "repo"})
    hook = mirror / "hooks" / "post-checkout"
    hook.write_text("#!/bin/sh\ntouch /tmp/necrod-planted-hook-ran\n")
    hook.chmod(0o755)
    again = cycle(d, lease)
    assert not hook.exists()
    with d.client() as c:
        c.subscribe(["pools"], since=0)
        changed = [e["changed"] for e in c.events(timeout=0.5) if e["type"] == "tamper"]
    assert any("hooks/post-checkout" in path for paths in changed for path in paths), changed
    assert d.call("salvage.list", {"pool": "repo"})["salvage"] == []  # nothing to salvage: no git ran
    assert mounted(again["path"]) and agent_git(Path(again["path"]), "status", "--porcelain") == ""


def test_a_mirror_that_cannot_be_checked_fails_the_remount_cleanly(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    """When the mirror's check fails (its hooks directory is a file that cannot be replaced:
    made immutable here) beside a fresh upper's remount, the cleanup fails as any cleanup does,
    is retried, and the slot is quarantined with the reason, not offered."""
    d = necrod_factory(overlay_pool(origin))
    mirror = Path(pool_view(d)["mirror"])
    lease = d.call("slots.allocate", {"pool": "repo"})
    hooks = mirror / "hooks"
    planted = hooks / "pre-commit"
    planted.write_text("#!/bin/sh\n")
    if subprocess.run(["chattr", "+i", str(planted)], capture_output=True).returncode != 0:
        pytest.skip("this file system has no immutable flag")
    try:
        d.call("slots.release", {"lease_id": lease["lease_id"]})
        wait_for(lambda: slot_view(d, lease["slot_id"])["state"] == "error", 60, what="the quarantine")
        error = slot_view(d, lease["slot_id"])["error"] or ""
        assert "cleanup failed twice" in error and "pre-commit" in error, error
    finally:
        subprocess.run(["chattr", "-i", str(planted)], check=True)
