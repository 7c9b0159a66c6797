"""A hostile agent rearranges its slot's files, its ``.git`` included, against the daemon's own
file handling (issue 16, defects 1-3, 17 and 18).

The agent may replace any file the daemon reads or writes in its slot with a symlink (to make
the daemon write or read elsewhere), a FIFO (to block it), or a sparse file of many GiB (to make
it read for ever); it may craft an index naming paths outside the work tree; it may break its
repository. Whatever it does: nothing outside the slot is written or read into the mirror, the
daemon keeps answering, the slot comes back clean (or rebuilt), and the agent's work is salvaged.
Every case runs on both kinds of pool where the path exists in both.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from necrod.core.config.model import ISOLATIONS as KINDS
from tests.helpers import Necrod, cleanup_dir, commit_file, git, short_tmpdir, wait_for
from tests.reliability.conftest import (
    FIGURES,
    daemon_config,
    rss_kb,
    slots_by_id,
    wait_settled,
    workspaces_of,
)

pytestmark = pytest.mark.reliability

VICTIM_TEXT = "the victim file, untouched\n"
SECRET_TEXT = "a secret of another user, never to reach the mirror\n"


@dataclass
class Scene:
    d: Necrod
    origin: Path
    mirror: Path
    kind: str
    outside: Path

    def git_dir(self, slot: Path) -> Path:
        """The directory the slot's own git state is in (an admin directory of a worktree)."""
        if self.kind == "worktree":
            return self.mirror / "worktrees" / slot.name
        return slot / ".git"


@pytest.fixture(scope="module")
def scenes(module_daemon: Callable[..., Necrod]) -> Iterator[dict[str, Scene]]:
    """One daemon per kind of pool, shared by the module's tests."""
    outside = short_tmpdir()
    out = {}
    for kind in KINDS:
        origins: list[Path] = []

        def config(origin: Path, kind: str = kind, origins: list[Path] = origins) -> str:
            origins.append(origin)
            return daemon_config({"repo": origin}, {"heal_interval_s": 0}, slots=2, max_slots=3, min_idle=0,
                                 isolation=kind, cleanup_timeout_s=60)  # fmt: skip

        d = module_daemon(config)
        out[kind] = Scene(d, origins[0], workspaces_of(d) / "repo" / "mirror.git", kind, outside)
    yield out
    cleanup_dir(outside)


@pytest.fixture
def scene(scenes: dict[str, Scene], kind: str) -> Scene:
    return scenes[kind]


def cases(table: dict[str, list[Any]]) -> list[Any]:
    """``(kind, case)`` parameters from a table of the cases each kind of pool has."""
    return [pytest.param(kind, case, id=f"{kind}-{case}") for kind, items in table.items() for case in items]


