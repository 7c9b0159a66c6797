"""Walks of directories an agent filled: what they find, and what they hold while they walk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from necrod.io import slotfs


def test_symlinks_below_finds_links_and_special_files_and_follows_none(tmp_path: Path) -> None:
    refs = tmp_path / "refs"
    (refs / "heads" / "deep" / "er").mkdir(parents=True)
    (refs / "heads" / "main").write_text("0" * 40 + "\n")
    (refs / "heads" / "deep" / "er" / "link").symlink_to("/etc")
    os.mkfifo(refs / "heads" / "fifo")
    (refs / "tags").symlink_to(tmp_path)  # a directory made a link: found, not descended
    found = sorted(slotfs.symlinks_below(tmp_path, "refs"))
    assert found == ["refs/heads/deep/er/link", "refs/heads/fifo", "refs/tags"]
    assert slotfs.symlinks_below(tmp_path, "absent") == []
    (tmp_path / "file").write_text("x")
    assert slotfs.symlinks_below(tmp_path, "file") == ["file"]


def test_symlinks_below_holds_one_directory_open_at_a_time(tmp_path: Path) -> None:
    """30,000 sibling directories, walked with 256 descriptors to spare: the walk used to keep
    one open per directory still to look at, and ran the daemon out of descriptors (accept,
    git, the state store) while it lasted."""
    heads = tmp_path / "refs" / "heads"
    heads.mkdir(parents=True)
    fd = os.open(heads, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(30_000):
            os.mkdir(f"d{i}", dir_fd=fd)
    finally:
        os.close(fd)
    (heads / "d29999" / "planted").symlink_to("/")
    walk = (
        "import resource, sys\n"
        "from necrod.io import slotfs\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
        "print(slotfs.symlinks_below(sys.argv[1], 'refs'))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", walk, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "['refs/heads/d29999/planted']"
