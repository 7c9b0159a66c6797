"""A slot's submodules checked out at the commits its base records (``submodules: true`` or
``recursive``), from the host's submodule mirrors (``submirrors``) only.

Each submodule is laid out as ``git submodule absorbgitdirs`` leaves one: its repository under
the slot's git directory (``modules/<name>``, nested ones under their parent's ``modules/``),
a ``.git`` file in its directory naming it. That repository is written by necrod, not by git
(no ``clone``, no ``submodule update``): its config names only the local mirror as ``origin``,
its objects are the mirror's, borrowed (``objects/info/alternates``), and the one git run, a
``checkout`` of the recorded commit, is given no transport at all (``GIT_ALLOW_PROTOCOL`` empty):
nothing here can reach the network, not even the local mirror as a remote.

A checkout always starts from nothing: the slot kind's reset empties every submodule directory
and drops ``modules/`` first (an agent may have written either), so no file of a lease and no
config an agent planted in a submodule's repository is ever used by a git of ours. The salvage
of a lease's edits in a submodule (``salvage_submodules``) runs before that reset and reads the
recorded commits through the same borrowed objects.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import anyio

from necrod.daemon.mirror import Mirror, quote_config
from necrod.daemon.submirrors import Checkout, SubmoduleMirrors
from necrod.io import slotfs
from necrod.io.gitrun import GitRunner

#: The environment of the one git run in a submodule: no transport is allowed.
NO_NETWORK = {"GIT_ALLOW_PROTOCOL": ""}


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

    async def checkout(self, git_root: Path, git_rel: str, path: str, commit: str, *, timeout: float) -> None:
        """Check out, in the slot at ``path`` whose git directory is ``git_root/git_rel``, every
        submodule ``commit`` records (whose mirror has it), into empty directories."""
        mode = self.mode()
        if not mode:
            return
        plan = await self.mirrors.plan(self.mirror, commit, recursive=mode == "recursive", timeout=timeout)
        git = self.mirror.git
        for item in plan:
            await self._one(git, git_root, f"{git_rel}/modules", path, item, timeout)

    async def _one(
        self, git: GitRunner, git_root: Path, modules_rel: str, work_root: str, item: Checkout, timeout: float
    ) -> None:
        sub = item.sub
        module_rel = f"{modules_rel}/{sub.name}"
        module = os.path.join(git_root, module_rel)
        work = os.path.join(work_root, sub.path)

        def lay_out() -> None:
            # The directory the superproject's checkout made: a real one, reached without
            # following a link, and empty (the reset emptied it).
            if slotfs.kind(work_root, sub.path) != "dir":
                raise OSError(f"submodule directory {sub.path!r} is not a directory of the slot")
            for name in slotfs.list_dir(work_root, sub.path):
                slotfs.remove(work_root, f"{sub.path}/{name}")
            slotfs.remove(git_root, module_rel)
            for rel in ("objects/info", "objects/pack", "refs/heads", "refs/tags"):
                slotfs.ensure_dir(git_root, f"{module_rel}/{rel}")
            # Relative, as git itself writes them: the slot still works moved or mounted
            # elsewhere (a container's workdir).
            slotfs.write_atomic(git_root, f"{module_rel}/config", module_config(os.path.relpath(work, module),
                                                                                 item.mirror))  # fmt: skip
            slotfs.write_atomic(
                git_root, f"{module_rel}/objects/info/alternates", f"{item.mirror / 'objects'}\n"
            )
            slotfs.write_atomic(git_root, f"{module_rel}/HEAD", f"{sub.commit}\n")
            slotfs.write_atomic(work_root, f"{sub.path}/.git", f"gitdir: {os.path.relpath(module, work)}\n")

        await anyio.to_thread.run_sync(lay_out)
        await git.run(["checkout", "--quiet", "--force", "--detach", sub.commit],
                      git_dir=module, work_tree=work, cwd=work, timeout=timeout, env=NO_NETWORK)  # fmt: skip
        for child in item.children:
            await self._one(git, Path(module), "modules", work, child, timeout)
