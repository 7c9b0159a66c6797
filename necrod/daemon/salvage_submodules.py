"""Salvage of the submodules an agent filled in its slot (``git submodule update --init``,
then edits): git's salvage of the superproject sees only a gitlink there.

Each filled submodule's files are compared with the commit the superproject records for it
(read from the submodule's own objects under the slot's ``modules/``, borrowed read-only by the
salvage's scratch repository; from nothing when that commit cannot be read), and what differs
is committed on top of a commit of the recorded tree, in the scratch repository. Its files count
against the same limits as the rest of the salvage. Commits made inside the submodule are not
kept, only its files; a submodule's own submodules are kept each as one more (below
``MAX_SUBMODULES`` in all). Nothing is written in
the slot and no link there is followed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import anyio

from necrod.core.config import SalvageLimits
from necrod.core.names import index_path_problem
from necrod.daemon.salvage_plan import (
    MAX_STATUS_BYTES,
    STATUS_CUT,
    Plan,
    changed_paths,
    plan_files,
    safe_line,
)
from necrod.daemon.slotkinds import SlotKind
from necrod.io import slotfs
from necrod.io.gitrun import MAX_STDOUT, GitResult, GitRunner

#: Submodules kept per salvage; how deep below ``modules/`` their repositories are looked for,
#: and how many directories at most (an agent decides how many there are).
MAX_SUBMODULES = 32
MODULES_DEPTH = 6
MODULES_SCANNED = 1000
#: git's empty tree: the baseline of a submodule whose recorded commit cannot be read.
EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"


@dataclass(frozen=True, slots=True)
class Kept:
    """A submodule's files, kept: ``commit``'s parent holds what the superproject records."""

    path: str
    commit: str


class SubmoduleSalvage:
    """The submodules of one slot; see the module docstring."""

    def __init__(self, git: GitRunner, kind: SlotKind, admin: str, path: str, *, timeout: float,
                 limits: SalvageLimits) -> None:  # fmt: skip
        self.git = git
        self.kind = kind
        self.admin = admin
        self.path = path
        self.timeout = timeout
        self.limits = limits

    async def keep(
        self, scratch: Path, gitlinks: list[tuple[str, str]], taken: Plan, lease_id: str
    ) -> list[Kept]:
        """The files of each submodule the agent filled, where they differ from the commit the
        superproject records for it: one commit each (see the module docstring). ``taken``
        counts what they take against the limits, and lists what they leave out."""
        filled = await anyio.to_thread.run_sync(self._filled, [path for _, path in gitlinks])
        if not filled:
            return []
        await anyio.to_thread.run_sync(self._borrow_module_objects, scratch)
        kept: list[Kept] = []
        queue = list(gitlinks)
        looked = 0
        while queue and len(kept) < MAX_SUBMODULES and looked < MODULES_SCANNED:
            recorded, path = queue.pop(0)
            if path not in filled:
                continue
            looked += 1
            found = await self._submodule(scratch, recorded, path, taken, lease_id)
            if found is not None:
                kept.append(found)
            # A submodule's own submodules (``submodules: recursive``, or an agent's
            # ``update --init --recursive``) are kept each as one more submodule.
            nested = await self._nested(scratch, recorded, path)
            if nested:
                filled |= await anyio.to_thread.run_sync(self._filled, [p for _, p in nested])
                queue += nested
        return kept

    async def _nested(self, scratch: Path, recorded: str, path: str) -> list[tuple[str, str]]:
        """The gitlinks of the tree a submodule's recorded commit holds (none when that commit
        cannot be read), as (recorded, path in the slot)."""
        listed = await self.git.run(["ls-tree", "-r", "-z", "--full-tree", "--end-of-options", recorded],
                                    git_dir=scratch, timeout=self.timeout, check=False)  # fmt: skip
        if listed.returncode != 0:
            return []
        out = []
        for entry in listed.stdout.split(b"\0"):
            meta, tab, name = entry.partition(b"\t")
            fields = meta.split()
            text = name.decode("utf-8", "surrogateescape")
            # A tree is the pusher's: a name that is no path inside the work tree is not followed.
            if tab and len(fields) == 3 and fields[0] == b"160000" and index_path_problem(text) is None:
                out.append((fields[2].decode(), f"{path}/{text}"))
        return out

    def _filled(self, paths: list[str]) -> set[str]:
        """The submodule directories that are real directories with something in them."""
        out = set()
        for rel in paths:
            try:
                if slotfs.kind(self.path, rel) == "dir" and slotfs.list_dir(self.path, rel):
                    out.add(rel)
            except OSError:
                continue  # a symlink on the way: nothing of the slot's
        return out

    def _borrow_module_objects(self, scratch: Path) -> None:
        """Let the scratch repository read the submodules' own objects (the commits the
        superproject records are there), found under ``modules/`` without following a link."""
        root, rel = self.kind.git_dir_at(self.admin, self.path)
        found: list[str] = []
        stack = [(f"{rel}/modules", 0)]
        scanned = 0
        while stack and len(found) < MAX_SUBMODULES and scanned < MODULES_SCANNED:
            here, depth = stack.pop()
            scanned += 1
            try:
                names = slotfs.list_dir(root, here)
            except OSError:
                continue
            if "objects" in names and slotfs.kind(root, f"{here}/objects") == "dir":
                found.append(os.path.join(root, here, "objects"))
            if depth < MODULES_DEPTH:
                stack += [(f"{here}/{n}", depth + 1) for n in names
                          if n not in ("objects", "refs", "logs") and slotfs.kind(root, f"{here}/{n}") == "dir"]  # fmt: skip
        if found:
            with open(scratch / "objects/info/alternates", "a") as f:
                f.writelines(f"{d}\n" for d in found)

    async def _submodule(
        self, scratch: Path, recorded: str, path: str, taken: Plan, lease_id: str
    ) -> Kept | None:
        work = os.path.join(self.path, path)
        env = {"GIT_INDEX_FILE": str(scratch / "index-submodule")}

        async def run(
            args: list[str], *, check: bool = True, input: bytes | None = None, cut: bool = False
        ) -> GitResult:
            return await self.git.run(args, git_dir=scratch, work_tree=work, cwd=work, timeout=self.timeout,
                                      check=check, env=env, input=input, cut=cut,
                                      max_stdout=MAX_STATUS_BYTES if cut else MAX_STDOUT)  # fmt: skip

        (scratch / "index-submodule").unlink(missing_ok=True)
        if (await run(["read-tree", recorded], check=False)).returncode != 0:
            # The recorded commit is not to be had (not fetched, or its repository damaged):
            # every file is the agent's to keep.
            (scratch / "index-submodule").unlink(missing_ok=True)
            await run(["read-tree", EMPTY_TREE])
        before = (await run(["write-tree"])).out.strip()
        status = await run(["status", "--porcelain=v1", "-z", "--untracked-files=all", "--no-renames",
                            "--ignore-submodules=all"], cut=True)  # fmt: skip
        changed = changed_paths(status)
        if not changed:
            return None
        left = replace(self.limits, max_files=max(0, self.limits.max_files - len(taken.take)),
                       max_bytes=max(0, self.limits.max_bytes - taken.bytes))  # fmt: skip
        part = await anyio.to_thread.run_sync(plan_files, work, changed, left)
        taken.take += [f"{path}/{p}" for p in part.take]
        taken.bytes += part.bytes
        taken.skipped += [f"{json.dumps(path)}/{s}" for s in part.skipped]
        if status.cut:
            taken.skipped.append(f"{json.dumps(path)}: {STATUS_CUT}")
        if part.take:
            paths = b"".join(os.fsencode(p) + b"\0" for p in part.take)
            await run(["update-index", "--add", "--remove", "-z", "--stdin"], input=paths)
        after = (await run(["write-tree"])).out.strip()
        if after == before:
            return None
        note = f"necrod salvage of submodule {safe_line(path)} (lease {lease_id})"
        base = (await run(["commit-tree", before, "-m", f"{note}: as recorded ({recorded})"])).out.strip()
        commit = (await run(["commit-tree", after, "-p", base, "-m", note])).out.strip()
        return Kept(path, commit)
