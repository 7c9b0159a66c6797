"""One pool's live record: its config, mirror, slots, waiting allocations and fetch state."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from necrod.core.config import PoolConfig
from necrod.core.names import shown_url
from necrod.core.sizing import PoolCounts, quarantine_shortfall
from necrod.core.slots import Slot, SlotState
from necrod.daemon.layers import Layers
from necrod.daemon.mirror import Mirror
from necrod.daemon.overlayslots import OverlaySlots
from necrod.daemon.poolprogress import PoolProgress
from necrod.daemon.slotkinds import CloneSlots, SlotKind, WorktreeSlots
from necrod.daemon.slotsubmodules import SubmoduleCheckout
from necrod.daemon.submirrors import SubmoduleMirrors
from necrod.io.gitrun import GitRunner
from necrod.proto.errors import NecrodError

#: Pool states: starting (reading its mirror), cloning (first clone), ready, failed (retrying).
POOL_STATES = ("starting", "cloning", "ready", "failed")
#: Slots in error named in the degraded reason (the rest are in ``necroctl slots``).
QUARANTINE_NAMED = 5


@dataclass(slots=True)
class Waiter:
    """An allocation waiting (``wait_s``) for the next clean slot, in FIFO order."""

    event: anyio.Event = field(default_factory=anyio.Event)
    slot: Slot | None = None
    error: NecrodError | None = None


@dataclass(slots=True)
class FetchState:
    last_ok_at: float | None = None
    last_attempt_at: float | None = None
    failing_since: float | None = None
    last_error: str | None = None
    consecutive_failures: int = 0
    fetches: int = 0
    failures: int = 0
    last_duration_s: float | None = None
    #: Monotonic time of the next scheduled fetch.
    next_at: float = 0.0
    generation: int = 0

    def view(self) -> dict[str, Any]:
        state = "failing" if self.failing_since is not None else ("ok" if self.last_ok_at else "never")
        return {
            "state": state,
            "last_ok_at": self.last_ok_at,
            "failing_since": self.failing_since,
            "last_error": self.last_error,
            "fetches": self.fetches,
            "failures": self.failures,
            "last_duration_s": self.last_duration_s,
        }


@dataclass(slots=True)
class PrepareState:
    """The pool's prepare step (``prepare:``): the key its base calls for, the last key whose
    output is good, and how its last run went."""

    #: idle (no step), running, ready (the output of ``key`` is there), failed (retrying).
    state: str = "idle"
    key: str | None = None
    ready: str | None = None
    error: str | None = None
    log: str | None = None
    runs: int = 0
    failures: int = 0
    #: Monotonic time before which a failed step is not run again.
    retry_at: float = 0.0
    last_duration_s: float | None = None
    #: commit → key, for the few bases a pool was at lately.
    keys: dict[str, str] = field(default_factory=dict)

    def view(self) -> dict[str, Any]:
        return {"state": self.state, "key": self.key, "ready": self.ready, "error": self.error, "log": self.log,
                "runs": self.runs, "failures": self.failures, "last_duration_s": self.last_duration_s}  # fmt: skip


class Pool:
    def __init__(
        self, config: PoolConfig, root: Path, git: GitRunner, submodules: SubmoduleMirrors | None = None
    ) -> None:
        self.config = config
        self.name = config.name
        self.root = root
        self.slots_dir = root / "slots"
        self.mirror = Mirror(root / "mirror.git", config.repo_url, git, config.lfs, config.filter)
        self.layers = Layers(root, self.mirror)
        #: Layers above the base that overlay slots mounted now stand on, topmost first (the
        #: pool's files: and its last good prepared output; kept by ``prepare.Preparer``).
        self.top_layers: tuple[str, ...] = ()
        self.prepare = PrepareState()
        checkout = None if submodules is None else SubmoduleCheckout(self.mirror, submodules,
                                                                     lambda: self.config.submodules)  # fmt: skip
        #: Why submodules of the base are not checked out (``submodules:``), as the last fetch found.
        self.submodule_problems: tuple[str, ...] = ()
        self._submodule_root = None if submodules is None else submodules.root
        self.kinds: dict[str, SlotKind] = {
            "worktree": WorktreeSlots(self.mirror, checkout),
            "shared-clone": CloneSlots(self.mirror, checkout),
            "overlay": OverlaySlots(self.mirror, self.layers, root, lambda: self.top_layers),
        }
        self.slots: dict[str, Slot] = {}
        self.waiters: deque[Waiter] = deque()
        self.limiter = anyio.CapacityLimiter(config.git_concurrency)
        self.state = "starting"
        self.error: str | None = None
        self.draining = False
        #: Baseline was lowered by a reload: idle slots above it go at once.
        self.shrinking = False
        self.default_branch: str | None = None
        self.base_commit: str | None = None
        self.refs: dict[str, str] = {}
        #: Slot numbers are never reused, even by a pool removed and added again (the engine's
        #: ``fences``): a slot id's fencing token starts at 1 once and only grows after that.
        self.next_number = 1
        #: Operator adjustments (slots.add / slots.remove) on top of config.slots.
        self.delta = 0
        self.fetch = FetchState()
        self.fetch_lock = anyio.Lock()
        #: One prepare refresh at a time (``prepare.Preparer.refresh``).
        self.prepare_lock = anyio.Lock()
        self.became_ready = anyio.Event()
        self.bring_up_failures = 0
        self.create_failures = 0
        #: Monotonic time before which no slot is created (backoff after failed creations).
        self.create_not_before = 0.0
        self.maintain_scheduled = False
        #: A ``maintain`` is due at the next turn of the loop (``PoolSizer.maintain_soon``).
        self.maintain_due = False
        #: git processes of ours working for this pool right now (background jobs and checkouts).
        self.git_active = 0
        #: Set while maintenance needs the pool to itself (lock removal, worktree prune).
        self.maintenance: anyio.Event | None = None
        self.fetching = False
        #: The mirror lost objects and is being fetched again: nothing is handed out meanwhile.
        self.repairing = False
        self.verifying = False
        #: (commit, bytes): the disk use of a clean checkout of that commit.
        self.clean_bytes: tuple[str, int] | None = None
        #: Monotonic time of the last mirror connectivity check.
        self.mirror_checked_at = 0.0
        #: Set while the pool comes up for the first time (clone, blobs, first slots).
        self.progress: PoolProgress | None = None

    @property
    def kind(self) -> SlotKind:
        """The kind new slots are made of."""
        return self.kinds[self.config.isolation]

    @property
    def submodule_mirrors_dir(self) -> str | None:
        """Where the host's submodule mirrors are, when this pool checks submodules out (a
        contained runner mounts it read-only: the slot's submodules borrow their objects)."""
        if not self.config.submodules or self._submodule_root is None or not self._submodule_root.is_dir():
            return None
        return str(self._submodule_root)

    def wanted_layers(self) -> tuple[str, ...] | None:
        """The layers an idle slot of an overlay pool should stand on now (None: not an
        overlay pool, or no base yet)."""
        if self.config.isolation != "overlay" or self.base_commit is None:
            return None
        return (*self.top_layers, self.layers.base_name(self.base_commit))

    def kind_of(self, slot: Slot) -> SlotKind:
        return self.kinds[slot.kind]

    @property
    def base_ref(self) -> str | None:
        return self.config.base or self.default_branch

    @property
    def baseline(self) -> int:
        return max(0, self.config.slots + self.delta)

    def counts(self) -> PoolCounts:
        total = idle = coming = quarantined = 0
        for slot in self.slots.values():
            if slot.state is SlotState.ERROR and not slot.retire:
                quarantined += 1
            if slot.state in (SlotState.ERROR, SlotState.REMOVING) or slot.retire:
                continue
            total += 1
            if slot.state is SlotState.AVAILABLE and not slot.reserved:
                idle += 1
            elif slot.state in (SlotState.CREATING, SlotState.CLEANING):
                coming += 1
        return PoolCounts(total=total, idle=idle, coming=coming, quarantined=quarantined)

    def unknown_entries(self) -> list[Path]:
        """Entries of the pool's slots directory that no slot owns."""
        known = {s.number for s in self.slots.values()}
        try:
            entries = sorted(self.slots_dir.iterdir())
        except FileNotFoundError:
            return []
        return [e for e in entries if not (e.name.isdigit() and int(e.name) in known)]

    def quarantine_note(self) -> str | None:
        """What an operator needs to know about the pool's slots in error (None: it has none)."""
        errors = sorted((s.number, s.slot_id) for s in self.slots.values() if s.state is SlotState.ERROR)
        if not errors:
            return None
        named = ", ".join(sid for _, sid in errors[:QUARANTINE_NAMED])
        if len(errors) > QUARANTINE_NAMED:
            named += ", ..."
        limit = self.config.max_slots
        note = (
            f"pool {self.name}: {len(errors)} slot(s) in error ({named}), counted against max_slots {limit}"
        )
        short = quarantine_shortfall(self.counts(), baseline=self.baseline, max_slots=limit)
        if short:
            note += f": {short} of its {self.baseline} slot(s) cannot be replaced"
        return note + "; necroctl slots -l says why, then recover or remove-slot them"

    def by_state(self) -> dict[str, int]:
        counts = Counter(str(s.state) for s in self.slots.values())
        return {state.value: counts.get(state.value, 0) for state in SlotState}

    def to_row(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "repo_url": self.config.repo_url,
            "next_number": self.next_number,
            "delta": self.delta,
            "default_branch": self.default_branch,
            "base_commit": self.base_commit,
            "draining": self.draining,
        }

    def restore_row(self, row: dict[str, Any]) -> None:
        self.next_number = max(self.next_number, int(row.get("next_number", 1)))
        self.delta = int(row.get("delta", 0))
        self.default_branch = row.get("default_branch")
        self.base_commit = row.get("base_commit")

    def view(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": "draining" if self.draining else self.state,
            "error": self.error,
            "repo_url": shown_url(self.config.repo_url),
            "base": self.base_ref,
            "base_commit": self.base_commit,
            "slots": self.by_state(),
            "size": {
                "baseline": self.baseline,
                "min_idle": self.config.min_idle,
                "max_slots": self.config.max_slots,
            },
            "waiting": len(self.waiters),
            "fetch": self.fetch.view(),
            "mirror": str(self.mirror.path),
            "isolation": self.config.isolation,
            "lfs": {"mode": self.config.lfs, "fetched": self.mirror.lfs_fetched},
            "prepare": self.prepare.view() if self.config.prepare is not None else None,
            "layers": list(self.top_layers),
            "submodules": {"mode": self.config.submodules, "problems": list(self.submodule_problems)}
            if self.config.submodules
            else None,
            "progress": self.progress.latest if self.progress is not None else None,
            "sparse": list(self.config.sparse),
            "filter": self.config.filter,
        }
