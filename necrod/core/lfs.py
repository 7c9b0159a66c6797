"""Git LFS for a pool (``lfs:``), as plain values: where the daemon fetches LFS objects from, and
the lines a pool's repository config carries so that every git in a slot, the daemon's and an
agent's, smudges from the mirror's LFS store and never from the network.

The modes (docs/configuration.md):

- ``false``: necrod takes no part. git runs without an LFS filter, so an LFS file is checked out
  as git stores it, its pointer; no LFS object is fetched and git-lfs is not needed.
- ``pointers``: pointer files too, and kept so: the repository config excludes every path from
  LFS downloads (``lfs.fetchexclude = *``), so an agent's own git-lfs leaves pointers when it
  checks out another commit and fetches nothing. git-lfs is not needed on the host.
- ``true``: real content. The mirror fetches the LFS objects of the base (``git lfs fetch``, with
  the pool's fetch) into its own store, ``mirror.git/lfs``; slots smudge from that store only.

Why the endpoint is fixed by the daemon: git-lfs takes ``lfs.url`` and ``remote.<name>.lfsurl``
from a ``.lfsconfig`` in the commit it looks at (in a bare mirror, ``HEAD:.lfsconfig``, and an
agent in a worktree slot can make the mirror's HEAD branch). A value given on git's command
line wins over it, so the daemon's fetch always names the endpoint it derives from the pool's
``repo_url`` (already checked against ``allowed_protocols``) and clears the include and exclude
lists: a ``.lfsconfig`` neither redirects the fetch nor narrows it.
"""

from __future__ import annotations

import os
import re

from necrod.core.config.model import LfsMode
from necrod.core.config.urls import local_repo_path, repo_transport

__all__ = ["LfsMode", "fetch_overrides", "file_url", "lfs_endpoint", "parse_git_lfs_version", "repo_config"]

#: The oldest git-lfs whose standalone file transfer and worktree storage necrod relies on.
MIN_GIT_LFS = (3, 0, 0)


def file_url(path: str) -> str:
    """``path`` (absolute: the config loader makes a local ``repo_url`` so) as a file URL."""
    return "file://" + path


def lfs_endpoint(repo_url: str) -> str:
    """The LFS endpoint git-lfs itself would derive from ``repo_url`` (with no ``.lfsconfig``):
    a local origin is read with git-lfs's standalone file transfer; https and http get
    ``.git/info/lfs``; ssh keeps the URL (git-lfs asks the host over ssh); git:// is served over
    https, as git-lfs does."""
    transport = repo_transport(repo_url)
    if transport == "file":
        return file_url(local_repo_path(repo_url) or repo_url)
    if transport == "ssh":
        return repo_url
    url = repo_url.rstrip("/")
    if transport == "git":
        url = "https://" + url.split("://", 1)[1]
    if not url.endswith(".git"):
        url += ".git"
    return url + "/info/lfs"


def fetch_overrides(endpoint: str) -> dict[str, str]:
    """Config for the daemon's ``git lfs fetch`` only, as git's command-line config in the
    environment (``GIT_CONFIG_COUNT``): it wins over the mirror's config and any ``.lfsconfig``,
    and git passes it on to git-lfs and every git that git-lfs runs."""
    pairs = {"lfs.url": endpoint, "lfs.fetchinclude": "", "lfs.fetchexclude": ""}
    env = {"GIT_CONFIG_COUNT": str(len(pairs))}
    for i, (key, value) in enumerate(pairs.items()):
        env[f"GIT_CONFIG_KEY_{i}"] = key
        env[f"GIT_CONFIG_VALUE_{i}"] = value
    return env


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def repo_config(mode: LfsMode, mirror: str, repo_url: str, *, own_repository: bool) -> str:
    """The lines a repository of the pool carries for ``mode``: the mirror (whose config every
    worktree slot reads) with ``own_repository`` False, a shared clone, an overlay base layer or
    a salvage scratch repository with it True (they name the mirror's store: git-lfs looks in
    ``<common dir>/lfs`` on its own only for worktrees)."""
    if mode is False:
        return ""
    # git-lfs writes ``lfs.repositoryformatversion`` into a repository's config the first time
    # it runs there unless it is set, and its filter installs its hooks (pre-push and three
    # more) into the hooks directory each time it starts: necrod, which keeps both canonical,
    # would take either for tampering. So the version is set, and hooks live nowhere
    # (``core.hooksPath``, as for necrod's own git; the hooks directory is kept empty anyway).
    quiet = "[core]\n\thooksPath = /dev/null\n[lfs]\n\trepositoryformatversion = 0\n"
    if mode == "pointers":
        return quiet + '\tfetchinclude = ""\n\tfetchexclude = "*"\n'
    store = os.path.join(mirror, "lfs")
    lines = [
        '[filter "lfs"]\n',
        "\tprocess = git-lfs filter-process\n",
        "\tsmudge = git-lfs smudge -- %f\n",
        "\tclean = git-lfs clean -- %f\n",
        "\trequired = true\n",
        quiet,
        # The mirror's own store, read with the standalone file transfer: a missing object is
        # an error, never a download from the origin.
        f"\turl = {_quote(file_url(mirror))}\n",
        # Uploads (an agent's ``git lfs push origin <branch>``) go to the origin.
        f"\tpushurl = {_quote(lfs_endpoint(repo_url))}\n",
        '\tfetchinclude = ""\n',
        '\tfetchexclude = ""\n',
    ]
    if own_repository:
        lines.append(f"\tstorage = {_quote(store)}\n")
    return "".join(lines)


def parse_git_lfs_version(text: str) -> tuple[int, int, int] | None:
    m = re.search(r"git-lfs/(\d+)\.(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None
