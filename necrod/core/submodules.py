"""Which submodules of a commit necrod may check out, read from its ``.gitmodules`` (as git's own
parser lists it: ``git config --blob <commit>:.gitmodules --list -z``) and its tree's gitlinks.

A ``.gitmodules`` is whoever pushed it's to write, so every entry is checked before anything is
made of it (the 2024 clone CVEs are the model): a name or path that would leave the slot or its
git directory (``..``, absolute, ``.git``), a URL or name starting with ``-``, a URL with a
transport ``daemon.allowed_protocols`` does not allow, or a relative URL that climbs above the
superproject's. A refused entry is not checked out and is reported; the others still are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from necrod.core.config.urls import repo_url_problem
from necrod.core.names import index_path_problem

#: Entries of one ``.gitmodules`` looked at (more is no repository's, and each costs a mirror).
MAX_ENTRIES = 64
#: Bytes of ``.gitmodules`` read at most.
MAX_GITMODULES_BYTES = 256 << 10
#: Longest submodule name (it is a directory name under ``modules/``).
MAX_NAME = 255


@dataclass(frozen=True, slots=True)
class Submodule:
    """One submodule of a commit: its name (its directory under ``modules/``), where it is in
    the work tree, its URL made absolute, and the commit the superproject records for it."""

    name: str
    path: str
    url: str
    commit: str


@dataclass(frozen=True, slots=True)
class Listing:
    """What a commit's ``.gitmodules`` allows, and why the rest was refused."""

    submodules: tuple[Submodule, ...]
    problems: tuple[str, ...]
    #: Every gitlink path of the commit's tree, checked out or not.
    gitlinks: tuple[str, ...] = ()


def parse_config_list(out: bytes) -> dict[str, dict[str, str]]:
    """``git config --list -z`` output of a ``.gitmodules`` → name → key → value (the last one
    given wins, as for git). Keys outside ``submodule.<name>.<key>`` are ignored."""
    found: dict[str, dict[str, str]] = {}
    for item in out.split(b"\0"):
        if not item:
            continue
        key, _, value = item.decode("utf-8", "surrogateescape").partition("\n")
        if not key.startswith("submodule.") or key.count(".") < 2:
            continue
        name, _, field = key[len("submodule.") :].rpartition(".")
        found.setdefault(name, {})[field.lower()] = value
    return found


def name_problem(name: str) -> str | None:
    """Why a submodule name cannot be a directory under ``modules/`` (git's own
    ``check_submodule_name``, and no option-like or control characters), or None."""
    if not name or len(name) > MAX_NAME:
        return "is empty or too long"
    if name.startswith("-"):
        return "starts with '-'"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name) or "\\" in name:
        return "contains a control character or a backslash"
    problem = index_path_problem(name)
    return f"{problem}" if problem else None


def resolve_url(url: str, superproject: str) -> str | tuple[None, str]:
    """A submodule URL made absolute: ``./x`` and ``../x`` are relative to the superproject's
    URL (as git resolves them); others are as given. A tuple (None, why) when it cannot be."""
    if not url.startswith(("./", "../")):
        return url
    base = superproject.rstrip("/")
    m = re.match(r"([A-Za-z][A-Za-z0-9+.-]*://[^/]*)(.*)", base)
    if m:
        prefix, path, sep = m.group(1), m.group(2), "/"
    elif re.match(r"[^/]*:", base) and not base.startswith("/"):
        prefix, _, path = base.partition(":")
        prefix, sep = prefix + ":", ""
    else:
        prefix, path, sep = "", base, "/" if base.startswith("/") else ""
    parts = [p for p in path.split("/") if p]
    rest = url
    while rest.startswith(("./", "../")):
        if rest.startswith("./"):
            rest = rest[2:]
            continue
        rest = rest[3:]
        if not parts:
            return None, "climbs above the superproject's URL"
        parts.pop()
    parts += [p for p in rest.split("/") if p]
    if not parts:
        return None, "names no repository"
    return prefix + sep + "/".join(parts)


def listing(
    entries: dict[str, dict[str, str]],
    gitlinks: dict[str, str],
    superproject: str,
    allowed: tuple[str, ...],
    symlinks: frozenset[str] = frozenset(),
) -> Listing:
    """The submodules of a commit from its ``.gitmodules`` ``entries`` and its tree's
    ``gitlinks`` (path → recorded commit) and ``symlinks`` (paths): an entry whose path is no
    gitlink is not a submodule of this commit and is left out silently, as git does; see the
    module docstring for what is refused."""
    subs: list[Submodule] = []
    problems: list[str] = []
    names_seen: set[str] = set()
    paths_seen: set[str] = set()
    for name, fields in list(entries.items())[:MAX_ENTRIES]:
        shown = repr(name[:80])
        problem = name_problem(name)
        if problem:
            problems.append(f"submodule {shown}: its name {problem}")
            continue
        path = fields.get("path", "")
        problem = index_path_problem(path) or ("starts with '-'" if path.startswith("-") else None)
        if problem:
            problems.append(f"submodule {shown}: its path {path[:80]!r} {problem}")
            continue
        if path not in gitlinks:
            continue
        parents = ["/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 1)]
        if any(p in symlinks for p in parents):
            problems.append(f"submodule {shown}: its path {path[:80]!r} goes through a symbolic link")
            continue
        raw = fields.get("url", "")
        if raw.startswith("-"):
            problems.append(f"submodule {shown}: its url {raw[:80]!r} starts with '-'")
            continue
        url = resolve_url(raw, superproject)
        if isinstance(url, tuple):
            problems.append(f"submodule {shown}: its url {raw[:80]!r} {url[1]}")
            continue
        problem = repo_url_problem(url, allowed)
        if problem:
            problems.append(f"submodule {shown}: its url {url[:80]!r} {problem}")
            continue
        if _nested_in(name, names_seen) or _nested_in(path, paths_seen):
            problems.append(f"submodule {shown}: its name or path is another submodule's, or inside it")
            continue
        names_seen.add(name)
        paths_seen.add(path)
        subs.append(Submodule(name, path, url, gitlinks[path]))
    if len(entries) > MAX_ENTRIES:
        problems.append(f".gitmodules lists {len(entries)} submodules; only the first {MAX_ENTRIES} are used")
    return Listing(tuple(subs), tuple(problems), tuple(gitlinks))


def _nested_in(path: str, others: set[str]) -> bool:
    """Whether ``path`` is one of ``others``, or inside one, or holds one (a name is a directory
    under ``modules/`` too: ``a`` and ``a/objects`` would share one)."""
    return any(path == o or path.startswith(o + "/") or o.startswith(path + "/") for o in others)
