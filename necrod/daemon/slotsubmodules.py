"""A slot's submodules checked out at the commits its base records (``submodules: true`` or
``recursive``), from the host's submodule mirrors (``submirrors``) only.

Each submodule is laid out as ``git submodule absorbgitdirs`` leaves one: its repository under
the slot's git directory (``modules/<name>``, nested ones under their parent's ``modules/``),
a ``.git`` file in its directory naming it. That repository is written by necrod, not by git
(no ``clone``, no ``submodule update``): its config names only the local mirror as ``origin``,
its objects are the mirror's, borrowed (``objects/info/alternates``), and the gits run there
(``checkout`` of the recorded commit, ``clean``) are given no transport at all
(``GIT_ALLOW_PROTOCOL`` empty): nothing here can reach the network, not even the local mirror as
a remote. The slot kinds call it after a slot is made, reset or moved, and after an
allocation's checkout of another ref (``cleaner``).

A reset keeps a submodule in place when its directory's ``.git`` file names its repository as
necrod wrote it: the repository's config, ``hooks/``, ``info/``, alternates and ``HEAD`` are put
back as necrod writes them and what a lease left there (refs, reflogs, objects of its own,
commits included) is dropped, as for a shared-clone slot's own repository, before ``checkout
--force`` of the recorded commit and ``clean`` run there (git refuses an index entry outside the
work tree); so only the files an agent changed are written again. Anything else (a ``.git``
an agent rewrote, a repository gone) is removed and laid out afresh. Gitlinks not checked out
(refused, not mirrored, or below the depth) are emptied, and repositories under ``modules/``
that no checked-out submodule uses are dropped, at every level. The salvage of a lease's
edits in a submodule (``salvage_submodules``) runs before that reset and reads the recorded
commits through the same borrowed objects.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import anyio
import structlog

from necrod.daemon.mirror import Mirror, quote_config, restore_files, unsafe_files, unsafe_structure
from necrod.daemon.submirrors import Checkout, SubmoduleMirrors
from necrod.io import slotfs

log = structlog.get_logger("necrod.submodules")

#: The environment of every git run in a submodule: no transport is allowed.
NO_NETWORK = {"GIT_ALLOW_PROTOCOL": ""}
#: In a submodule's repository: directories kept empty, files that must not be there.
_EMPTY = ("hooks", "info")
_FORBIDDEN = ("commondir", "config.worktree", "objects/info/http-alternates", "shallow")


def module_config(worktree: str, mirror: Path) -> str:
    return (
        "[core]\n"
        "\trepositoryformatversion = 0\n"
        "\tfilemode = true\n"
        "\tbare = false\n"
        "\tlogallrefupdates = false\n"
        f"\tworktree = {quote_config(worktree)}\n"
        '[remote "origin"]\n'
        f"\turl = {quote_config(str(mirror))}\n"
        "\tfetch = +refs/remotes/origin/*:refs/remotes/origin/*\n"
    )


class SubmoduleCheckout:
    """The submodules of one pool's slots; see the module docstring. ``mode`` is the pool's
    ``submodules`` setting as it is now (a reload may change it)."""

    def __init__(self, mirror: Mirror, mirrors: SubmoduleMirrors, mode: Callable[[], bool | str]) -> None:
        self.mirror = mirror
        self.mirrors = mirrors
        self.mode = mode

    @property
    def enabled(self) -> bool:
        return bool(self.mode())

    async def checkout(
        self,
        git_root: Path,
        git_rel: str,
        path: str,
        commit: str,
        *,
        timeout: float,
        clean_flags: str = "-ffdx",
    ) -> None:
        """Check out, in the slot at ``path`` whose git directory is ``git_root/git_rel``, every
        submodule ``commit`` records (whose mirror has it), in place where it can be (see the
        module docstring); ``clean_flags`` are the pool's, for ``git clean`` in each."""
        mode = self.mode()
        if not mode:
            return
        plan, gitlinks = await self.mirrors.plan(self.mirror, commit, recursive=mode == "recursive",
                                                 timeout=timeout)  # fmt: skip
        await self._level(git_root, f"{git_rel}/modules", path, plan, gitlinks, clean_flags, timeout)

    async def _level(
        self, git_root: Path, modules_rel: str, work_root: str, items: list[Checkout] | tuple[Checkout, ...],
        gitlinks: tuple[str, ...], clean_flags: str, timeout: float,
    ) -> None:  # fmt: skip
        planned = {item.sub.path for item in items}
        names = {item.sub.name for item in items}

        def tidy() -> None:
            for rel in gitlinks:
                if rel not in planned:
                    _empty(work_root, rel)
            _prune_modules(git_root, modules_rel, "", names)

        await anyio.to_thread.run_sync(tidy)
        for item in items:
            await self._one(git_root, modules_rel, work_root, item, clean_flags, timeout)

    async def _one(
        self,
        git_root: Path,
        modules_rel: str,
        work_root: str,
        item: Checkout,
        clean_flags: str,
        timeout: float,
    ) -> None:
        sub = item.sub
        module_rel = f"{modules_rel}/{sub.name}"
        module = os.path.join(git_root, module_rel)
        work = os.path.join(work_root, sub.path)
        # Relative, as git itself writes them: the slot still works moved or mounted elsewhere
        # (a container's workdir).
        dotgit = f"gitdir: {os.path.relpath(module, work)}\n"
        config = module_config(os.path.relpath(work, module), item.mirror)
        alternates = f"{item.mirror / 'objects'}\n"

        def lay_out() -> bool | None:
            """The submodule's repository and directory as necrod writes them; whether the
            ones there were kept (see the module docstring), or None when the checkout has no
            directory there (outside a sparse checkout's cone)."""
            # The directory the superproject's checkout made: a real one, reached without
            # following a link.
            found = slotfs.kind(work_root, sub.path)
            if found is None:
                return None
            if found != "dir":
                raise OSError(f"submodule directory {sub.path!r} is not a directory of the slot")
            kept = (
                slotfs.kind(git_root, module_rel) == "dir"
                and slotfs.read_text_or_none(work_root, f"{sub.path}/.git") == dotgit
            )
            if kept:
                changed = restore_files(git_root, module_rel, config, _EMPTY, _FORBIDDEN)
                changed += unsafe_files(git_root, module_rel) + unsafe_structure(git_root, module_rel)
                if changed:
                    log.warning("submodule_repository_restored", path=work, changed=changed)
                _forget(git_root, module_rel)
            else:
                for name in slotfs.list_dir(work_root, sub.path):
                    slotfs.remove(work_root, f"{sub.path}/{name}")
                slotfs.remove(git_root, module_rel)
                slotfs.ensure_dir(git_root, f"{module_rel}/objects/pack")
                slotfs.write_atomic(git_root, f"{module_rel}/config", config)
                slotfs.write_atomic(work_root, f"{sub.path}/.git", dotgit)
            for rel in ("objects/info", "objects/pack", "refs/heads", "refs/tags"):
                slotfs.ensure_dir(git_root, f"{module_rel}/{rel}")
            slotfs.write_atomic(git_root, f"{module_rel}/objects/info/alternates", alternates)
            slotfs.write_atomic(git_root, f"{module_rel}/HEAD", f"{sub.commit}\n")
            return kept

        kept = await anyio.to_thread.run_sync(lay_out)
        if kept is None:
            return

        async def run(args: list[str]) -> None:
            await self.mirror.git.run(args, git_dir=module, work_tree=work, cwd=work, timeout=timeout,
                                      env=NO_NETWORK)  # fmt: skip

        await run(["checkout", "--quiet", "--force", "--detach", sub.commit])
        if kept:
            await run(["clean", "--quiet", clean_flags])
        await self._level(Path(module), "modules", work, item.children, item.gitlinks, clean_flags, timeout)


