"""The allocation path's quick check of a slot, against a real mirror and slots of every kind."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from necrod.core.config import PoolConfig
from necrod.core.config.model import ISOLATIONS
from necrod.daemon.pool import Pool
from necrod.daemon.slotkinds import SlotKind
from necrod.io.gitrun import GitRunner
from tests.helpers import delete_slot, git

Slot = tuple[SlotKind, Path]


@pytest.fixture(params=ISOLATIONS)
def slot(request: pytest.FixtureRequest, tmp_path: Path, origin: Path) -> Iterator[Slot]:
    pool = Pool(PoolConfig(name="p", repo_url=str(origin)), tmp_path, GitRunner("git", dict(os.environ)))
    git(tmp_path, "clone", "-q", "--bare", str(origin), str(pool.mirror.path))
    kind = pool.kinds[request.param]
    slot_path = tmp_path / "slots" / "1"
    anyio.run(lambda: kind.add(slot_path, "1", git(pool.mirror.path, "rev-parse", "main"), timeout=60))
    assert git(slot_path, "status", "--porcelain") == ""
    yield kind, slot_path
    subprocess.run(["umount", "-l", str(slot_path)], capture_output=True, check=False)


def test_a_whole_slot_passes(slot: Slot) -> None:
    kind, path = slot
    assert kind.looks_whole("1", str(path))
    assert kind.problem("1", str(path)) is None and kind.pointer_problem("1", str(path)) is None
    assert kind.owns(path) and kind.restore("1", str(path)) == []
    if kind.name == "worktree":
        assert not kind.looks_whole("2", str(path)), "another slot's admin directory"


def _dotgit_symlink(kind: SlotKind, path: Path) -> None:
    target = path.parent / "elsewhere"
    if (path / ".git").is_dir():
        shutil.copytree(path / ".git", target, symlinks=True)
        shutil.rmtree(path / ".git")
    else:
        (path / ".git").rename(target)
    (path / ".git").symlink_to(target)


def _dotgit_elsewhere(kind: SlotKind, path: Path) -> None:
    if kind.name == "worktree":
        (path / ".git").write_text("gitdir: /tmp/not-the-mirror\n")
    else:
        shutil.rmtree(path / ".git")
        (path / ".git").write_text(f"gitdir: {kind.mirror.path}\n")


def _dotgit_swapped(kind: SlotKind, path: Path) -> None:
    """A file where a directory belongs, or the other way round."""
    if kind.name == "worktree":
        (path / ".git").unlink()
        (path / ".git").mkdir()
    else:
        shutil.rmtree(path / ".git")
        (path / ".git").write_text("not a repository\n")


def _head_gone(kind: SlotKind, path: Path) -> None:
    (kind.git_dir("1", str(path)) / "HEAD").unlink()


def _head_symlinked(kind: SlotKind, path: Path) -> None:
    """To a file that says the same: following it, the grant would be led wherever the agent
    likes (a FUSE mount that never answers freezes the daemon)."""
    head = kind.git_dir("1", str(path)) / "HEAD"
    copy = path.parent / "head-elsewhere"
    copy.write_text(head.read_text())
    head.unlink()
    head.symlink_to(copy)


def _git_dir_symlinked(kind: SlotKind, path: Path) -> None:
    """The slot's git directory (a worktree's is in the mirror, which every slot can write)."""
    git_dir = kind.git_dir("1", str(path))
    target = path.parent / "git-dir-elsewhere"
    shutil.copytree(git_dir, target, symlinks=True)  # a copy: an overlay's is on another mount
    shutil.rmtree(git_dir)
    git_dir.symlink_to(target)


def _slot_gone(kind: SlotKind, path: Path) -> None:
    delete_slot(path)


def _dotgit_fifo(kind: SlotKind, path: Path) -> None:
    shutil.rmtree(path / ".git") if (path / ".git").is_dir() else (path / ".git").unlink()
    os.mkfifo(path / ".git")  # opening must not block the daemon


@pytest.mark.parametrize(
    "damage",
    [
        _dotgit_symlink,
        _dotgit_elsewhere,
        _dotgit_swapped,
        _head_gone,
        _head_symlinked,
        _git_dir_symlinked,
        _slot_gone,
        _dotgit_fifo,
    ],
)
def test_damage_sends_the_slot_to_the_closer_look(
    slot: Slot, damage: Callable[[SlotKind, Path], None]
) -> None:
    kind, path = slot
    damage(kind, path)
    assert not kind.looks_whole("1", str(path))
    assert kind.problem("1", str(path)) or kind.pointer_problem("1", str(path))


def test_a_slot_stands_on_the_mirror_and_goes_without_a_trace(slot: Slot) -> None:
    kind, path = slot
    mirror = kind.mirror.path
    if kind.name == "shared-clone":
        # Borrowed, not copied; pinned, so no gc in the mirror can take its commit away.
        assert (path / ".git" / "objects" / "info" / "alternates").read_text() == f"{mirror / 'objects'}\n"
        assert not list((path / ".git" / "objects").glob("??/*")), "objects were copied, not borrowed"
        assert git(mirror, "rev-parse", "refs/necrod/slots/1") == git(path, "rev-parse", "HEAD")
    elif kind.name == "overlay":
        # An overlay of a base layer borrowing the mirror's objects, pinned once for the layer.
        assert os.path.ismount(path)
        assert (path / ".git" / "objects" / "info" / "alternates").read_text() == f"{mirror / 'objects'}\n"
        assert not list((path / ".git" / "objects").glob("??/*")), "objects were copied, not borrowed"
        head = git(path, "rev-parse", "HEAD")
        assert git(mirror, "for-each-ref", "--format=%(refname) %(objectname)", "refs/necrod/") == (
            f"refs/necrod/layers/{head} {head}"
        )
        # Nothing in the upper: git status found the base layer's index valid, and wrote nothing.
        upper = mirror.parent / "uppers" / "1" / "upper"
        assert [p for p in upper.rglob("*") if not p.is_dir()] == []
    else:
        # git itself counts a worktree's HEAD as reachable: no pin.
        assert (path / ".git").is_file() and (mirror / "worktrees" / "1").is_dir()
        assert git(mirror, "for-each-ref", "refs/necrod/slots/") == ""
    anyio.run(lambda: kind.remove(path, "1", timeout=60))
    assert not path.exists() and not (mirror / "worktrees" / "1").exists()
    assert not (mirror.parent / "uppers" / "1").exists()
    assert git(mirror, "for-each-ref", "refs/necrod/slots/") == ""
