"""Test repositories made by a script: a bare origin built with one ``git fast-import`` stream.

Files live in nested directories (``src/m<i>/p<j>/f<k>.py``), the first commit adds them all and
every later commit changes a few, so history, packs and checkouts look like a real project's.
``.gitignore`` ignores ``build/`` and ``*.o``, which the debris of a task uses. Also the git
helper every bench module uses, with an environment that ignores the user's configuration.
"""

from __future__ import annotations

import os
import random
import subprocess
import tempfile
from pathlib import Path

GIT_ENV = {
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    "HOME": tempfile.gettempdir(),
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_AUTHOR_NAME": "Bench",
    "GIT_AUTHOR_EMAIL": "bench@example.invalid",
    "GIT_COMMITTER_NAME": "Bench",
    "GIT_COMMITTER_EMAIL": "bench@example.invalid",
    "LC_ALL": "C",
}

GITIGNORE = b"build/\n*.o\n__pycache__/\n"


def git(*args: str, cwd: str | os.PathLike[str] | None = None, input: bytes | None = None) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, input=input, capture_output=True)
    if result.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {result.stderr.decode(errors='replace')}")
    return result.stdout.decode().strip()


def file_paths(files: int) -> list[str]:
    """``files`` paths, 10 to a directory, three levels deep."""
    return [f"src/m{i // 1000}/p{(i // 100) % 10}/q{(i // 10) % 10}/f{i}.py" for i in range(files)]


def _content(rng: random.Random, path: str, version: int) -> bytes:
    # About 1 KiB of lines that differ per file and per version, so deltas and checkouts are real.
    lines = [f"# {path} v{version}\n"]
    lines += [f"value_{n} = {rng.randrange(1 << 30)}  # {'x' * rng.randrange(10, 40)}\n" for n in range(16)]
    return "".join(lines).encode()


def _blob(out: list[bytes], mark: int, data: bytes) -> None:
    out.append(b"blob\nmark :%d\ndata %d\n%s\n" % (mark, len(data), data))


def _commit(out: list[bytes], n: int, parent: int | None, changes: list[tuple[str, int]]) -> int:
    mark = 10_000_000 + n
    when = 1_700_000_000 + n * 600
    msg = f"commit {n}\n".encode()
    out.append(b"commit refs/heads/main\nmark :%d\n" % mark)
    out.append(b"author Bench <bench@example.invalid> %d +0000\n" % when)
    out.append(b"committer Bench <bench@example.invalid> %d +0000\n" % when)
    out.append(b"data %d\n%s" % (len(msg), msg))
    if parent is not None:
        out.append(b"from :%d\n" % parent)
    out.extend(b"M 100644 :%d %s\n" % (blob, path.encode()) for path, blob in changes)
    out.append(b"\n")
    return mark


def fast_import_stream(files: int, commits: int, seed: int = 7) -> bytes:
    rng = random.Random(seed)
    paths = file_paths(files)
    out: list[bytes] = []
    next_blob = 1
    changes = []
    for path in paths:
        _blob(out, next_blob, _content(rng, path, 0))
        changes.append((path, next_blob))
        next_blob += 1
    _blob(out, next_blob, GITIGNORE)
    changes.append((".gitignore", next_blob))
    next_blob += 1
    parent = _commit(out, 1, None, changes)
    for n in range(2, commits + 1):
        changes = []
        for path in rng.sample(paths, min(8, len(paths))):
            _blob(out, next_blob, _content(rng, path, n))
            changes.append((path, next_blob))
            next_blob += 1
        parent = _commit(out, n, parent, changes)
    return b"".join(out)


def make_origin(path: Path, files: int, commits: int) -> Path:
    """A bare repository at ``path`` with branch ``main``: ``files`` files, ``commits`` commits."""
    git("init", "--quiet", "--bare", "--initial-branch=main", str(path))
    git("fast-import", "--quiet", cwd=path, input=fast_import_stream(files, commits))
    git("repack", "-a", "-d", "-q", cwd=path)
    return path


def add_commit(origin: Path, n: int) -> str:
    """One more commit on ``main`` changing one file (the upstream moving between fetches)."""
    head = git("rev-parse", "refs/heads/main", cwd=origin)
    data = f"upstream change {n}\n".encode()
    stream = b"commit refs/heads/main\n"
    stream += b"committer Bench <bench@example.invalid> %d +0000\n" % (1_800_000_000 + n)
    stream += b"data 7\nupdate\nfrom %s\nM 100644 inline UPSTREAM\ndata %d\n%s\n" % (
        head.encode(),
        len(data),
        data,
    )
    git("fast-import", "--quiet", "--force", cwd=origin, input=stream)
    return git("rev-parse", "refs/heads/main", cwd=origin)
