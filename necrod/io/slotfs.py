"""File access where agents write too: slots, their ``.git``, and the mirror of a worktree pool.

Every path here is a trusted ``root`` (a directory necrod made) and a relative path below it
that the agent may have rearranged. So:

- each component is opened relative to its parent's descriptor with ``O_NOFOLLOW``: a symlink
  anywhere below ``root`` is refused (``UnsafePath``), never followed;
- a file is read only when ``fstat`` says it is a regular file no larger than the cap, and it is
  opened ``O_NONBLOCK``, so a FIFO or a device never blocks and a sparse 16 GiB file costs one
  ``fstat``;
- a file is written by creating a fresh name (``O_EXCL``) in the parent's descriptor and
  renaming it over the old one, which replaces a planted symlink instead of writing through it;
- a tree is removed with ``shutil.rmtree(dir_fd=...)``, which never descends a symlink.

``UnsafePath`` is an ``OSError``: callers that treat a failed read or write as "the slot is
broken" need no new handler. Everything is synchronous and bounded; walks over trees an agent
can make arbitrarily large (``remove`` of a directory, ``symlinks_below``) belong in a worker
thread.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager

#: Default cap for a file the daemon reads in a slot (configs, HEAD, alternates, .git files).
SMALL_FILE_BYTES = 64 << 10

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class UnsafePath(OSError):
    """A path in a slot is a symlink, a FIFO, a device, too large, or leaves its root."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(errno.EPERM, f"{path} {why}")
        self.path = path
        self.why = why


def _parts(rel: str | os.PathLike[str]) -> list[str]:
    text = os.fspath(rel)
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if text.startswith("/") or ".." in parts or not parts:
        raise UnsafePath(text, "is not a path inside its root")
    return parts


