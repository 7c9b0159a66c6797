"""Picking up what an agent left: a salvage as a patch, as a branch, pushed to the origin.

A salvage commit is a record, not a commit to publish: its extra parents are the tags, stash
entries and submodule work it kept, and its message is necrod's. A branch made from it is one
ordinary commit instead: the salvage's tree on top of the lease's own last commit, with the
lease named in a trailer, so what a person pushes is the agent's work and nothing of necrod's.
"""

from __future__ import annotations

from dataclasses import dataclass

from necrod.core.names import check_branch
from necrod.daemon.mirror import Mirror
from necrod.daemon.resume import SalvagePoint
from necrod.io.gitrun import GitError
from necrod.proto.errors import AlreadyExists, FailedPrecondition, Unavailable

#: A patch is cut at this many bytes (``truncated`` says so).
MAX_PATCH_BYTES = 8 << 20
GIT_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class Patch:
    text: str
    truncated: bool


async def patch(mirror: Mirror, point: SalvagePoint, *, binary: bool) -> Patch:
    """Everything the lease did since it started (its commits and what it left uncommitted),
    as one patch; ``binary`` for one ``git apply`` can take whole."""
    args = ["diff", "--no-color", "--no-ext-diff", "--no-textconv", "--full-index"]
    args += ["--binary"] if binary else []
    result = await mirror.git.run([*args, "--end-of-options", point.start, point.commit, "--"],
                                  git_dir=mirror.path, timeout=GIT_TIMEOUT_S, max_stdout=MAX_PATCH_BYTES,
                                  cut=True)  # fmt: skip
    return Patch(result.stdout.decode("utf-8", "replace"), result.cut)


async def make_branch(mirror: Mirror, point: SalvagePoint, branch: str, subject: str) -> str:
    """``refs/heads/<branch>`` in the mirror at one commit holding the salvage's work; the
    commit. A branch that exists is not moved."""
    check_branch(branch)
    ref = f"refs/heads/{branch}"
    tree = (await mirror.git.run(["rev-parse", "--verify", "--end-of-options", f"{point.commit}^{{tree}}"],
                                 git_dir=mirror.path, timeout=30)).out.strip()  # fmt: skip
    message = f"{subject.strip() or 'work of lease ' + point.lease_id}\n\nNecrod-Lease: {point.lease_id}\n"
    commit = (await mirror.git.run(["commit-tree", tree, "-p", point.head, "-F", "-"], git_dir=mirror.path,
                                   timeout=30, input=message.encode())).out.strip()  # fmt: skip
    created = await mirror.git.run(["update-ref", "--no-deref", ref, commit, ""], git_dir=mirror.path,
                                   timeout=30, check=False)  # fmt: skip
    if created.returncode != 0:
        raise AlreadyExists(
            f"branch {branch!r} already exists in the pool's mirror; name another", branch=branch
        )
    return commit


async def push_branch(mirror: Mirror, commit: str, branch: str) -> None:
    """``commit`` to the origin as a new branch ``branch`` (never over an existing one)."""
    check_branch(branch)
    try:
        pushed = await mirror.git.run(["push", "--porcelain", "origin", f"{commit}:refs/heads/{branch}"],
                                      git_dir=mirror.path, timeout=GIT_TIMEOUT_S, network=True, check=False)  # fmt: skip
    except GitError as exc:
        raise Unavailable(f"could not push branch {branch!r} to the origin: {exc}", branch=branch) from None
    if pushed.returncode == 0:
        return
    said = pushed.out + pushed.err
    rejected = next((line for line in said.splitlines() if line.startswith("!")), None)
    if rejected is not None:
        why = rejected.rsplit("\t", 1)[-1].strip()
        raise FailedPrecondition(f"the origin refused branch {branch!r}: {why}", branch=branch)
    last = (said.strip().splitlines() or [f"exit {pushed.returncode}"])[-1]
    raise Unavailable(f"could not push branch {branch!r} to the origin: {last}", branch=branch)


async def drop_branch(mirror: Mirror, commit: str, branch: str) -> None:
    """Remove a branch ``make_branch`` made, if it still points where it did."""
    await mirror.git.run(["update-ref", "-d", "--no-deref", f"refs/heads/{branch}", commit], git_dir=mirror.path,
                         timeout=30, check=False)  # fmt: skip
