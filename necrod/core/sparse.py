"""Sparse (cone mode) checkouts and partial-clone filters: what a valid ``sparse:`` set and
``filter:`` are, and the ``info/sparse-checkout`` text a set stands for. Pure.

A sparse set is the directories a slot holds besides the top-level files (git's cone mode). It
reaches git as a pattern file the daemon writes itself, never one read back from a slot: the
agent can rewrite the slot's copy at will.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from necrod.proto.errors import InvalidParams

#: The most directories one sparse set may name, and the longest one (bytes of UTF-8).
MAX_SPARSE_DIRS = 256
MAX_SPARSE_PATH = 1024
#: Characters git's cone-mode patterns would read as globs or escapes.
_GLOB = set("*?[]\\")
#: ``filter:`` values accepted for a pool's mirror (git's ``--filter`` spelling).
#: (``tree:0`` is not: a slot's checkout needs the trees, and the daemon could not tell which
#: blobs under a missing tree to fetch before it.)
FILTER_FORMS = ("blob:none", "blob:limit=<size>")
_BLOB_LIMIT = re.compile(r"blob:limit=[1-9][0-9]{0,12}[kmg]?")


def sparse_dir_problem(entry: object) -> str | None:
    """Why ``entry`` cannot be a directory of a sparse set, or None."""
    if not isinstance(entry, str) or not entry:
        return "must be a non-empty string"
    if len(entry.encode()) > MAX_SPARSE_PATH:
        return f"is longer than {MAX_SPARSE_PATH} bytes"
    if entry.startswith("-"):
        return "may not start with '-'"
    if entry.startswith("/"):
        return "must be relative to the repository's top"
    if any(ord(c) < 0x20 or c == "\x7f" for c in entry):
        return "may not contain control characters"
    if _GLOB & set(entry):
        return "may not contain glob characters (* ? [ ] \\): cone mode takes directories"
    for part in entry.removeprefix("./").rstrip("/").split("/"):
        if part in ("", ".", ".."):
            return f"has a {part or 'empty'!r} component"
        if part.lower().rstrip(". ") == ".git":
            return "names a .git directory"
        if part != part.strip():
            return "has a component that starts or ends with a space"
    return None


def sparse_set_problem(entries: object) -> str | None:
    """Why ``entries`` is not a sparse set (a list of directories), or None. An empty list is
    the full checkout."""
    if not isinstance(entries, list | tuple):
        return "must be a list of directories"
    if len(entries) > MAX_SPARSE_DIRS:
        return f"may name at most {MAX_SPARSE_DIRS} directories (got {len(entries)})"
    for entry in entries:
        problem = sparse_dir_problem(entry)
        if problem:
            return f"{entry!r} {problem}" if isinstance(entry, str) else f"every item {problem}"
    return None


#: The JSON Schema of a sparse set in pools.yaml (``--print-schema``).
SPARSE_SCHEMA: dict[str, Any] = {
    "type": "array", "maxItems": MAX_SPARSE_DIRS,
    "items": {"type": "string", "minLength": 1, "maxLength": MAX_SPARSE_PATH, "pattern": r"^[^-/]"},
}  # fmt: skip


def check_sparse(entries: object, param: str = "sparse") -> tuple[str, ...]:
    """A client's sparse set, normalized; ``InvalidParams`` naming what is wrong."""
    problem = sparse_set_problem(entries)
    if problem:
        raise InvalidParams(f"{param}: {problem}", param=param)
    return normalize(entries)  # type: ignore[arg-type]


def normalize(entries: Iterable[str]) -> tuple[str, ...]:
    """A sparse set in one spelling: no ``./`` or trailing ``/``, sorted, and no directory that
    another one already holds (``a`` covers ``a/b``). ``()`` is the full checkout."""
    dirs = sorted({e.removeprefix("./").rstrip("/") for e in entries})
    out: list[str] = []
    for d in dirs:
        if not any(d.startswith(kept + "/") for kept in out):
            out.append(d)
    return tuple(out)


def cone_patterns(dirs: tuple[str, ...]) -> str:
    """The ``info/sparse-checkout`` file of a cone-mode set, as ``git sparse-checkout set``
    writes it: top-level files, each parent's own files, each directory whole. With no
    directories, a non-cone file that takes everything (used to widen a slot again)."""
    if not dirs:
        return "/*\n"
    parents = sorted({"/".join(d.split("/")[:i]) for d in dirs for i in range(1, d.count("/") + 1)})
    lines = ["/*", "!/*/"]
    for parent in parents:
        lines += [f"/{parent}/", f"!/{parent}/*/"]
    lines += [f"/{d}/" for d in dirs]
    return "\n".join(lines) + "\n"


def in_cone(path: str, dirs: tuple[str, ...]) -> bool:
    """Whether a file at ``path`` is in the checkout of ``dirs`` (all of it when empty)."""
    if not dirs or "/" not in path:
        return True
    parent = path.rsplit("/", 1)[0]
    return any(path.startswith(d + "/") for d in dirs) or any(d.startswith(parent + "/") for d in dirs)


def filter_problem(spec: object) -> str | None:
    """Why ``spec`` is not a ``filter:`` necrod accepts for a mirror, or None."""
    if not isinstance(spec, str):
        return f"must be one of {', '.join(FILTER_FORMS)}"
    if spec == "blob:none" or _BLOB_LIMIT.fullmatch(spec):
        return None
    return f"must be one of {', '.join(FILTER_FORMS)} (got {spec!r})"
