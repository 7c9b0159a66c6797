"""Disk use of a directory tree, as du counts it: allocated blocks, each inode once."""

from __future__ import annotations

import os


def disk_usage(root: str) -> int:
    """Bytes allocated under ``root`` (not following symlinks). Vanishing entries are skipped:
    an agent may be writing while we walk."""
    seen: set[tuple[int, int]] = set()
    total = 0
    stack = [root]
    while stack:
        path = stack.pop()
        try:
            entries = os.scandir(path)
        except OSError:
            continue
        with entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_nlink > 1:
                    key = (st.st_dev, st.st_ino)
                    if key in seen:
                        continue
                    seen.add(key)
                total += st.st_blocks * 512
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
    return total
