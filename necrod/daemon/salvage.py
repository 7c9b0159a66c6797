"""Salvage: what a lease left in its slot, committed to ``refs/necrod/salvage/<lease_id>`` in the
mirror before the slot is reset.

Everything in the slot is the agent's, its ``.git`` and index included, so salvage trusts none
of it (docs/reliability.md):

- **Nothing is written in the slot.** Salvage works in a scratch repository of its own, made
  fresh under the pool's ``salvage-tmp/`` (mode 0700): the index git stages into, the new
  objects and the ref all live there. Its objects borrow the slot's commits and the mirror's
  through ``alternates``; the mirror then fetches the salvage commit from it.
- **Only paths inside the work tree are taken.** The slot's index is copied (read without
  following links, capped) and used only when every entry names a path inside the work tree;
  otherwise a fresh index is read from HEAD. git itself never stages a path beyond a symlink.
- **Bounded.** Files over ``max_file_bytes``, special files, and files past ``max_files`` or
  ``max_bytes`` are left out and listed in the commit message, never dropped silently.
- **A broken repository loses nothing of the work tree.** When the slot's own repository
  cannot be trusted (its ``.git`` gone, replaced or damaged), the work tree is salvaged on
  top of the commit the lease started from.
- **Tags and stash entries** the lease made are kept as extra parents of the salvage commit,
  named in its trailers, and removed from the shared refs (in a worktree pool every slot sees
  them).
- **Submodules the agent filled** (``git submodule update --init``, then edits) are kept too
  (``salvage_submodules.py``): each as a commit of its files, named in a ``Necrod-Submodule``
  trailer and kept as another parent. Which paths fit the limits is ``salvage_plan.py``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio
import structlog

from necrod.core.config import SalvageLimits
from necrod.core.names import index_path_problem
from necrod.daemon.mirror import MAX_INDEX_BYTES, REF_PREFIX
from necrod.daemon.salvage_plan import MAX_STATUS_BYTES, STATUS_CUT, Plan, changed_paths, plan, safe_line
from necrod.daemon.salvage_submodules import Kept, SubmoduleSalvage
from necrod.daemon.slotkinds import SlotKind
from necrod.io import slotfs
from necrod.io.gitrun import MAX_STDOUT, GitError, GitResult, GitRunner

log = structlog.get_logger("necrod.salvage")

#: Tags and stash entries kept per salvage (each is a parent of the salvage commit).
MAX_EXTRAS = 64
#: Skipped paths named in the commit message (the count is always there).
LISTED_SKIPS = 100


#: A sparse slot's index marks the files outside its cone (skip-worktree): absent, and not
#: deleted. With sparse checkout on, git also takes such a file the agent did write (it clears
#: the mark of a file that is there), so an edit outside the cone is salvaged too.
_SPARSE_AWARE = {
    "GIT_CONFIG_COUNT": "1",
    "GIT_CONFIG_KEY_0": "core.sparseCheckout",
    "GIT_CONFIG_VALUE_0": "true",
}


@dataclass(frozen=True, slots=True)
class Salvage:
    ref: str
    commit: str
    #: Whether the slot held uncommitted work (else only commits, tags or stashes).
    dirty: bool
    #: Something was left out: unreadable, special, or over the limits (see ``skipped``).
    partial: bool = False
    #: Paths left out, with why (at most LISTED_SKIPS), and how many there were in all.
    skipped: tuple[str, ...] = ()
    skipped_count: int = 0
    #: Bytes of work-tree files taken.
    bytes: int = 0
    #: Tags and stash entries kept with it.
    extras: tuple[str, ...] = ()
    #: Paths of the submodules whose files were kept with it.
    submodules: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Extra:
    label: str
    commit: str
    #: How to remove it from the shared refs once kept (None: nothing to do).
    ref: str | None = None
    old: str | None = None
    stash_index: int | None = None


def _staged(listing: bytes) -> list[tuple[str, str, str]]:
    """``(mode, object, path)`` from ``git ls-files --stage -z``."""
    out = []
    for entry in listing.split(b"\0"):
        meta, tab, path = entry.partition(b"\t")
        fields = meta.split()
        if tab and len(fields) == 3:
            out.append((fields[0].decode(), fields[1].decode(), os.fsdecode(path)))
    return out


def sparse_gaps(root: str, paths: list[str]) -> list[str]:
    """Which of ``paths`` (an index read from HEAD, the slot's own being untrusted) a sparse
    checkout left out: absent, in a directory that is absent too. A cone holds whole directories
    and every file of its parents, so such a file was never there; the agent did not delete it.
    Nothing is followed (``slotfs``)."""
    present: dict[str, bool] = {}
    out = []
    for path in paths:
        parent = path.rpartition("/")[0]
        if not parent:
            continue
        if parent not in present:
            present[parent] = slotfs.kind(root, parent) is not None
        if not present[parent] and slotfs.kind(root, path) is None:
            out.append(path)
    return out


def _gitlinks(entries: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
    return [(obj, path) for mode, obj, path in entries if mode == "160000"]


class Salvager:
    """Salvage of one slot; see the module docstring."""

    def __init__(
        self, git: GitRunner, kind: SlotKind, admin: str, path: str, *, timeout: float,
        limits: SalvageLimits, scratch_root: Path,
    ) -> None:  # fmt: skip
        self.git = git
        self.kind = kind
        self.admin = admin
        self.path = path
        self.timeout = timeout
        self.limits = limits
        self.scratch_root = scratch_root
        self._submodules = SubmoduleSalvage(git, kind, admin, path, timeout=timeout, limits=limits)

    async def salvage(
        self,
        lease_id: str,
        start_commit: str | None,
        message: str,
        origin_tags: Mapping[str, str],
        owner_uid: int | None = None,
    ) -> Salvage | None:
        """Commit what the lease left; None when there was nothing to keep (or nothing to keep
        it against: no start commit and a repository that cannot say its HEAD)."""
        if not os.path.isdir(self.path) or os.path.islink(self.path):
            return None
        if await self._kept_already(lease_id):
            # A cleanup retried after its salvage succeeded: the slot may be reset by now, and
            # salvaging it again would replace the lease's work with a clean tree.
            log.info("salvage_kept_already", slot=self.path, lease_id=lease_id)
            return None
        sound = self.kind.problem(self.admin, self.path) is None
        head = await self._head() if sound else None
        if not sound:
            log.warning(
                "salvage_work_tree_only", slot=self.path, reason=self.kind.problem(self.admin, self.path)
            )
        head = head or start_commit
        if head is None:
            log.warning("salvage_impossible", slot=self.path, reason="no start commit and no readable HEAD")
            return None
        scratch = Path(await anyio.to_thread.run_sync(self._make_scratch, head, sound))
        try:
            return await self._salvage(
                scratch, lease_id, start_commit, head, message, sound, origin_tags, owner_uid
            )
        finally:
            await anyio.to_thread.run_sync(lambda: shutil.rmtree(scratch, ignore_errors=True))

    async def _kept_already(self, lease_id: str) -> bool:
        found = await self.git.run(["rev-parse", "--verify", "--quiet", "--end-of-options", REF_PREFIX + lease_id],
                                   git_dir=self.kind.mirror.path, timeout=self.timeout, check=False)  # fmt: skip
        return found.returncode == 0

    # --- the scratch repository -------------------------------------------------------------------

    def _make_scratch(self, head: str, sound: bool) -> str:
        self.scratch_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.scratch_root, 0o700)
        scratch = tempfile.mkdtemp(prefix=f"{self.admin}-", dir=self.scratch_root)
        for d in ("objects/info", "objects/pack", "refs/heads", "refs/tags", "refs/necrod/salvage"):
            os.makedirs(os.path.join(scratch, d))
        borrowed = (
            self.kind.object_dirs(self.admin, self.path) if sound else [self.kind.mirror.path / "objects"]
        )
        with open(os.path.join(scratch, "objects/info/alternates"), "w") as f:
            f.writelines(f"{d}\n" for d in borrowed)
        with open(os.path.join(scratch, "config"), "w") as f:
            # An LFS pool's filter, so that a smudged file is not taken for a change (its
            # pointer is what git stores) and an edited one is stored in the mirror's LFS store.
            f.write("[core]\n\trepositoryformatversion = 0\n\tlogallrefupdates = false\n")
            f.write(self.kind.mirror.lfs_config())
        with open(os.path.join(scratch, "HEAD"), "w") as f:
            f.write(head + "\n")
        if sound:
            self._copy_index(scratch)
        return scratch

    def _copy_index(self, scratch: str) -> None:
        root, rel = self.kind.git_dir_at(self.admin, self.path)
        try:
            st = slotfs.lstat(root, f"{rel}/index")
            data = slotfs.read_bytes(root, f"{rel}/index", cap=MAX_INDEX_BYTES)
        except OSError as exc:
            log.warning("salvage_index_refused", slot=self.path, error=str(exc))
            return
        if data:
            copy = os.path.join(scratch, "index")
            with open(copy, "wb") as f:
                f.write(data)
            if st is not None:
                # The copy keeps the index's time: git (without nanosecond times here) takes an
                # entry whose file changed in the same second as the index was written as
                # racily clean and looks at its content. A copy dated now would make it trust
                # the size and second alone, and miss an edit of the same size made then.
                os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))

    async def _run(
        self,
        scratch: Path,
        args: list[str],
        *,
        check: bool = True,
        input: bytes | None = None,
        cut: bool = False,
    ) -> GitResult:
        """git in the slot on the salvage's own index; ``cut``: a listing, read up to
        ``MAX_STATUS_BYTES``."""
        return await self.git.run(
            args, git_dir=scratch, work_tree=self.path, cwd=self.path, timeout=self.timeout, check=check,
            env={"GIT_INDEX_FILE": str(scratch / "index"), **_SPARSE_AWARE}, input=input,
            cut=cut, max_stdout=MAX_STATUS_BYTES if cut else MAX_STDOUT,
        )  # fmt: skip

    async def _head(self) -> str | None:
        result = await self.git.run(["rev-parse", "--verify", "--quiet", "HEAD^{commit}"],
                                    git_dir=self.kind.git_dir(self.admin, self.path), timeout=self.timeout,
                                    check=False)  # fmt: skip
        out = result.out.strip()
        return out if result.returncode == 0 and out else None

    async def _trusted_index(self, scratch: Path) -> list[tuple[str, str]]:
        """Keep the copied index only if every entry is a path inside the work tree; else (or
        when git cannot read it) stage from a fresh index read from HEAD. Returns the index's
        submodules: (recorded commit, path)."""
        index = scratch / "index"
        if index.exists():
            listed = await self._run(scratch, ["ls-files", "--stage", "-z"], check=False)
            entries = _staged(listed.stdout)
            bad = next((path for _, _, path in entries if index_path_problem(path)), None)
            if listed.returncode == 0 and bad is None:
                return _gitlinks(entries)
            log.warning("salvage_index_untrusted", slot=self.path, entry=bad[:200] if bad else None,
                        error=listed.err.strip()[-200:])  # fmt: skip
            index.unlink()
        await self._run(scratch, ["read-tree", "HEAD"])
        listed = await self._run(scratch, ["ls-files", "--stage", "-z"])
        entries = _staged(listed.stdout)
        gaps = await anyio.to_thread.run_sync(
            sparse_gaps, self.path, [p for m, _, p in entries if m != "160000"]
        )
        if gaps:
            await self._run(scratch, ["update-index", "--skip-worktree", "-z", "--stdin"],
                            input=b"".join(os.fsencode(p) + b"\0" for p in gaps))  # fmt: skip
        return _gitlinks(entries)

    # --- the salvage ------------------------------------------------------------------------------

    async def _salvage(
        self, scratch: Path, lease_id: str, start_commit: str | None, head: str, message: str, sound: bool,
        origin_tags: Mapping[str, str], owner_uid: int | None,
    ) -> Salvage | None:  # fmt: skip
        gitlinks = await self._trusted_index(scratch)
        status = await self._run(scratch, ["status", "--porcelain=v1", "-z", "--untracked-files=all",
                                           "--no-renames", "--ignore-submodules=all"],
                                 cut=True)  # fmt: skip
        changed = changed_paths(status)
        extras = await self._extras(head, origin_tags) if sound else []
        if not changed and not gitlinks and not extras and (start_commit is None or head == start_commit):
            # Nothing to keep (an agent that only read, the common case): no staging, no tree.
            return None
        taken = await anyio.to_thread.run_sync(plan, self.path, changed, self.limits)
        if status.cut:  # staged path by path, so that nothing past the listing goes in
            taken.skipped.insert(0, STATUS_CUT)
        partial = bool(taken.skipped)
        if not taken.skipped:
            added = await self._run(scratch, ["add", "--all", "--ignore-errors"], check=False)
            if added.returncode != 0:
                if "fatal:" in added.err:
                    raise GitError(["add"], added.returncode, added.err)
                partial = True
        elif taken.take:
            paths = b"".join(os.fsencode(p) + b"\0" for p in taken.take)
            await self._run(scratch, ["update-index", "--add", "--remove", "-z", "--stdin"], input=paths)
        tree = (await self._run(scratch, ["write-tree"])).out.strip()
        head_tree = (await self._run(scratch, ["rev-parse", "HEAD^{tree}"])).out.strip()
        kept = await self._submodules.keep(scratch, gitlinks, taken, lease_id) if gitlinks else []
        partial = partial or bool(taken.skipped)
        dirty = tree != head_tree or bool(kept)
        if not dirty and not extras and (start_commit is None or head == start_commit):
            return None
        text = self._message(message, lease_id, start_commit or head, taken, extras, owner_uid, kept)
        parents = [arg for c in [*(e.commit for e in extras), *(k.commit for k in kept)] for arg in ("-p", c)]
        commit = (await self._run(scratch, ["commit-tree", tree, "-p", head, *parents, "-F", "-"],
                                  input=text.encode())).out.strip()  # fmt: skip
        ref = REF_PREFIX + lease_id
        await anyio.to_thread.run_sync(self._name_in_scratch, scratch, ref, commit)
        # The scratch repository is a local directory: the file transport, whatever the
        # pool's origin allows.
        await self.git.run(["fetch", "--quiet", "--no-write-fetch-head", "--no-tags", str(scratch),
                            f"+{ref}:{ref}"], git_dir=self.kind.mirror.path, timeout=self.timeout,
                           env={"GIT_ALLOW_PROTOCOL": "file"})  # fmt: skip
        await self._drop_extras(extras)
        return Salvage(
            ref, commit, dirty, partial=partial, skipped=tuple(taken.skipped[:LISTED_SKIPS]),
            skipped_count=len(taken.skipped), bytes=taken.bytes, extras=tuple(e.label for e in extras),
            submodules=tuple(k.path for k in kept),
        )  # fmt: skip

    @staticmethod
    def _name_in_scratch(scratch: Path, ref: str, commit: str) -> None:
        (scratch / ref).write_text(commit + "\n")

    @staticmethod
    def _message(
        message: str, lease_id: str, start: str, taken: Plan, extras: list[_Extra], owner_uid: int | None,
        kept: list[Kept],
    ) -> str:  # fmt: skip
        body = ""
        if taken.skipped:
            shown = taken.skipped[:LISTED_SKIPS]
            more = len(taken.skipped) - len(shown)
            body = (f"\n\nLeft out ({len(taken.skipped)} path(s), see the pool's salvage limits):\n"
                    + "".join(f"  {safe_line(s)}\n" for s in shown)
                    + (f"  ... and {more} more\n" if more else "")).rstrip("\n")  # fmt: skip
        trailers = [f"Necrod-Lease: {lease_id}", f"Necrod-Start: {start}", f"Necrod-Bytes: {taken.bytes}"]
        if taken.skipped:
            trailers.append(f"Necrod-Skipped: {len(taken.skipped)}")
        if owner_uid is not None:
            trailers.append(f"Necrod-Uid: {owner_uid}")
        trailers += [f"Necrod-Kept: {e.commit} {safe_line(e.label)}" for e in extras]
        trailers += [f"Necrod-Submodule: {k.commit} {safe_line(k.path)}" for k in kept]
        return message.rstrip() + body + "\n\n" + "\n".join(trailers) + "\n"

    # --- tags and stash entries -------------------------------------------------------------------

    async def _extras(self, head: str, origin_tags: Mapping[str, str]) -> list[_Extra]:
        """The lease's tags and stash entries. In a worktree pool they are the mirror's, shared
        by every slot: a tag counts as this lease's when origin does not have it and HEAD
        reaches it; a stash entry when HEAD reaches the commit it was made on. In a shared
        clone every one is the lease's."""
        shared = self.kind.name == "worktree"
        repo = self.kind.mirror.path if shared else self.kind.git_dir(self.admin, self.path)
        extras: list[_Extra] = []
        fmt = "%(refname)%00%(objectname)%00%(objecttype)%00%(*objectname)%00%(*objecttype)"
        tags = await self.git.run(["for-each-ref", f"--format={fmt}", "refs/tags/"], git_dir=repo,
                                  timeout=self.timeout, check=False)  # fmt: skip
        candidates: dict[str, tuple[str, str]] = {}
        for line in tags.lines():
            parts = line.split("\0")
            if len(parts) != 5:
                continue
            name, obj, kind, peeled, peeled_kind = parts
            commit = obj if kind == "commit" else peeled if peeled_kind == "commit" else None
            if commit is not None and origin_tags.get(name) != commit:
                candidates[name] = (obj, commit)
        if candidates and shared:
            merged = await self.git.run(["for-each-ref", f"--merged={head}", "--format=%(refname)",
                                         *candidates], git_dir=repo, timeout=self.timeout, check=False)  # fmt: skip
            reached = set(merged.out.split())
            candidates = {n: c for n, c in candidates.items() if n in reached}
        extras += [
            _Extra(name, commit, ref=name, old=obj) for name, (obj, commit) in sorted(candidates.items())
        ]
        root, rel = (repo, ".") if shared else self.kind.git_dir_at(self.admin, self.path)
        if slotfs.kind(root, f"{rel}/logs/refs/stash") is None:
            return extras[:MAX_EXTRAS]  # no stash (git keeps every stash entry in that reflog)
        stash = await self.git.run(["log", "-g", "--format=%H%x00%P%x00%gs", "refs/stash", "--"],
                                   git_dir=repo, timeout=self.timeout, check=False)  # fmt: skip
        if stash.returncode == 0:
            for i, line in enumerate(stash.lines()[:MAX_EXTRAS]):
                sha, parents, subject = ([*line.split("\0"), "", ""])[:3]
                if not sha or (shared and not await self._reaches(repo, head, parents.split()[:1])):
                    continue
                extras.append(_Extra(f"stash@{{{i}}}: {subject}", sha, stash_index=i))
        return extras[:MAX_EXTRAS]

    async def _reaches(self, repo: Path, head: str, commits: list[str]) -> bool:
        if not commits:
            return False
        result = await self.git.run(["merge-base", "--is-ancestor", commits[0], head], git_dir=repo,
                                    timeout=self.timeout, check=False)  # fmt: skip
        return result.returncode == 0

    async def _drop_extras(self, extras: list[_Extra]) -> None:
        """Remove kept tags and stash entries from a worktree pool's shared refs (a shared
        clone's go with ``forget``)."""
        if self.kind.name != "worktree" or not extras:
            return
        mirror = self.kind.mirror.path
        deletes = "".join(f"delete {e.ref} {e.old}\n" for e in extras if e.ref)
        if deletes:
            await self.git.run(["update-ref", "--stdin"], git_dir=mirror, timeout=self.timeout,
                               input=deletes.encode(), check=False)  # fmt: skip
        indexes = sorted((e.stash_index for e in extras if e.stash_index is not None), reverse=True)
        for i in indexes:
            await self.git.run(["reflog", "delete", "--updateref", "--rewrite", f"refs/stash@{{{i}}}"],
                               git_dir=mirror, timeout=self.timeout, check=False)  # fmt: skip
        if indexes:
            left = await self.git.run(["rev-parse", "--verify", "--quiet", "refs/stash@{0}"], git_dir=mirror,
                                      timeout=self.timeout, check=False)  # fmt: skip
            if left.returncode != 0:
                await self.git.run(["update-ref", "-d", "refs/stash"], git_dir=mirror, timeout=self.timeout,
                                   check=False)  # fmt: skip
