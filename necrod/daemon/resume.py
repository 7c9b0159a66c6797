"""Resume from salvage: a new lease that starts where a lost one stopped.

A salvage commit (``salvage.py``) has the lease's HEAD as its first parent and the work tree the
lease left as its tree. Resuming checks the salvage commit out, then moves HEAD (and the index)
back to that first parent: the lease's commits are commits again, and what it had not committed
(tracked changes, deletions, untracked files) is uncommitted work in the new slot, as it was.

Submodule work a salvage kept (``Necrod-Submodule`` parents) is not put back: the superproject
records the commits, the new slot's submodules are as its pool hands them out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anyio

from necrod.core.slots import SlotState
from necrod.daemon.mirror import REF_PREFIX
from necrod.daemon.pool import Pool
from necrod.io.gitrun import GitRunner
from necrod.proto.errors import FailedPrecondition, Unavailable

#: How long a resume waits for the lost lease's salvage to be made (its slot's cleanup).
SALVAGE_WAIT_S = 60.0


@dataclass(frozen=True, slots=True)
class SalvagePoint:
    """Where a lost lease stopped, as its salvage recorded it."""

    lease_id: str
    #: The salvage commit: its tree is the work tree the lease left.
    commit: str
    #: The lease's HEAD when it was salvaged: its commits end here.
    head: str
    #: The commit the lease started from (``Necrod-Start``; its HEAD when that is not recorded).
    start: str
    #: Who held the lease (``Necrod-Uid``); None on salvages made before owners were recorded.
    uid: int | None


async def salvage_point(git: GitRunner, mirror: Path, lease_id: str) -> SalvagePoint | None:
    """The salvage of ``lease_id`` in this mirror, or None if it has none."""
    result = await git.run(
        ["log", "-1", "--format=%H%x00%P%x00%(trailers:key=Necrod-Uid,valueonly,separator=)%x00"
         "%(trailers:key=Necrod-Start,valueonly,separator=)",
         "--end-of-options", REF_PREFIX + lease_id, "--"],
        git_dir=mirror, timeout=30, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        return None
    commit, parents, uid, start = ([*result.out.strip().split("\0"), "", "", ""])[:4]
    if not commit or not parents.split():
        return None
    head, owner = parents.split()[0], uid.strip()
    return SalvagePoint(
        lease_id, commit, head, start.strip() or head, int(owner) if owner.isdigit() else None
    )


async def settled_salvage(p: Pool, lease_id: str, wait_s: float = SALVAGE_WAIT_S) -> SalvagePoint | None:
    """``lease_id``'s salvage in pool ``p`` once it is made (None: the lease left nothing to
    keep, or was never this pool's). A lease still held cannot be resumed from; one whose
    slot is still being salvaged is waited for, a bounded time."""
    with anyio.move_on_after(wait_s):
        while _salvaging(p, lease_id):
            await anyio.sleep(0.05)
    if _salvaging(p, lease_id):
        raise Unavailable(f"the salvage of lease {lease_id} is still being made; retry shortly",
                          lease_id=lease_id)  # fmt: skip
    return await salvage_point(p.mirror.git, p.mirror.path, lease_id)


def _salvaging(p: Pool, lease_id: str) -> bool:
    for slot in p.slots.values():
        if slot.lease is not None and slot.lease.lease_id == lease_id:
            raise FailedPrecondition(
                f"lease {lease_id} is still held (slot {slot.slot_id}); release it first", lease_id=lease_id
            )
        if slot.salvage_as == lease_id and slot.state is SlotState.CLEANING:
            return True
    return False