def _kind_name(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _open_dir_at(fd: int, name: str, shown: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePath(shown, "is not a directory (a symlink or a file)") from None
        raise


@contextmanager
def open_dir(root: str | os.PathLike[str], parts: list[str]) -> Iterator[int]:
    """A descriptor of ``root/<parts...>``, reached without following any symlink."""
    root_text = os.fspath(root)
    try:
        fd = os.open(root_text, _DIR_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePath(root_text, "is not a directory (a symlink or a file)") from None
        raise
    try:
        shown = root_text
        for part in parts:
            shown = f"{shown}/{part}"
            nfd = _open_dir_at(fd, part, shown)
            os.close(fd)
            fd = nfd
        yield fd
    finally:
        os.close(fd)


def _split(rel: str | os.PathLike[str]) -> tuple[list[str], str]:
    parts = _parts(rel)
    return parts[:-1], parts[-1]


def lstat(root: str | os.PathLike[str], rel: str | os.PathLike[str]) -> os.stat_result | None:
    """``lstat`` of ``root/rel`` (None when it or a parent is missing); a parent that is a
    symlink is refused."""
    parents, name = _split(rel)
    try:
        with open_dir(root, parents) as dfd:
            return os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def kind(root: str | os.PathLike[str], rel: str | os.PathLike[str]) -> str | None:
    """``file``, ``dir``, ``link`` or ``other`` for ``root/rel``; None when missing or when a
    parent is not a real directory."""
    try:
        st = lstat(root, rel)
    except UnsafePath:
        return None
    if st is None:
        return None
    if stat.S_ISREG(st.st_mode):
        return "file"
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    if stat.S_ISLNK(st.st_mode):
        return "link"
    return "other"


def entries(root: str | os.PathLike[str], rel: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """``(name, kind)`` of each entry of ``root/rel`` (``file``, ``dir``, ``link``, ``other``),
    from the directory entries themselves, in one pass; empty when it does not exist."""
    out = []
    try:
        with open_dir(root, _parts(rel)) as dfd:
            for entry in os.scandir(dfd):
                if entry.is_symlink():
                    kind = "link"
                elif entry.is_dir(follow_symlinks=False):
                    kind = "dir"
                elif entry.is_file(follow_symlinks=False):
                    kind = "file"
                else:
                    kind = "other"
                out.append((entry.name, kind))
    except FileNotFoundError:
        pass
    return out


def read_bytes(
    root: str | os.PathLike[str], rel: str | os.PathLike[str], cap: int = SMALL_FILE_BYTES
) -> bytes | None:
    """The content of the regular file ``root/rel``, at most ``cap`` bytes; None when it does
    not exist. Anything else (a symlink on the way, a FIFO, a device, a larger file) raises
    ``UnsafePath`` without blocking and without reading it."""
    parents, name = _split(rel)
    shown = f"{os.fspath(root)}/{os.fspath(rel)}"
    try:
        with open_dir(root, parents) as dfd:
            try:
                fd = os.open(name, _READ_FLAGS, dir_fd=dfd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise UnsafePath(shown, "is a symlink") from None
                raise
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(shown, f"is {_kind_name(st.st_mode)}")
        if st.st_size > cap:
            raise UnsafePath(shown, f"is larger than {cap} bytes ({st.st_size})")
        chunks, total = [], 0
        while total <= cap:
            chunk = os.read(fd, min(1 << 20, cap + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > cap:
            raise UnsafePath(shown, f"grew past {cap} bytes while read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_text(
    root: str | os.PathLike[str], rel: str | os.PathLike[str], cap: int = SMALL_FILE_BYTES
) -> str | None:
    data = read_bytes(root, rel, cap)
    return None if data is None else data.decode("utf-8", "replace")


def read_text_or_none(
    root: str | os.PathLike[str], rel: str | os.PathLike[str], cap: int = SMALL_FILE_BYTES
) -> str | None:
    """``read_text``, with anything unsafe or unreadable read as absent."""
    try:
        return read_text(root, rel, cap)
    except OSError:
        return None


def _remove_at(dfd: int, name: str) -> bool:
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dfd)
    else:
        os.unlink(name, dir_fd=dfd)
    return True


def remove(root: str | os.PathLike[str], rel: str | os.PathLike[str]) -> bool:
    """Remove ``root/rel`` whatever it is (a tree without following symlinks in it); whether
    there was anything. A parent that is a symlink is refused."""
    parents, name = _split(rel)
    try:
        with open_dir(root, parents) as dfd:
            return _remove_at(dfd, name)
    except FileNotFoundError:
        return False


def write_atomic(
    root: str | os.PathLike[str], rel: str | os.PathLike[str], data: bytes | str, mode: int = 0o644
) -> None:
    """Make ``root/rel`` a regular file holding ``data``: written under a fresh name in the same
    directory, then renamed over whatever was there (a symlink or a directory is replaced, not
    followed)."""
    parents, name = _split(rel)
    payload = data.encode() if isinstance(data, str) else data
    with open_dir(root, parents) as dfd:
        tmp = f".{name[:64]}.necrod-{secrets.token_hex(6)}"
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dfd
        )
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
        except BaseException:
            os.close(fd)
            os.unlink(tmp, dir_fd=dfd)
            raise
        os.close(fd)
        try:
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except IsADirectoryError:
            _remove_at(dfd, name)
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            os.unlink(tmp, dir_fd=dfd)
            raise


def ensure_dir(root: str | os.PathLike[str], rel: str | os.PathLike[str], mode: int = 0o755) -> bool:
    """Make every component of ``root/rel`` a real directory: anything else in the way (a
    symlink, a file) is removed first. Returns whether something had to be replaced."""
    replaced = False
    parts = _parts(rel)
    with open_dir(root, []) as top:
        fd = os.dup(top)
    try:
        for part in parts:
            try:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                os.mkdir(part, mode, dir_fd=fd)
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                _remove_at(fd, part)
                replaced = True
                os.mkdir(part, mode, dir_fd=fd)
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)
    return replaced


def list_dir(root: str | os.PathLike[str], rel: str | os.PathLike[str] | None = None) -> list[str]:
    """Names in ``root/rel`` (empty when it does not exist); a symlink on the way is refused."""
    try:
        with open_dir(root, _parts(rel) if rel else []) as dfd:
            return os.listdir(dfd)
    except FileNotFoundError:
        return []


def symlinks_below(
    root: str | os.PathLike[str], rel: str | os.PathLike[str], limit: int = 100_000
) -> list[str]:
    """Paths (relative to ``root``) of the symlinks and special files under ``root/rel``, or
    ``[rel]`` itself when it is not a real directory. Never descends a symlink; stops after
    ``limit`` entries. One directory is open at a time: the ones still to look at are kept by
    name (an agent decides how many there are), each opened from ``root`` when its turn comes."""
    found: list[str] = []
    seen = 0
    stack = [_parts(rel)]
    while stack and seen <= limit:
        parts = stack.pop()
        shown = "/".join(parts)
        try:
            with open_dir(root, parts) as fd, os.scandir(fd) as listing:
                for entry in listing:
                    seen += 1
                    # The directory entry's type: no stat call per entry.
                    if entry.is_dir(follow_symlinks=False):
                        stack.append([*parts, entry.name])
                    elif not entry.is_file(follow_symlinks=False):
                        found.append(f"{shown}/{entry.name}")
        except FileNotFoundError:
            continue  # gone since it was listed (or never there, at the top)
        except UnsafePath:  # not a real directory (any more)
            found.append(shown)
    return found


_HEX = frozenset("0123456789abcdef")


def _object_id(text: str) -> str | None:
    text = text.strip()
    return text if len(text) in (40, 64) and set(text) <= _HEX else None


def read_head(
    root: str | os.PathLike[str], git_dir: str, common_dir: str | None
) -> tuple[str | None, str | None]:
    """The commit and branch a slot's HEAD stands at, read from its files without running git:
    ``root/git_dir/HEAD``, and the branch's ref under ``root/common_dir`` (loose, else in
    ``packed-refs``; None: ``root`` itself). (None, None) where that cannot be read safely;
    (None, branch) for a branch not resolved (a branch with no commit yet)."""
    head = read_text_or_none(root, f"{git_dir}/HEAD", cap=4096)
    if head is None:
        return None, None
    head = head.strip()
    if not head.startswith("ref: "):
        return _object_id(head), None
    ref = head[5:].strip()
    branch = ref.removeprefix("refs/heads/") if ref.startswith("refs/heads/") else None
    try:
        parts = _parts(ref)
    except UnsafePath:
        return None, branch
    base = f"{common_dir}/" if common_dir else ""
    loose = read_text_or_none(root, base + "/".join(parts), cap=4096)
    if loose is not None:
        return _object_id(loose), branch
    packed = read_text_or_none(root, f"{base}packed-refs", cap=SMALL_FILE_BYTES * 16) or ""
    for line in packed.split("\n"):
        commit, _, name = line.partition(" ")
        if name == ref:
            return _object_id(commit), branch
    return None, branch