@pytest.fixture
def victim(scene: Scene, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A file outside every slot that the agent aims the daemon at."""
    path = scene.outside / f"victim-{request.node.name}".replace("[", "-").replace("]", "").replace("/", "-")
    path.write_text(VICTIM_TEXT)
    yield path
    path.unlink(missing_ok=True)


def release_and_settle(scene: Scene, lease: dict[str, Any], *, timeout: float = 90.0) -> dict[str, Any]:
    """Release ``lease`` and wait for its slot to come back (available, or in error)."""
    with scene.d.client() as c:
        c.release(lease["lease_id"])

    def back() -> dict[str, Any] | None:
        slot = slots_by_id(scene.d).get(lease["slot_id"])
        return slot if slot is not None and slot["state"] in ("available", "error") else None

    return wait_for(back, timeout, interval=0.1, what="the slot to come back")  # type: ignore[no-any-return]


def salvaged_files(scene: Scene, lease_id: str) -> set[str]:
    with scene.d.client() as c:
        return {f["path"] for f in c.salvage_show(lease_id)["files"]}


def blob_id(text: str) -> str:
    data = text.encode()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def mirror_has(scene: Scene, sha: str) -> bool:
    return subprocess.run(["git", "--git-dir", str(scene.mirror), "cat-file", "-e", sha],
                          capture_output=True).returncode == 0  # fmt: skip


def crafted_index(entries: list[tuple[str, str]]) -> bytes:
    """A version 2 index naming ``entries`` (path, blob id), as an attacker writes it by hand:
    git refuses to make one with these paths, but reads it."""
    body = b"DIRC" + struct.pack(">II", 2, len(entries))
    for path, sha in sorted(entries):
        name = path.encode()
        entry = struct.pack(">10I", 0, 0, 0, 0, 0, 0, 0o100644, 0, 0, 0) + bytes.fromhex(sha)
        entry += struct.pack(">H", min(len(name), 0xFFF)) + name
        body += entry + b"\0" * (8 - len(entry) % 8)
    return body + hashlib.sha1(body).digest()


def fresh_lease(scene: Scene, holder: str) -> tuple[dict[str, Any], Path]:
    wait_settled(scene.d)
    with scene.d.client() as c:
        lease = c.allocate("repo", holder=holder, wait_s=60)
    slot = Path(lease["path"])
    (slot / "work.txt").write_text(f"work of {holder}\n")
    return lease, slot


# --- 1 and the class: nothing the daemon writes follows a symlink in a slot ---------------------------

#: Paths (relative to the slot's git directory, or to the slot with a leading "/") where the
#: daemon writes, or once wrote: each planted as a symlink to a victim file.
WRITE_TARGETS = {
    "worktree": ["necrod-salvage.index", "index", "commondir", "gitdir", "commondir.necrod-tmp", "/.git"],
    "shared-clone": ["necrod-salvage.index", "index", "config", "config.necrod-tmp",
                     "objects/info/alternates", "HEAD"],
    "overlay": ["necrod-salvage.index", "index", "config", "config.necrod-tmp", "objects/info/alternates", "HEAD"],
}  # fmt: skip
FORMER_TARGETS = {"necrod-salvage.index", "commondir.necrod-tmp", "config.necrod-tmp"}


@pytest.mark.parametrize(("kind", "target"), cases(WRITE_TARGETS))
def test_no_write_follows_a_symlink_planted_in_the_slot(scene: Scene, victim: Path, target: str) -> None:
    lease, slot = fresh_lease(scene, f"symlink-{target}")
    planted = slot / target[1:] if target.startswith("/") else scene.git_dir(slot) / target
    planted.unlink(missing_ok=True)
    planted.symlink_to(victim)
    FIGURES["symlinks planted in slots"] += 1
    back = release_and_settle(scene, lease)
    assert victim.read_text() == VICTIM_TEXT, f"the daemon wrote through {target}"
    if target not in FORMER_TARGETS:  # names earlier versions wrote; nothing uses them now
        assert not planted.is_symlink(), f"{target} is still a symlink after cleanup"
    assert back["state"] == "available", back
    assert "work.txt" in salvaged_files(scene, lease["lease_id"])


@pytest.mark.parametrize("kind", KINDS)
def test_a_tracked_directory_replaced_by_a_symlink_is_not_written_through(scene: Scene) -> None:
    trap = scene.outside / f"tracked-dir-trap-{scene.kind}"
    trap.mkdir()
    lease, slot = fresh_lease(scene, "tracked-dir")
    subprocess.run(["rm", "-rf", str(slot / "pkg0")], check=True)
    (slot / "pkg0").symlink_to(trap)
    back = release_and_settle(scene, lease)
    assert list(trap.iterdir()) == [], "the reset wrote tracked files through the symlink"
    assert back["state"] == "available"
    assert (slot / "pkg0").is_dir() and not (slot / "pkg0").is_symlink()
    assert git(slot, "status", "--porcelain", "--untracked-files=all") == ""


# --- 2: salvage takes only paths inside the work tree ------------------------------------------------


@pytest.mark.parametrize("how", ["dotdot", "absolute", "dot-git", "beyond-a-symlink"])
@pytest.mark.parametrize("kind", KINDS)
def test_salvage_takes_no_path_outside_the_work_tree(scene: Scene, how: str) -> None:
    secret_dir = scene.outside / f"secret-{scene.kind}-{how}"
    secret_dir.mkdir()
    secret = secret_dir / "secret"
    secret.write_text(SECRET_TEXT + how)
    sha = blob_id(SECRET_TEXT + how)
    lease, slot = fresh_lease(scene, f"index-{how}")
    readme = git(slot, "rev-parse", "HEAD:README")
    depth = "../" * (len(slot.parts) - 1)
    path = {
        "dotdot": f"{depth}{str(secret).lstrip('/')}",
        "absolute": str(secret),
        "dot-git": ".git/../../" + f"{depth}{str(secret).lstrip('/')}",
        "beyond-a-symlink": "link/secret",
    }[how]
    if how == "beyond-a-symlink":
        (slot / "link").symlink_to(secret_dir)
    (scene.git_dir(slot) / "index").write_bytes(crafted_index([("README", readme), (path, readme)]))
    FIGURES["crafted index entries"] += 1
    back = release_and_settle(scene, lease)
    assert back["state"] == "available"
    assert not mirror_has(scene, sha), f"{how}: the secret was hashed into the mirror"
    with scene.d.client() as c:
        shown = c.salvage_show(lease["lease_id"])
    tree = git(scene.mirror, "ls-tree", "-r", "--name-only", shown["commit"]).splitlines()
    assert not [p for p in tree if p.startswith("/") or {"..", ".git"} & set(p.split("/"))], tree
    assert "work.txt" in tree


# --- 3 and the class: nothing read in a slot blocks the loop or is read unbounded ---------------------

#: What an agent makes of a file the daemon (or its git) reads: (relative path, how).
READ_TARGETS = {
    "worktree": ["commondir:fifo", "gitdir:fifo", "index:fifo", "HEAD:fifo", "/.git:fifo", "commondir:sparse",
                 "index:sparse", "/.git:sparse", "@config:fifo", "@config:sparse", "@packed-refs:fifo"],
    "shared-clone": ["config:fifo", "objects/info/alternates:fifo", "index:fifo", "HEAD:fifo",
                     "packed-refs:fifo", "config:sparse", "objects/info/alternates:sparse", "index:sparse"],
    "overlay": ["config:fifo", "objects/info/alternates:fifo", "index:fifo", "HEAD:fifo",
                "packed-refs:fifo", "config:sparse", "objects/info/alternates:sparse", "index:sparse"],
}  # fmt: skip
SPARSE_BYTES = 16 << 30


@dataclass
class Stalls:
    worst_s: float = 0.0
    calls: int = 0


def probe_status(d: Necrod, stop: threading.Event, out: Stalls) -> None:
    with d.client(timeout=30) as c:
        while not stop.is_set():
            started = time.monotonic()
            c.status()
            out.worst_s = max(out.worst_s, time.monotonic() - started)
            out.calls += 1
            time.sleep(0.05)


def release_probed(scene: Scene, lease: dict[str, Any]) -> tuple[dict[str, Any], Stalls]:
    """``release_and_settle``, with ``daemon.status`` probed every 50 ms throughout."""
    stop, stalls = threading.Event(), Stalls()
    prober = threading.Thread(target=probe_status, args=(scene.d, stop, stalls))
    prober.start()
    try:
        return release_and_settle(scene, lease, timeout=120), stalls
    finally:
        stop.set()
        prober.join(30)


@pytest.mark.parametrize(("kind", "target"), cases(READ_TARGETS))
def test_a_fifo_or_a_huge_file_in_the_slot_never_stalls_the_daemon(scene: Scene, target: str) -> None:
    rel, how = target.rsplit(":", 1)
    lease, slot = fresh_lease(scene, f"read-{how}")
    if rel.startswith("@"):  # the mirror's own file: a worktree agent reaches the whole mirror
        planted = scene.mirror / rel[1:]
    elif rel.startswith("/"):
        planted = slot / rel[1:]
    else:
        planted = scene.git_dir(slot) / rel
    planted.unlink(missing_ok=True)
    if how == "fifo":
        os.mkfifo(planted)
    else:
        with open(planted, "wb") as f:
            f.truncate(SPARSE_BYTES)
    FIGURES[f"{how}s planted in slots"] += 1
    rss_before = rss_kb(scene.d.proc.pid)  # type: ignore[union-attr]
    back, stalls = release_probed(scene, lease)
    growth_mb = (rss_kb(scene.d.proc.pid) - rss_before) / 1024  # type: ignore[union-attr]
    assert stalls.calls > 0 and stalls.worst_s < 2.0, f"daemon.status stalled {stalls.worst_s:.2f}s"
    assert growth_mb < 200, f"the daemon grew by {growth_mb:.0f} MB reading {target}"
    assert back["state"] == "available", back
    assert "work.txt" in salvaged_files(scene, lease["lease_id"])
    if planted.exists():
        assert planted.is_file() and planted.stat().st_size < SPARSE_BYTES


@pytest.mark.parametrize("kind", ["worktree", "shared-clone"])
@pytest.mark.timeout(300)  # planting 200,000 names takes 5 s here, and up to ten times that on a slow disk
def test_a_lock_made_a_directory_of_many_files_is_removed_off_the_loop(scene: Scene) -> None:
    """A killed git's ``index.lock`` is removed at cleanup, whatever is at its name: 200,000
    files there took the event loop 3 s to delete (a worktree's is in the mirror, where any
    slot of the pool can plant it). They are hard links of a few files: as many names to delete,
    without an inode each to make (that took this test 12 to 120 s on CI's disk)."""
    lease, slot = fresh_lease(scene, "lock-dir")
    lock = scene.git_dir(slot) / "index.lock"
    lock.mkdir()
    fd = os.open(lock, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(200_000):
            if i % 60_000 == 0:  # ext4 allows 65,000 links to a file
                source = str(i)
                os.close(os.open(source, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
            else:
                os.link(source, str(i), src_dir_fd=fd, dst_dir_fd=fd)
    finally:
        os.close(fd)
    back, stalls = release_probed(scene, lease)
    assert stalls.calls > 0 and stalls.worst_s < 1.0, f"daemon.status stalled {stalls.worst_s:.2f}s"
    assert back["state"] == "available", back
    assert not lock.exists() and "work.txt" in salvaged_files(scene, lease["lease_id"])


# --- 17a: salvage writes nothing through a symlinked object or ref directory ----------------------------


@pytest.mark.parametrize(
    ("kind", "where"),
    cases({"worktree": ["objects-fanout", "refs-necrod"],
           "shared-clone": ["objects-fanout", "refs", "refs-necrod", "objects-pack"],
           "overlay": ["objects-fanout", "refs", "refs-necrod", "objects-pack"]}),
)  # fmt: skip
def test_salvage_writes_nothing_through_a_symlinked_git_directory(scene: Scene, where: str) -> None:
    trap = scene.outside / f"trap-{scene.kind}-{where}"
    trap.mkdir()
    lease, slot = fresh_lease(scene, f"dir-{where}")
    repo = scene.mirror if scene.kind == "worktree" else slot / ".git"
    work = "salvage me, " + where
    blob = blob_id(work + "\n")
    # A fanout directory that holds none of the mirror's objects: removing one that does is a
    # mirror losing objects (its repair is another test's), not what this one is about. A
    # mirror cloned from a local origin by hard links keeps the origin's loose objects.
    n = 0
    while where == "objects-fanout" and any((repo / "objects" / blob[:2]).glob("*")):
        n += 1
        work = f"salvage me, {where} ({n})"
        blob = blob_id(work + "\n")
    (slot / "work.txt").write_text(work + "\n")
    target = {
        "objects-fanout": repo / "objects" / blob[:2],
        "objects-pack": repo / "objects" / "pack",
        "refs": repo / "refs",
        "refs-necrod": repo / "refs" / "necrod",
    }[where]
    subprocess.run(["rm", "-rf", str(target)], check=True)
    target.symlink_to(trap)
    back = release_and_settle(scene, lease)
    assert list(trap.iterdir()) == [], f"the daemon wrote into {where} through its symlink"
    assert back["state"] == "available"
    assert "work.txt" in salvaged_files(scene, lease["lease_id"])


@pytest.mark.parametrize("kind", ["worktree"])  # the mirror's objects are the slot's
def test_mirror_objects_removed_behind_a_symlink_are_fetched_again_not_through_it(scene: Scene) -> None:
    """An agent in a worktree slot replaces one of the mirror's object directories, objects and
    all, with a symlink, there where an earlier lease's salvage commit is: the mirror is repaired
    (fetched again) with the symlink gone first, so nothing is written through it; the salvage,
    which only the mirror had, is lost and its ref dropped (a ref to a missing object would
    break every fetch after); the slot comes back and the pool goes on fetching."""
    trap = scene.outside / "trap-mirror-objects"
    trap.mkdir()
    earlier, slot = fresh_lease(scene, "mirror-objects-earlier")
    (slot / "earlier.txt").write_text("the earlier lease's work\n")
    release_and_settle(scene, earlier)
    with scene.d.client() as c:
        kept = c.salvage_show(earlier["lease_id"])["commit"]
    lease, slot = fresh_lease(scene, "mirror-objects")
    fanout = scene.mirror / "objects" / kept[:2]
    assert fanout.is_dir(), "the salvage commit is a loose object of the mirror"
    lost = sorted(fanout.name + o.name for o in fanout.iterdir())
    subprocess.run(["rm", "-rf", str(fanout)], check=True)
    fanout.symlink_to(trap)
    (slot / "work.txt").write_text("work\n")
    back = release_and_settle(scene, lease)
    assert list(trap.iterdir()) == [], "the daemon wrote into the mirror's objects through the symlink"
    assert back["state"] == "available", back["error"]
    assert not fanout.is_symlink()

    # What the origin has is fetched again; a salvage whose objects only the mirror had is lost,
    # and its ref dropped: a ref to a missing object would break every fetch after.
    def has(repo: Path, oid: str) -> bool:
        return subprocess.run(["git", "-C", str(repo), "cat-file", "-e", oid]).returncode == 0

    with scene.d.client() as c:
        c.call("anomalies.list", {"pool": "repo", "deep": True, "heal": True})  # the mirror checked
    assert [oid for oid in lost if has(scene.origin, oid) and not has(scene.mirror, oid)] == []
    fsck = subprocess.run(["git", "-C", str(scene.mirror), "fsck", "--connectivity-only", "--no-dangling"],
                          capture_output=True, text=True)  # fmt: skip
    assert fsck.returncode == 0, fsck.stderr
    with scene.d.client() as c:
        gone = [s["lease_id"] for s in c.salvage_list("repo")["salvage"]]
    assert earlier["lease_id"] not in gone
    commit_file(scene.origin, "after-repair.txt", "x\n", branch="after-repair")
    with scene.d.client() as c:
        after = c.allocate("repo", ref="after-repair", wait_s=60)
        c.release(after["lease_id"])
    assert after["commit"] == git(scene.origin, "rev-parse", "after-repair")
    assert "work.txt" in salvaged_files(scene, lease["lease_id"])


# --- 17b: a half-remade repository is cleaned again, never quarantined ---------------------------------


@pytest.mark.parametrize("gone", ["refs", "refs/heads", "objects/pack"])
@pytest.mark.parametrize("kind", ["shared-clone"])
def test_a_clone_left_half_reset_is_cleaned_again(scene: Scene, gone: str) -> None:
    lease, slot = fresh_lease(scene, f"half-{gone}")
    subprocess.run(["rm", "-rf", str(slot / ".git" / gone)], check=True)
    back = release_and_settle(scene, lease)
    assert back["state"] == "available", back
    assert git(slot, "status", "--porcelain", "--untracked-files=all") == ""


# --- 17c: cleanup deletes only the lease's own branch -------------------------------------------------


@pytest.mark.parametrize("kind", ["worktree"])  # a shared clone's branches are its own
def test_cleanup_never_deletes_a_branch_another_slot_is_on(scene: Scene) -> None:
    wait_settled(scene.d)
    with scene.d.client() as c:
        holder = c.allocate("repo", holder="branch-owner", branch="owned-by-a", wait_s=60)
        agent = c.allocate("repo", holder="branch-thief", wait_s=60)
    admin = scene.mirror / "worktrees" / Path(agent["path"]).name
    (admin / "HEAD").write_text("ref: refs/heads/owned-by-a\n")
    release_and_settle(scene, agent)
    assert git(scene.mirror, "rev-parse", "--verify", "refs/heads/owned-by-a")
    # The lease's own branch still goes.
    with scene.d.client() as c:
        mine = c.allocate("repo", holder="own-branch", wait_s=60)
    git(mine["path"], "checkout", "-q", "-b", "made-by-the-agent")
    release_and_settle(scene, mine)
    assert git(scene.mirror, "rev-parse", "--verify", "-q", "refs/heads/made-by-the-agent", check=False) == ""
    release_and_settle(scene, holder)


# --- 17e: a broken repository does not lose the work tree ----------------------------------------------


@pytest.mark.parametrize("breakage", ["removed", "a-file", "a-symlink", "head-gone"])
@pytest.mark.parametrize("kind", KINDS)
def test_the_work_tree_is_salvaged_when_the_repository_is_broken(scene: Scene, breakage: str) -> None:
    lease, slot = fresh_lease(scene, f"broken-{breakage}")
    (slot / "untracked-work.txt").write_text("never lose me\n")
    dotgit = slot / ".git"
    if breakage == "head-gone":
        (scene.git_dir(slot) / "HEAD").unlink()
    else:
        subprocess.run(["rm", "-rf", str(dotgit)], check=True)
        if breakage == "a-file":
            dotgit.write_text("not a repository\n")
        elif breakage == "a-symlink":
            dotgit.symlink_to(scene.outside)
    back = release_and_settle(scene, lease)
    assert back["state"] == "available", back
    assert {"untracked-work.txt", "work.txt"} <= salvaged_files(scene, lease["lease_id"])
    assert git(slot, "status", "--porcelain", "--untracked-files=all") == ""


# --- 18: tags and stash entries go with the lease ------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_tags_and_stashes_are_salvaged_with_the_lease_then_removed(scene: Scene) -> None:
    lease, slot = fresh_lease(scene, "tagger")
    git(slot, "tag", "at-start")
    commit_file(slot, "committed.txt", "a commit of the agent\n")
    git(slot, "tag", "-a", "-m", "annotated", "on-my-commit")
    (slot / "README").write_text("stashed edit\n")
    git(slot, "stash", "push", "-q", "-m", "the stash")
    stashed = git(slot, "rev-parse", "refs/stash")
    release_and_settle(scene, lease)
    # The slot, clean again (in a worktree pool every slot sees the same tags and stash).
    assert git(slot, "tag", "-l", "at-start", "on-my-commit") == ""
    assert git(slot, "stash", "list") == ""
    with scene.d.client() as c:
        shown = c.salvage_show(lease["lease_id"])
    commit = shown["commit"]
    message = git(scene.mirror, "log", "-1", "--format=%B", commit)
    assert "refs/tags/at-start" in message and "refs/tags/on-my-commit" in message and "stash@{0}" in message
    parents = git(scene.mirror, "log", "-1", "--format=%P", commit).split()
    assert stashed in parents
    assert git(scene.mirror, "show", f"{stashed}:README") == "stashed edit"


@pytest.mark.parametrize("kind", ["worktree"])  # a shared clone's tags are in the slot: no fetch prunes them
def test_an_agents_tag_outlives_a_fetch_until_its_lease_is_salvaged(scene: Scene) -> None:
    lease, slot = fresh_lease(scene, "tag-keeper")
    commit_file(slot, "mine.txt", "only this tag names me\n")
    git(slot, "tag", "made-before-a-fetch")
    commit_file(scene.origin, "later.txt", "later\n", branch="pushed-during-the-lease")
    git(scene.origin, "checkout", "-q", "main")
    with scene.d.client() as c:
        fetcher = c.allocate("repo", ref="pushed-during-the-lease", wait_s=30)  # a fetch with --prune
    assert git(scene.mirror, "rev-parse", "--verify", "-q", "refs/tags/made-before-a-fetch", check=False)
    release_and_settle(scene, lease)
    release_and_settle(scene, fetcher)
    with scene.d.client() as c:
        commit = c.salvage_show(lease["lease_id"])["commit"]
    assert "refs/tags/made-before-a-fetch" in git(scene.mirror, "log", "-1", "--format=%B", commit)
    assert git(scene.mirror, "tag", "-l", "made-before-a-fetch") == ""


@pytest.mark.parametrize("kind", KINDS)
def test_origin_tags_are_not_taken_from_a_worktree_pool(scene: Scene) -> None:
    git(scene.origin, "tag", f"v-origin-{scene.kind}")
    lease, _ = fresh_lease(scene, "origin-tags")
    with scene.d.client() as c:
        fetcher = c.allocate("repo", ref=f"v-origin-{scene.kind}", wait_s=30)  # fetches the new tag
    release_and_settle(scene, lease)
    release_and_settle(scene, fetcher)
    assert git(scene.mirror, "rev-parse", "--verify", f"refs/tags/v-origin-{scene.kind}")


# --- 12: the daemon's git reads no config file of its own ----------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_planted_global_config_is_not_read(scene: Scene) -> None:
    marker = scene.outside / f"global-config-{scene.kind}"
    state = scene.d.state_dir
    (state / "gitconfig").write_text(f'[filter "x"]\n\tclean = touch {marker}; cat\n\tsmudge = touch {marker}; cat\n'
                                     f"[core]\n\tfsmonitor = touch {marker}\n")  # fmt: skip
    lease, slot = fresh_lease(scene, "global-config")
    (slot / ".gitattributes").write_text("* filter=x\n")
    release_and_settle(scene, lease)
    assert not marker.exists()
