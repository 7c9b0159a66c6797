"""Git LFS pools (``lfs:``), against a ``file://`` origin that holds its LFS objects (git-lfs reads
those with its standalone file transfer: no server).

``lfs: true``: slots have the real content, smudged from the mirror's LFS store, fetched once;
``pointers`` and ``false``: pointer files. An agent's ``.lfsconfig`` redirects nothing, and a
pool that wants LFS where git-lfs is missing fails with a clear error while the others serve.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from necrod.core.config import ConfigError, parse_config
from necrod.core.lfs import lfs_endpoint
from tests.helpers import GIT_ENV, Necrod, git, pool_config, wait_for

GIT_LFS = shutil.which("git-lfs")
pytestmark = pytest.mark.skipif(GIT_LFS is None, reason="git-lfs is not installed (.ci/run installs it)")

POINTER_HEADER = b"version https://git-lfs.github.com/spec/v1\n"
#: An agent's own git with git-lfs installed the usual way (``git lfs install`` writes these).
AGENT_LFS = ["-c", "filter.lfs.process=git-lfs filter-process", "-c", "filter.lfs.required=true",
             "-c", "filter.lfs.clean=git-lfs clean -- %f", "-c", "filter.lfs.smudge=git-lfs smudge -- %f"]  # fmt: skip


def agent_git(slot: Path, *args: str) -> str:
    """git as an agent runs it in its slot: its own environment, no global config."""
    result = subprocess.run(["git", *args], cwd=slot, env=GIT_ENV, capture_output=True, text=True)
    assert result.returncode == 0, f"git {args} failed: {result.stderr}"
    return result.stdout


def lfs_repository(workdir: Path, content: bytes, lfsconfig: str | None = None) -> tuple[Path, Path]:
    """A work repository with ``data/big.bin`` in LFS (and ``.lfsconfig`` when given), pushed
    to a bare ``origin.git`` that keeps the LFS objects; returns (work, origin)."""
    work, origin = workdir / "work", workdir / "origin.git"
    git(workdir, "init", "-q", "--bare", "-b", "main", str(origin))
    work.mkdir()
    git(work, "init", "-q", "-b", "main")
    git(work, "lfs", "install", "--local")
    git(work, "lfs", "track", "*.bin")
    (work / "data").mkdir()
    (work / "data/big.bin").write_bytes(content)
    (work / "README").write_text("lfs\n")
    if lfsconfig is not None:
        (work / ".lfsconfig").write_text(lfsconfig)
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", "binary in lfs")
    git(work, "remote", "add", "origin", f"file://{origin}")
    git(work, "config", "lfs.url", f"file://{origin}")  # this side trusts no .lfsconfig either
    git(work, "push", "-q", "origin", "main")
    git(work, "lfs", "push", "--all", "origin")
    assert lfs_object(origin, content).is_file()
    return work, origin


def lfs_object(repo: Path, content: bytes) -> Path:
    oid = hashlib.sha256(content).hexdigest()
    return repo / "lfs" / "objects" / oid[:2] / oid[2:4] / oid


def tampered(d: Necrod) -> list[list[str]]:
    """What each ``tamper`` event found changed: git-lfs, necrod's or an agent's, writes
    nothing necrod keeps canonical (a config value, hooks)."""
    with d.client() as c:
        c.subscribe(["pools"], since=0)
        return [e["changed"] for e in c.events(timeout=0.5) if e["type"] == "tamper"]


def blob(n: int, seed: str) -> bytes:
    """Binary content that is not a pointer (zero bytes included)."""
    return b"\0\1\2" + hashlib.sha256(seed.encode()).digest() * (n // 32)


@pytest.fixture
def one_slot() -> dict[str, int]:
    # One slot: the one released is the one handed out next.
    return {"slots": 1, "min_idle": 0, "max_slots": 1}


@pytest.mark.usefixtures("slot_kind")
def test_lfs_true_slots_have_the_content_smudged_from_the_mirror(
    necrod_factory: Callable[..., Necrod], workdir: Path, one_slot: dict[str, int]
) -> None:
    content = blob(64 << 10, "one")
    _, origin = lfs_repository(workdir, content)
    d = necrod_factory(pool_config({"big": f"file://{origin}"}, lfs=True, **one_slot))
    first = d.call("slots.allocate", {"pool": "big"})
    slot = Path(first["path"])
    assert (slot / "data/big.bin").read_bytes() == content
    assert agent_git(slot, "status", "--porcelain") == ""
    pool = d.call("pools.get", {"pool": "big"})
    assert pool["lfs"] == {"mode": True, "fetched": first["commit"]}
    mirror = Path(pool["mirror"])
    assert lfs_object(mirror, content).is_file()  # fetched once, into the mirror's store

    # From here the origin has no LFS objects: everything a slot gets comes from the mirror.
    shutil.rmtree(origin / "lfs")
    edited = blob(4096, "the agent's")
    (slot / "data/big.bin").write_bytes(edited)
    (slot / "notes.txt").write_text("the agent's notes\n")
    d.call("slots.release", {"lease_id": first["lease_id"]})
    d.wait_slots("big", "available", 1)

    second = d.call("slots.allocate", {"pool": "big"})
    assert second["path"] == first["path"]
    assert (slot / "data/big.bin").read_bytes() == content  # restored, from the local store
    assert not (slot / "notes.txt").exists()
    assert agent_git(slot, "status", "--porcelain") == ""

    # The edited file was salvaged as git-lfs stores it: a pointer, its object in the mirror.
    shown = d.call("salvage.show", {"lease_id": first["lease_id"]})
    assert {"status": "M", "path": "data/big.bin"} in shown["files"]
    pointer = git(mirror, "show", f"{shown['commit']}:data/big.bin")
    assert f"oid sha256:{hashlib.sha256(edited).hexdigest()}" in pointer
    assert lfs_object(mirror, edited).read_bytes() == edited
    assert tampered(d) == []


@pytest.mark.usefixtures("slot_kind")
def test_an_agent_pushes_its_lfs_objects_to_the_origin(
    necrod_factory: Callable[..., Necrod], workdir: Path, one_slot: dict[str, int]
) -> None:
    _, origin = lfs_repository(workdir, blob(1000, "base"))
    d = necrod_factory(pool_config({"big": f"file://{origin}"}, lfs=True, **one_slot))
    slot = Path(d.call("slots.allocate", {"pool": "big", "branch": "feature"})["path"])
    mine = blob(3000, "the agent's new file")
    (slot / "data/new.bin").write_bytes(mine)
    agent_git(slot, "add", "data/new.bin")
    agent_git(slot, "commit", "-q", "-m", "a new binary")
    # No pre-push hook runs in a slot: the agent pushes its LFS objects, then its branch.
    agent_git(slot, "lfs", "push", "origin", "feature")
    agent_git(slot, "push", "-q", "origin", "feature")
    assert lfs_object(origin, mine).read_bytes() == mine
    assert git(origin, "cat-file", "-p", "feature:data/new.bin").startswith("version https://git-lfs")


def test_a_new_base_brings_its_lfs_objects_with_the_fetch(
    necrod_factory: Callable[..., Necrod], workdir: Path, one_slot: dict[str, int]
) -> None:
    work, origin = lfs_repository(workdir, blob(1000, "v1"))
    d = necrod_factory(pool_config({"big": f"file://{origin}"}, lfs=True, fetch_interval_s=1, **one_slot))
    newer = blob(3000, "v2")
    (work / "data/big.bin").write_bytes(newer)
    git(work, "commit", "-q", "-am", "v2")
    git(work, "push", "-q", "origin", "main")
    head = git(work, "rev-parse", "HEAD")
    wait_for(lambda: d.call("pools.get", {"pool": "big"})["base_commit"] == head, what="the new base")
    shutil.rmtree(origin / "lfs")
    lease = d.call("slots.allocate", {"pool": "big", "wait_s": 30})
    assert lease["commit"] == head
    assert (Path(lease["path"]) / "data/big.bin").read_bytes() == newer
    assert agent_git(Path(lease["path"]), "status", "--porcelain") == ""


@pytest.mark.parametrize("mode", [False, "pointers"])
def test_pointer_modes_hand_out_pointer_files(
    necrod_factory: Callable[..., Necrod], workdir: Path, one_slot: dict[str, int], mode: bool | str
) -> None:
    content = blob(2048, "pointers")
    _, origin = lfs_repository(workdir, content)
    d = necrod_factory(pool_config({"big": f"file://{origin}"}, lfs=mode, **one_slot))
    slot = Path(d.call("slots.allocate", {"pool": "big"})["path"])
    pointer = (slot / "data/big.bin").read_bytes()
    assert pointer.startswith(POINTER_HEADER)
    assert f"oid sha256:{hashlib.sha256(content).hexdigest()}".encode() in pointer
    assert agent_git(slot, "status", "--porcelain") == ""
    assert agent_git(slot, *AGENT_LFS, "status", "--porcelain") == ""
    mirror = workdir / "d" / "state" / "workspaces" / "big" / "mirror.git"
    assert not lfs_object(mirror, content).exists()  # nothing fetched
    if mode == "pointers":
        # An agent's own git-lfs leaves pointers too: the pool's config excludes every path.
        (slot / "data/big.bin").unlink()
        agent_git(slot, *AGENT_LFS, "checkout", "--", "data/big.bin")
        assert (slot / "data/big.bin").read_bytes() == pointer
        assert not lfs_object(mirror, content).exists()
        assert tampered(d) == []


@pytest.fixture
def trap() -> Iterator[tuple[str, list[bytes]]]:
    """An HTTP endpoint that records whoever connects (and answers nothing useful)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    seen: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(1)
                try:
                    seen.append(conn.recv(4096))
                except OSError:
                    seen.append(b"")
                conn.sendall(b"HTTP/1.1 500 no\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/lfs", seen
    stop.set()
    thread.join(5)
    server.close()


@pytest.mark.usefixtures("slot_kind")
def test_a_hostile_lfsconfig_redirects_nothing(
    necrod_factory: Callable[..., Necrod],
    workdir: Path,
    one_slot: dict[str, int],
    trap: tuple[str, list[bytes]],
) -> None:
    url, seen = trap
    hostile = (
        f'[lfs]\n\turl = "{url}"\n\tfetchexclude = "*"\n\tstandalonetransferagent = evil\n'
        f'[remote "origin"]\n\tlfsurl = "{url}"\n'
        '[lfs "customtransfer.evil"]\n\tpath = /bin/false\n'
    )
    content = blob(8192, "hostile")
    work, origin = lfs_repository(workdir, content, lfsconfig=hostile)
    d = necrod_factory(pool_config({"big": f"file://{origin}"}, lfs=True, **one_slot))
    lease = d.call("slots.allocate", {"pool": "big"})
    slot = Path(lease["path"])
    assert (slot / "data/big.bin").read_bytes() == content  # fetched all the same, from origin
    assert agent_git(slot, "status", "--porcelain") == ""

    # An agent's commit on a branch of the origin, with a new object and the same .lfsconfig:
    # asked for as a ref, its objects come from the origin the pool names, never the trap.
    newer = blob(5000, "branch")
    git(work, "checkout", "-q", "-b", "agent")
    (work / "data/big.bin").write_bytes(newer)
    git(work, "commit", "-q", "-am", "agent's branch")
    git(work, "push", "-q", "origin", "agent")
    d.call("slots.release", {"lease_id": lease["lease_id"]})
    d.wait_slots("big", "available", 1)
    # What an agent in a worktree slot can do (the slot's branches are the mirror's): make the
    # mirror's HEAD branch, whose .lfsconfig git-lfs reads in a bare repository.
    mirror = Path(d.call("pools.get", {"pool": "big"})["mirror"])
    assert git(mirror, "symbolic-ref", "HEAD") == "refs/heads/main"
    git(mirror, "update-ref", "refs/heads/main", git(work, "rev-parse", "main"))
    again = d.call("slots.allocate", {"pool": "big", "ref": "agent"})
    assert (Path(again["path"]) / "data/big.bin").read_bytes() == newer
    assert agent_git(Path(again["path"]), "status", "--porcelain") == ""
    assert seen == []
    assert tampered(d) == []


def test_lfs_without_git_lfs_fails_that_pool_only(
    necrod_factory: Callable[..., Necrod], workdir: Path, origin: Path
) -> None:
    _, lfs_origin = lfs_repository(workdir, blob(100, "missing"))
    bin_dir = workdir / "bin"  # every program of the PATH but git-lfs
    bin_dir.mkdir()
    for directory in os.environ["PATH"].split(os.pathsep):
        for entry in os.scandir(directory) if os.path.isdir(directory) else ():
            if entry.name != "git-lfs" and not (bin_dir / entry.name).exists():
                (bin_dir / entry.name).symlink_to(entry.path)
    config = pool_config({"big": f"file://{lfs_origin}", "plain": origin}, slots=1, min_idle=0)
    config = config.replace(
        f"    repo_url: file://{lfs_origin}\n", f"    repo_url: file://{lfs_origin}\n    lfs: true\n"
    )
    d = necrod_factory(config, start=False, env={**os.environ, "PATH": str(bin_dir)})
    d.start(wait=False)

    def failed() -> dict[str, object] | None:
        pool: dict[str, object] = d.call("pools.get", {"pool": "big"})
        return pool if pool["state"] == "failed" else None

    pool = wait_for(failed, what="the lfs pool to fail")
    assert "git-lfs" in str(pool["error"]) and str(bin_dir) in str(pool["error"])
    plain = d.call("slots.allocate", {"pool": "plain", "wait_s": 30})  # the others serve
    assert (Path(plain["path"]) / "README").exists()
    with d.client() as c:
        c.subscribe(["pools"], since=0)
        events = [e for e in c.events(timeout=0.5) if e["type"] == "pool.state" and e["pool"] == "big"]
    assert any(e["state"] == "failed" and "git-lfs" in e["error"] for e in events)

    # Asked for by a reload, the same: that pool fails, with the same error.
    d.call("slots.release", {"lease_id": plain["lease_id"]})
    assert d.config_path is not None
    d.config_path.write_text(
        config.replace(f"    repo_url: {origin}\n", f"    repo_url: {origin}\n    lfs: true\n")
    )
    d.call("daemon.reload")
    wait_for(lambda: d.call("pools.get", {"pool": "plain"})["state"] == "failed", what="plain to fail")
    assert "git-lfs" in d.call("pools.get", {"pool": "plain"})["error"]


@pytest.mark.usefixtures("slot_kind")
def test_a_changed_lfs_makes_the_slots_again(
    necrod_factory: Callable[..., Necrod], workdir: Path, one_slot: dict[str, int]
) -> None:
    content = blob(2048, "reload")
    _, origin = lfs_repository(workdir, content)
    d = necrod_factory(pool_config({"big": f"file://{origin}"}, lfs="pointers", **one_slot))
    slot = Path(d.call("slots.list", {"pool": "big"})["slots"][0]["path"])
    assert (slot / "data/big.bin").read_bytes().startswith(POINTER_HEADER)
    assert d.config_path is not None
    d.config_path.write_text(pool_config({"big": f"file://{origin}"}, lfs=True, **one_slot))
    d.call("daemon.reload")  # (the daemon may have seen the file change first)
    wait_for(lambda: d.call("pools.get", {"pool": "big"})["lfs"]["mode"] is True, what="the new config")

    def remade() -> dict[str, object] | None:
        lease: dict[str, object] = d.call("slots.allocate", {"pool": "big", "wait_s": 30})
        if (Path(str(lease["path"])) / "data/big.bin").read_bytes() == content:
            return lease
        d.call("slots.release", {"lease_id": lease["lease_id"]})
        return None

    lease = wait_for(remade, what="a slot with the content")
    assert agent_git(Path(str(lease["path"])), "status", "--porcelain") == ""


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("false", False), ("pointers", "pointers"), ("yes", True)],
)
def test_lfs_takes_true_false_or_pointers(value: str, expected: bool | str) -> None:
    config = parse_config(
        f"pools:\n  big:\n    repo_url: https://example.invalid/big.git\n    lfs: {value}\n"
    )
    assert config.pools["big"].lfs == expected


@pytest.mark.parametrize("value", ["content", "1", "[true]", "Pointers"])
def test_lfs_refuses_anything_else(value: str) -> None:
    with pytest.raises(ConfigError, match=r"pools\.big\.lfs must"):
        parse_config(f"pools:\n  big:\n    repo_url: https://example.invalid/big.git\n    lfs: {value}\n")


@pytest.mark.parametrize(
    ("repo_url", "endpoint"),
    [
        ("https://example.com/org/repo", "https://example.com/org/repo.git/info/lfs"),
        ("https://example.com/org/repo.git/", "https://example.com/org/repo.git/info/lfs"),
        ("git@example.com:org/repo.git", "git@example.com:org/repo.git"),
        ("ssh://git@example.com/org/repo.git", "ssh://git@example.com/org/repo.git"),
        ("git://example.com/org/repo", "https://example.com/org/repo.git/info/lfs"),
        ("file:///srv/repo.git", "file:///srv/repo.git"),
        ("/srv/repo.git", "file:///srv/repo.git"),
    ],
)
def test_the_lfs_endpoint_comes_from_the_repo_url(repo_url: str, endpoint: str) -> None:
    assert lfs_endpoint(repo_url) == endpoint
