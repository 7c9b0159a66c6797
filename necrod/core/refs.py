"""Resolving the refs clients name against a mirror's ref table, without running git.

A mirror fetches ``refs/heads/*`` into ``refs/remotes/origin/*`` and tags into ``refs/tags/*``;
a client says ``main``, ``origin/main``, ``v1.2``, ``refs/tags/v1.2`` or a full commit id.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_FULL_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


def ref_candidates(ref: str) -> list[str]:
    """Full ref names ``ref`` may mean, most specific first."""
    if ref.startswith("refs/"):
        return [ref]
    out = [f"refs/remotes/origin/{ref}", f"refs/tags/{ref}"]
    if ref.startswith("origin/"):
        out.insert(0, f"refs/remotes/{ref}")
    return out


def resolve(refs: Mapping[str, str], ref: str) -> str | None:
    """The commit ``ref`` names in ``refs`` (full name → commit), or None if unknown here.

    A full commit id resolves to itself only when some ref points at it; any other commit id
    needs git to say whether the mirror has it.
    """
    for name in ref_candidates(ref):
        commit = refs.get(name)
        if commit is not None:
            return commit
    if _FULL_SHA.fullmatch(ref) and ref in refs.values():
        return ref
    return None


def parse_for_each_ref(output: str) -> dict[str, str]:
    """Parse ``git for-each-ref --format='%(objectname) %(*objectname) %(refname)'``; tags are
    peeled to the commit they point at."""
    refs: dict[str, str] = {}
    for line in output.splitlines():
        parts = line.split(" ", 2)
        if len(parts) != 3:
            continue
        obj, peeled, name = parts
        refs[name] = peeled or obj
    return refs


def parse_symref(output: str) -> str | None:
    """The branch ``git ls-remote --symref origin HEAD`` says HEAD points at."""
    for line in output.splitlines():
        if line.startswith("ref: refs/heads/") and line.endswith("\tHEAD"):
            return line[len("ref: refs/heads/") : -len("\tHEAD")]
    return None
