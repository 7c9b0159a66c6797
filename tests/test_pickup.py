"""Picking up what an agent left, with necroctl: diff, checkout, apply, branch, push."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from necrod.proto.errors import NecrodError
from tests.helpers import Necrod, git
from tests.test_ctl import ctl
from tests.test_resume import leave_work, status


def lost_lease(d: Necrod) -> tuple[str, str]:
    """A lease that committed and left work, released: its id and its last commit."""
    with d.client() as c:
        lease = c.allocate("repo")
        commit = leave_work(Path(lease["path"]))
        c.release(lease["lease_id"])
    d.wait_slots("repo", "available", 2)
    return lease["lease_id"], commit


def test_diff_shows_everything_the_lease_did(necrod: Necrod) -> None:
    lease_id, _ = lost_lease(necrod)
    r = ctl(necrod, "salvage", "diff", lease_id)
    assert r.returncode == 0, r.stderr
    for line in ("+committed by the agent", "+changed, not committed", "-content 2", "+untracked",
                 "diff --git a/notes.txt b/notes.txt"):  # fmt: skip
        assert line in r.stdout
    data = json.loads(ctl(necrod, "--json", "salvage", "diff", lease_id).stdout)
    assert data["truncated"] is False and data["lease_id"] == lease_id and data["patch"] == r.stdout


def test_a_diff_past_its_limit_is_cut_there(necrod: Necrod) -> None:
    """A patch is read up to its 8 MiB, not whole and then cut: git is stopped there."""
    with necrod.client() as c:
        lease = c.allocate("repo")
        (Path(lease["path"]) / "long.txt").write_text("a line an agent wrote, again and again\n" * 300_000)
        c.release(lease["lease_id"])
        necrod.wait_slots("repo", "available", 2)
        data = c.call("salvage.diff", {"lease_id": lease["lease_id"]})
    assert data["truncated"] is True and len(data["patch"]) == 8 << 20
    assert data["patch"].startswith("diff --git a/long.txt b/long.txt")


def test_checkout_and_apply_put_the_work_back(necrod: Necrod, workdir: Path, origin: Path) -> None:
    lease_id, commit = lost_lease(necrod)
    r = ctl(necrod, "salvage", "checkout", lease_id)
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip())
    assert git(path, "rev-parse", "HEAD") == commit
    assert status(path) == ["?? notes.txt", "D pkg2/sub2/file2.txt", "M pkg1/sub1/file1.txt"]
    # apply: into a person's own clone, at the commit the lease started from.
    mine = workdir / "mine"
    git(workdir, "clone", "-q", str(origin), str(mine))
    r = ctl(necrod, "salvage", "apply", lease_id, "-C", str(mine))
    assert r.returncode == 0 and "applied the work of lease" in r.stdout, r.stderr
    assert (mine / "README").read_text() == "committed by the agent\n"
    assert (mine / "notes.txt").read_text() == "untracked\n"
    assert not (mine / "pkg2" / "sub2" / "file2.txt").exists()


def test_branch_and_push_publish_one_plain_commit(necrod: Necrod, origin: Path) -> None:
    lease_id, commit = lost_lease(necrod)
    r = ctl(necrod, "salvage", "branch", lease_id, "agent/kept")
    assert r.returncode == 0 and "branch agent/kept" in r.stdout, r.stderr
    again = ctl(necrod, "salvage", "branch", lease_id, "agent/kept")
    assert again.returncode == 1 and "already_exists" in again.stderr
    r = ctl(necrod, "--json", "salvage", "push", lease_id, "agent/pushed", "-m", "Pick up the login fix")
    assert r.returncode == 0, r.stderr
    pushed = json.loads(r.stdout)
    assert pushed["pushed"] is True
    # On the origin: one commit on top of the lease's own, holding its uncommitted work too.
    assert git(origin, "rev-parse", "agent/pushed") == pushed["commit"]
    assert git(origin, "rev-parse", "agent/pushed^") == commit
    assert git(origin, "log", "-1", "--format=%s", "agent/pushed") == "Pick up the login fix"
    assert git(origin, "show", "agent/pushed:notes.txt") == "untracked"
    assert git(origin, "rev-list", "--count", "agent/pushed^@") == "3"  # no salvage-only parents
    # A branch the origin has already is not overwritten.
    r = ctl(necrod, "salvage", "push", lease_id, "main")
    assert r.returncode == 1 and "failed_precondition: the origin refused branch 'main'" in r.stderr, r.stderr
    assert git(origin, "log", "-1", "--format=%s", "main") == "second"
    # ... and the refused push left no branch behind in the mirror.
    assert ctl(necrod, "salvage", "branch", lease_id, "main").returncode == 0


def test_salvage_commands_refuse_what_is_not_there(necrod: Necrod) -> None:
    r = ctl(necrod, "salvage", "diff", "l-0000000000000000")
    assert r.returncode == 1 and "not_found" in r.stderr
    lease_id, _ = lost_lease(necrod)
    r = ctl(necrod, "salvage", "branch", lease_id, "bad..name")
    assert r.returncode == 1 and "invalid_params" in r.stderr


def test_a_forged_signed_salvage_runs_no_program_of_the_agents(necrod: Necrod, workdir: Path) -> None:
    """In a worktree pool an agent writes the mirror's config and refs: it signs a commit, names
    it a salvage and asks git to check signatures with a program of its own. Reading that
    salvage (show, diff, resume, branch) must not run it."""
    marker = workdir / "signature-program-ran"
    with necrod.client() as c:
        lease = c.allocate("repo")
        slot = Path(lease["path"])
        evil = slot / "gpg.sh"
        evil.write_text(f"#!/bin/sh\ntouch {marker}\n")
        evil.chmod(0o755)
        tree = git(slot, "rev-parse", "HEAD^{tree}")
        head = git(slot, "rev-parse", "HEAD")
        body = (f"tree {tree}\nparent {head}\nauthor a <a@b> 1 +0000\ncommitter a <a@b> 1 +0000\n"
                "gpgsig -----BEGIN PGP SIGNATURE-----\n \n abc\n -----END PGP SIGNATURE-----\n\n"
                "forged\n\nNecrod-Uid: 0\n")  # fmt: skip
        signed = subprocess.run(["git", "-C", str(slot), "hash-object", "-t", "commit", "-w", "--stdin"],
                                input=body.encode(), capture_output=True, check=True).stdout.decode().strip()  # fmt: skip
        git(slot, "update-ref", "refs/necrod/salvage/l-00000000000000ff", signed)
        git(slot, "config", "log.showSignature", "true")
        git(slot, "config", "gpg.program", str(evil))
        # The plant works: the agent's own git runs the program.
        git(slot, "log", "-1", "--format=%H", signed)
        assert marker.exists()
        marker.unlink()
        for call in (
            lambda: c.salvage_show("l-00000000000000ff"),
            lambda: c.salvage_diff("l-00000000000000ff"),
            lambda: c.allocate("repo", from_salvage="l-00000000000000ff"),
            lambda: c.salvage_list("repo"),
        ):
            try:
                call()
            except NecrodError:
                pass
        c.salvage_branch("l-00000000000000ff", "picked")
        c.release(lease["lease_id"])
    assert not marker.exists(), "a program the agent named ran under the daemon's git"