def _empty(root: str, rel: str) -> None:
    """A gitlink's directory as a fresh clone has it: empty (or absent, outside a sparse
    checkout's cone), nothing followed."""
    found = slotfs.kind(root, rel)
    if found is None:
        return
    if found == "dir":
        for name in slotfs.list_dir(root, rel):
            slotfs.remove(root, f"{rel}/{name}")
    else:
        slotfs.remove(root, rel)
        slotfs.ensure_dir(root, rel)


def _prune_modules(root: Path, modules_rel: str, prefix: str, names: set[str]) -> None:
    """Remove what is under ``modules/`` but is no repository of a submodule in ``names`` (nor
    a directory on the way to one: a name may hold ``/``)."""
    for entry in slotfs.list_dir(root, f"{modules_rel}/{prefix}" if prefix else modules_rel):
        full = f"{prefix}{entry}"
        if full in names:
            continue
        if any(name.startswith(full + "/") for name in names):
            _prune_modules(root, modules_rel, full + "/", names)
        else:
            slotfs.remove(root, f"{modules_rel}/{full}")


def _forget(root: Path, rel: str) -> None:
    """Drop what a lease left in a submodule's repository: refs, reflogs and objects of its own
    (every object the recorded commit needs is the mirror's, borrowed). ``modules/`` is the
    next level's to prune."""
    for name in (
        "logs",
        "packed-refs",
        "ORIG_HEAD",
        "FETCH_HEAD",
        "MERGE_HEAD",
        "rebase-merge",
        "rebase-apply",
    ):
        slotfs.remove(root, f"{rel}/{name}")
    for name in slotfs.list_dir(root, f"{rel}/refs"):
        slotfs.remove(root, f"{rel}/refs/{name}")
    for name in slotfs.list_dir(root, f"{rel}/objects"):
        if name not in ("info", "pack"):
            slotfs.remove(root, f"{rel}/objects/{name}")
    for sub in ("pack", "info"):
        for name in slotfs.list_dir(root, f"{rel}/objects/{sub}"):
            slotfs.remove(root, f"{rel}/objects/{sub}/{name}")
