"""Is git-lfs here? A pool with ``lfs: true`` needs it where git looks for it: on the ``PATH`` of
the environment necrod runs git with (git starts ``git-lfs`` for ``git lfs`` and as the filter
of every checkout in a slot).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping

import anyio

from necrod.core.lfs import MIN_GIT_LFS, parse_git_lfs_version

#: How long ``git-lfs version`` may take.
VERSION_TIMEOUT_S = 30.0


async def git_lfs_problem(env: Mapping[str, str]) -> str | None:
    """Why ``lfs: true`` cannot be served with this git environment, or None."""
    path = env.get("PATH", "")
    found = shutil.which("git-lfs", path=path)
    if found is None:
        return (
            f"lfs: true needs git-lfs, and there is none on necrod's PATH ({path}); "
            "install it (Debian and Ubuntu: apt-get install git-lfs) or set lfs: pointers"
        )
    try:
        with anyio.fail_after(VERSION_TIMEOUT_S):
            result = await anyio.run_process(
                [found, "version"], env=dict(env), check=False, stdin=subprocess.DEVNULL
            )
    except (OSError, TimeoutError) as exc:
        return f"lfs: true needs git-lfs, and {found} cannot be run: {exc or 'timed out'}"
    text = result.stdout.decode("utf-8", "replace").strip()
    version = parse_git_lfs_version(text)
    if result.returncode != 0 or version is None:
        return f"lfs: true needs git-lfs, and {found} version said {text[:120]!r} (exit {result.returncode})"
    if version < MIN_GIT_LFS:
        need = ".".join(map(str, MIN_GIT_LFS))
        return f"lfs: true needs git-lfs {need} or newer; {found} is {'.'.join(map(str, version))}"
    return None
