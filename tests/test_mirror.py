"""The allocation path's quick check of a slot, against a real mirror and worktree."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from necrod.daemon.mirror import Mirror
from necrod.io.gitrun import GitRunner
from tests.helpers import git


@pytest.fixture
def slot(tmp_path: Path, origin: Path) -> tuple[Mirror, Path]:
    mirror_path = tmp_path / "mirror.git"
    git(tmp_path, "clone", "-q", "--bare", str(origin), str(mirror_path))
    slot_path = tmp_path / "slots" / "1"
    git(mirror_path, "worktree", "add", "-q", "--detach", str(slot_path), "main")
    # git names the admin directory after the worktree's last path component.
    assert (mirror_path / "worktrees" / "1" / "HEAD").is_file()
    return Mirror(mirror_path, str(origin), GitRunner("git", os.environ)), slot_path


def test_a_whole_slot_passes(slot: tuple[Mirror, Path]) -> None:
    mirror, path = slot
    assert mirror.slot_looks_whole("1", str(path))
    assert not mirror.slot_looks_whole("2", str(path)), "another slot's admin directory"


def _dotgit_symlink(mirror: Mirror, path: Path) -> None:
    target = path.parent / "elsewhere"
    target.write_text((path / ".git").read_text())
    (path / ".git").unlink()
    (path / ".git").symlink_to(target)


def _dotgit_elsewhere(mirror: Mirror, path: Path) -> None:
    (path / ".git").write_text("gitdir: /tmp/not-the-mirror\n")


def _dotgit_directory(mirror: Mirror, path: Path) -> None:
    (path / ".git").unlink()
    (path / ".git").mkdir()


def _admin_head_gone(mirror: Mirror, path: Path) -> None:
    (mirror.path / "worktrees" / "1" / "HEAD").unlink()


def _slot_gone(mirror: Mirror, path: Path) -> None:
    shutil.rmtree(path)


def _dotgit_fifo(mirror: Mirror, path: Path) -> None:
    (path / ".git").unlink()
    os.mkfifo(path / ".git")  # opening must not block the daemon


@pytest.mark.parametrize(
    "damage",
    [_dotgit_symlink, _dotgit_elsewhere, _dotgit_directory, _admin_head_gone, _slot_gone, _dotgit_fifo],
)
def test_damage_sends_the_slot_to_the_closer_look(
    slot: tuple[Mirror, Path], damage: Callable[[Mirror, Path], None]
) -> None:
    mirror, path = slot
    damage(mirror, path)
    assert not mirror.slot_looks_whole("1", str(path))
