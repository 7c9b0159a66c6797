"""The names necrod accepts for pools, refs, branches and slots, checked before any reaches git.

Ref and branch names follow ``git check-ref-format`` (one-level names allowed) and may not start
with ``-``, so that no name a client sends can ever be read by git as an option.
"""

from __future__ import annotations

import re

from necrod.proto.errors import InvalidParams

POOL_NAME_MAX = 64
_POOL_NAME = re.compile(r"[A-Za-z0-9._-]+")
_HEX_SHA = re.compile(r"[0-9a-f]{7,64}")
_FORBIDDEN_REF_CHARS = frozenset(" ~^:?*[\\")


def pool_name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid pool name, or None when it is."""
    if not name:
        return "a pool name may not be empty"
    if len(name) > POOL_NAME_MAX:
        return f"a pool name is at most {POOL_NAME_MAX} characters"
    if not _POOL_NAME.fullmatch(name):
        return "a pool name may contain only letters, digits, '.', '_' and '-'"
    if name[0] in "-.":
        return "a pool name may not start with '-' or '.'"
    return None


def check_pool_name(name: str) -> str:
    problem = pool_name_problem(name)
    if problem:
        raise InvalidParams(f"invalid pool name {name!r}: {problem}", param="pool")
    return name


def ref_name_problem(name: str) -> str | None:
    """Why ``name`` fails ``git check-ref-format --allow-onelevel`` (or starts with '-')."""
    if not name:
        return "it is empty"
    if name.startswith("-"):
        return "it starts with '-'"
    if name == "@":
        return "it is '@'"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "it contains a control character"
    bad = sorted({c for c in name if c in _FORBIDDEN_REF_CHARS})
    if bad:
        return "it contains " + " ".join(repr(c) for c in bad)
    if "@{" in name:
        return "it contains '@{'"
    if ".." in name:
        return "it contains '..'"
    if name.startswith("/") or name.endswith("/") or "//" in name:
        return "it has an empty path component"
    if name.endswith("."):
        return "it ends with '.'"
    for part in name.split("/"):
        if part.startswith("."):
            return "a component starts with '.'"
        if part.endswith(".lock"):
            return "a component ends with '.lock'"
    return None


def check_ref(name: str, param: str = "ref") -> str:
    problem = ref_name_problem(name)
    if problem:
        raise InvalidParams(f"invalid {param} {name!r}: {problem}", param=param)
    return name


def check_branch(name: str) -> str:
    check_ref(name, "branch")
    if name == "HEAD" or name.startswith("refs/"):
        raise InvalidParams(
            f"invalid branch {name!r}: give the short name, not HEAD or refs/...", param="branch"
        )
    return name


_LEASE_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def check_lease_id(value: str) -> str:
    if not _LEASE_ID.fullmatch(value) or value[0] in "-.":
        raise InvalidParams(f"invalid lease id {value!r}", param="lease_id")
    return value


def looks_like_sha(name: str) -> bool:
    return bool(_HEX_SHA.fullmatch(name))


def slot_id(pool: str, number: int) -> str:
    return f"{pool}/{number}"


def parse_slot_id(value: str) -> tuple[str, int]:
    """Split ``pool/N`` into its pool and number; ``InvalidParams`` if it is not one."""
    pool, sep, number = value.rpartition("/")
    if not sep or not number.isdigit() or pool_name_problem(pool):
        raise InvalidParams(f"invalid slot id {value!r}: expected POOL/NUMBER", param="slot_id")
    return pool, int(number)


def index_path_problem(path: str) -> str | None:
    """Why an index entry's path is not a path inside the work tree (git's own ``verify_path``
    is not applied to an index it reads: a crafted one can name ``../../etc/x``), or None."""
    if not path or path.startswith("/"):
        return "is empty or absolute"
    for part in path.split("/"):
        if part in ("", ".", ".."):
            return f"has a {part or 'empty'!r} component"
        if part.lower().rstrip(". ") == ".git":
            return "names a .git directory"
    return None


def shown_url(url: str) -> str:
    """``url`` as a peer may see it: a password or token in its user part (``https://user:TOKEN@``,
    ``https://TOKEN@``) replaced by ``***``. The mirror's config keeps the real one."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url  # a path, or scp-like ``user@host:path`` (ssh: no secret in it)
    netloc, slash, path = rest.partition("/")
    userinfo, at, host = netloc.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    shown = f"{user}:***" if colon else "***"
    return f"{scheme}://{shown}@{host}{slash}{path}"
