"""The host's submodule mirrors: one bare mirror per submodule URL, shared by every pool that
uses it, fetched with the superprojects' fetches (at most once per fetch interval, and at once
when a superproject records a commit the mirror lacks), never by a slot.

Layout: ``<workspaces>/.submodules/<digest>.git``, the digest that of the URL made absolute
(``core.submodules.resolve_url``); a pool name cannot start with ``.``, so no pool's directory is
ever there. Each is a ``mirror.Mirror``: canonical config, cloned into a temporary name, the
same git runner, environment and flags as the pool mirrors; its config is made canonical again
before every fetch.

What a commit's submodules are is read from the superproject's mirror, never from a slot:
``.gitmodules`` at that commit (bounded, parsed by git's own config reader), checked by
``core.submodules.listing``. ``sync`` (the keeper, under the pool's git limits) may fetch;
``plan`` (a slot's checkout) never does: a submodule whose mirror lacks its commit is left out.

Error handling: nothing a ``.gitmodules`` says, and no failed clone or fetch of a submodule,
raises out of ``sync``: each becomes a line of the problems it returns (the pool shows them).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import anyio
import structlog

from necrod.core.submodules import MAX_GITMODULES_BYTES, Listing, Submodule, listing, parse_config_list
from necrod.daemon.mirror import Mirror
from necrod.io.gitrun import GitError, GitRunner

log = structlog.get_logger("necrod.submodules")

#: How deep ``recursive`` goes (a submodule of a submodule of ...), and how many submodules one
#: superproject commit may bring in all (an attacker decides how many its tree names).
MAX_DEPTH = 4
MAX_TOTAL = 128
T = TypeVar("T")

#: Listings and plans remembered (a few commits per pool, for the pools of a host).
REMEMBERED = 256


@dataclass(frozen=True, slots=True)
class Checkout:
    """One submodule to check out: where from (``mirror``, a local bare repository), its own
    submodules to check out (``recursive``), and every gitlink of its tree (those not checked
    out are kept empty)."""

    sub: Submodule
    mirror: Path
    children: tuple[Checkout, ...] = ()
    gitlinks: tuple[str, ...] = ()


@dataclass(slots=True)
class _Shared:
    mirror: Mirror
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    #: Monotonic time the last fetch (or clone) that succeeded started.
    fetched_at: float | None = None
    fetches: int = 0


def _remember(table: OrderedDict[tuple[str, str], T], key: tuple[str, str], value: T) -> None:
    table[key] = value
    while len(table) > REMEMBERED:
        table.popitem(last=False)


def mirror_dir_name(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:24] + ".git"


class SubmoduleMirrors:
    """See the module docstring."""

    def __init__(self, root: Path, git: GitRunner, allowed_protocols: tuple[str, ...]) -> None:
        self.root = root
        self.git = git
        self.allowed = allowed_protocols
        self._mirrors: dict[str, _Shared] = {}
        self._listings: OrderedDict[tuple[str, str], Listing] = OrderedDict()
        self._has: OrderedDict[tuple[str, str], None] = OrderedDict()

    def _shared(self, url: str) -> _Shared:
        found = self._mirrors.get(url)
        if found is None:
            found = self._mirrors[url] = _Shared(Mirror(self.root / mirror_dir_name(url), url, self.git))
        return found

    def statistics(self) -> dict[str, int]:
        """Mirrors known, and fetches (clones included) done since the start, all pools together."""
        return {"mirrors": len(self._mirrors), "fetches": sum(s.fetches for s in self._mirrors.values())}

    # --- reading a commit's submodules ------------------------------------------------------------

    async def listing(self, mirror: Mirror, commit: str, *, timeout: float) -> Listing:
        """The submodules ``commit`` of ``mirror`` records (see the module docstring)."""
        # The superproject's URL is part of the key: relative URLs resolve against it, and a
        # reload may change it under the same mirror.
        key = (f"{mirror.path}\0{mirror.repo_url}", commit)
        found = self._listings.get(key)
        if found is not None:
            return found
        tree = await mirror.tree(commit)
        gitlinks = {path: obj for mode, obj, path in tree if mode == "160000"}
        if not gitlinks:
            found = Listing((), ())
        else:
            entries = await self._gitmodules(mirror, commit, timeout)
            if isinstance(entries, str):
                found = Listing((), (entries,), tuple(gitlinks))
            else:
                symlinks = frozenset(path for mode, _, path in tree if mode == "120000")
                found = listing(entries, gitlinks, mirror.repo_url, self.allowed, symlinks)
            if not found.submodules and not found.problems:
                found = Listing((), (f"{len(gitlinks)} gitlink(s) but no .gitmodules entry names them",),
                                tuple(gitlinks))  # fmt: skip
        _remember(self._listings, key, found)
        return found

    async def _gitmodules(
        self, mirror: Mirror, commit: str, timeout: float
    ) -> dict[str, dict[str, str]] | str:
        """The entries of ``commit``'s ``.gitmodules`` (none when it has none), or why it is
        not read."""
        blob = f"{commit}:.gitmodules"
        size = await self.git.run(["cat-file", "-s", "--end-of-options", blob], git_dir=mirror.path,
                                  timeout=timeout, check=False)  # fmt: skip
        if size.returncode != 0 or not size.out.strip().isdigit():
            return {}
        if int(size.out.strip()) > MAX_GITMODULES_BYTES:
            return f".gitmodules is larger than {MAX_GITMODULES_BYTES} bytes: not read"
        listed = await self.git.run(["config", "--no-includes", "-z", f"--blob={blob}", "--list"],
                                    git_dir=mirror.path, timeout=timeout, check=False)  # fmt: skip
        if listed.returncode != 0:
            return f".gitmodules cannot be read: {(listed.err.strip().splitlines() or ['?'])[-1][:200]}"
        return parse_config_list(listed.stdout)

    async def _has_commit(self, shared: _Shared, commit: str) -> bool:
        """Whether the mirror has ``commit`` (remembered once true: a mirror's objects stay)."""
        key = (str(shared.mirror.path), commit)
        if key in self._has:
            return True
        if not shared.mirror.exists or await shared.mirror.has_commit(commit) != commit:
            return False
        _remember(self._has, key, None)
        return True

    # --- keeping the mirrors (the keeper, with a pool's fetch) ------------------------------------

    async def sync(
        self, mirror: Mirror, commit: str, *, recursive: bool, fresh_s: float, timeout: float
    ) -> list[str]:
        """Make the mirror of each submodule ``commit`` records hold its commit: cloned the first
        time, fetched when it lacks the commit or was last fetched more than ``fresh_s`` ago (by
        any pool; 0: only when it lacks the commit, as at start). Returns the problems, one line each."""
        problems: list[str] = []
        await self._sync(mirror, commit, recursive, fresh_s, timeout, problems, depth=0, budget=[MAX_TOTAL])
        return problems

    async def _sync(
        self, mirror: Mirror, commit: str, recursive: bool, fresh_s: float, timeout: float,
        problems: list[str], *, depth: int, budget: list[int],
    ) -> None:  # fmt: skip
        where = "" if depth == 0 else f" (in {mirror.repo_url} at {commit[:12]})"
        try:
            found = await self.listing(mirror, commit, timeout=timeout)
        except (GitError, OSError) as exc:
            problems.append(f"cannot read the submodules{where}: {exc}")
            return
        problems += [p + where for p in found.problems]
        for sub in found.submodules:
            budget[0] -= 1
            if budget[0] < 0:
                problems.append(f"more than {MAX_TOTAL} submodules in all; the rest are left out")
                return
            shared = self._shared(sub.url)
            problem = await self._fetch(shared, sub, fresh_s, timeout)
            if problem is not None:
                problems.append(problem + where)
            elif recursive and depth + 1 < MAX_DEPTH:
                await self._sync(shared.mirror, sub.commit, recursive, fresh_s, timeout, problems,
                                 depth=depth + 1, budget=budget)  # fmt: skip

    async def _fetch(self, shared: _Shared, sub: Submodule, fresh_s: float, timeout: float) -> str | None:
        """Clone or fetch one shared mirror if it needs it (see ``sync``); callers that queued
        behind a fetch that started after they asked share it."""
        asked = time.monotonic()
        async with shared.lock:
            has = await self._has_commit(shared, sub.commit)
            last = shared.fetched_at
            fetched_since = last is not None and last >= asked
            fresh = fresh_s <= 0 or (last is not None and asked - last < fresh_s)
            if has and (fresh or fetched_since):
                return None
            if not has and fetched_since:
                return f"submodule {sub.path!r}: {sub.url} has no commit {sub.commit}"
            started = time.monotonic()
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                if not shared.mirror.exists:
                    log.info("submodule_mirror_clone", url=sub.url, path=str(shared.mirror.path))
                    await shared.mirror.create(timeout=timeout, on_progress=lambda _line: None)
                else:
                    changed = await anyio.to_thread.run_sync(shared.mirror.restore_canonical)
                    if changed:
                        log.warning("tamper", mirror=str(shared.mirror.path), changed=changed)
                    await shared.mirror.fetch(timeout=timeout)
            except (GitError, OSError) as exc:
                still = " (its mirror has the recorded commit: slots still get it)" if has else ""
                return f"submodule {sub.path!r}: fetching {sub.url} failed{still}: {exc}"
            shared.fetched_at = started
            shared.fetches += 1
            if not await self._has_commit(shared, sub.commit):
                return f"submodule {sub.path!r}: {sub.url} has no commit {sub.commit}"
        return None

    # --- what a slot checks out (no network) ------------------------------------------------------

    async def plan(
        self, mirror: Mirror, commit: str, *, recursive: bool, timeout: float
    ) -> tuple[list[Checkout], tuple[str, ...]]:
        """The submodules to check out for ``commit`` of ``mirror``, from the local mirrors only
        (one whose mirror lacks its commit, or that was refused, is left out; ``sync`` says
        why), and every gitlink path of ``commit``."""
        budget = [MAX_TOTAL]
        gitlinks = (await self.listing(mirror, commit, timeout=timeout)).gitlinks
        return await self._plan(mirror, commit, recursive, timeout, 0, budget), gitlinks

    async def _plan(
        self, mirror: Mirror, commit: str, recursive: bool, timeout: float, depth: int, budget: list[int]
    ) -> list[Checkout]:
        found = await self.listing(mirror, commit, timeout=timeout)
        out = []
        for sub in found.submodules:
            budget[0] -= 1
            if budget[0] < 0:
                break
            shared = self._shared(sub.url)
            if not await self._has_commit(shared, sub.commit):
                log.warning("submodule_not_mirrored", path=sub.path, url=sub.url, commit=sub.commit)
                continue
            children: list[Checkout] = []
            if recursive and depth + 1 < MAX_DEPTH:
                children = await self._plan(shared.mirror, sub.commit, recursive, timeout, depth + 1, budget)
            inside = (await self.listing(shared.mirror, sub.commit, timeout=timeout)).gitlinks
            out.append(Checkout(sub, shared.mirror.path, tuple(children), inside))
        return out
