"""The background side of necrod: what keeps pools fresh and healthy with nobody watching.

- Fetching: each pool's mirror is fetched every ``fetch_interval_s`` (±10% jitter), once per
  pool whatever its number of slots. A moved base moves the idle slots (the engine does that).
  A failing fetch leaves the pool serving at its last good commit, shows as
  ``fetch: failing since ...`` and is retried with backoff (10 s doubling, at most the
  interval) until it recovers.
- Self-healing (``health``): every ``heal_interval_s``, and the mirror's objects every
  ``mirror_check_interval_s``.
- The disk guard: every ``disk_check_interval_s`` the free space of the workspaces file system
  is compared with ``min_free_disk``; below it no new slots are cut and idle slots above each
  pool's baseline go. Held slots' disk use is measured every 20 checks. The state directory's
  file system is looked at too: when the store went read-only (full) and there is room again,
  one event is written to bring it back, and the pools are driven again.
- Idle slots above the baseline that stay idle past ``idle_timeout_s`` are removed.
- Salvage past each pool's ``salvage_keep_*`` retention is deleted every hour.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus

from necrod.core.clock import Clock
from necrod.core.config import DaemonConfig
from necrod.core.slots import Slot, SlotState
from necrod.daemon.health import Healer
from necrod.daemon.mirrorkeeper import MirrorKeeper
from necrod.daemon.pool import Pool
from necrod.daemon.poolsize import PoolSizer
from necrod.daemon.slottable import SlotTable
from necrod.io.diskusage import disk_usage
from necrod.io.gitrun import GitError
from necrod.io.store import Event, StateStore

log = structlog.get_logger("necrod.supervisor")

#: How often the fetch schedule is looked at.
TICK_S = 0.5
#: How often salvage past the pools' retention is deleted (``necroctl salvage prune`` does it now).
SALVAGE_PRUNE_EVERY_S = 3600.0
#: First retry after a failed fetch; doubles up to the pool's interval.
FETCH_RETRY_S = 10.0
#: Less free than this and a file system is full for necrod: the state's WAL grows by up to
#: ~1 MiB between checkpoints, and no checkout fits.
DISK_FULL_BELOW = 1 << 20


class Supervisor:
    """The loops above. It fetches through the mirror keeper, heals through the healer, sizes
    pools through the sizer, and changes only the table's ``disk_low`` flag and slots' measured
    disk use itself; it watches the state store's file system."""

    def __init__(
        self, *, table: SlotTable, sizer: PoolSizer, keeper: MirrorKeeper, healer: Healer, store: StateStore,
        workspaces: Path, clock: Clock, config: Callable[[], DaemonConfig],
    ) -> None:  # fmt: skip
        self.table = table
        self.sizer = sizer
        self.keeper = keeper
        self.healer = healer
        self.store = store
        self.workspaces = workspaces
        self.clock = clock
        self._config = config
        self.free_bytes: int | None = None
        self.state_free_bytes: int | None = None
        self._state_was_read_only = False
        self.last_scan: list[dict[str, object]] = []
        self.last_scan_at: float | None = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._fetch_loop, tg)
            tg.start_soon(self._heal_loop)
            tg.start_soon(self._disk_loop)
            tg.start_soon(self._idle_loop)
            tg.start_soon(self._salvage_loop)
            task_status.started()

    # --- fetching -------------------------------------------------------------------------------

    async def _fetch_loop(self, tg: TaskGroup) -> None:
        while True:
            now = self.clock.monotonic()
            for p in list(self.table.pools.values()):
                interval = p.config.fetch_interval_s
                if p.state != "ready" or p.draining or p.fetching or not interval:
                    continue
                if p.fetch.next_at == 0.0:
                    p.fetch.next_at = now + self._first_delay(p, interval)
                if now >= p.fetch.next_at:
                    p.fetching = True
                    tg.start_soon(self._fetch, p)
            await anyio.sleep(TICK_S)

    def _first_delay(self, p: Pool, interval: float) -> float:
        """A freshly cloned mirror waits a whole interval; one from before a restart is fetched soon."""
        last = p.fetch.last_ok_at
        if last is not None:
            age = self.clock.wall() - last
            if age < interval:
                return interval - age
        return random.uniform(0, min(5.0, interval))

    async def _fetch(self, p: Pool) -> None:
        interval = p.config.fetch_interval_s
        try:
            await self.keeper.fetch_pool(p)
        except (GitError, OSError) as exc:
            delay = min(interval, FETCH_RETRY_S * 2 ** (p.fetch.consecutive_failures - 1))
            log.warning("fetch_failed", pool=p.name, error=str(exc), retry_in_s=round(delay, 1),
                        failures=p.fetch.consecutive_failures)  # fmt: skip
            p.fetch.next_at = self.clock.monotonic() + delay
        else:
            p.fetch.next_at = self.clock.monotonic() + interval * random.uniform(0.9, 1.1)
        finally:
            p.fetching = False

    # --- self-healing ----------------------------------------------------------------------------

    async def scan(
        self, pool: str | None = None, *, heal: bool, deep: bool = False
    ) -> list[dict[str, object]]:
        pools = [self.table.pool(pool)] if pool is not None else list(self.table.pools.values())
        found = []
        for p in pools:
            if p.state == "ready" and not p.draining:
                found += [a.view() for a in await self.healer.scan(p, heal=heal, deep=deep)]
        if pool is None:
            self.last_scan = found
            self.last_scan_at = self.clock.wall()
        return found

    async def _every(self, interval: Callable[[DaemonConfig], float]) -> None:
        """Sleep until ``interval`` (read from the config now, so a reload applies at once) has
        passed since the last time; an interval of 0 waits for ever (until it changes)."""
        started = self.clock.monotonic()
        while True:
            await anyio.sleep(min(1.0, interval(self._config()) or 1.0))
            seconds = interval(self._config())
            if seconds and self.clock.monotonic() - started >= seconds:
                return

    async def _heal_loop(self) -> None:
        while True:
            await self._every(lambda c: c.heal_interval_s)
            cfg = self._config()
            self.healer.release_overdue = cfg.release_overdue_leases
            now = self.clock.monotonic()
            deep_due = cfg.mirror_check_interval_s and any(
                now - p.mirror_checked_at >= cfg.mirror_check_interval_s for p in self.table.pools.values()
            )
            try:
                await self.scan(heal=True, deep=bool(deep_due))
            except Exception:
                log.exception("heal_scan_failed")

    # --- the disk guard -----------------------------------------------------------------------------

    async def check_disk(self) -> bool:
        await self.check_state_disk()
        cfg = self._config()
        free = _free_bytes(self.workspaces)
        if free is None:
            return self.table.disk_low
        self.free_bytes = free
        low = self.free_bytes < cfg.min_free_disk
        if low != self.table.disk_low:
            self.table.disk_low = low
            kind = "disk.low" if low else "disk.ok"
            data = {
                "free_bytes": self.free_bytes,
                "min_free_disk": cfg.min_free_disk,
                "path": str(self.workspaces),
            }
            (log.error if low else log.info)(kind.replace(".", "_"), **data)
            await self.table.persist_quietly([Event("daemon", kind, data)])
            for p in list(self.table.pools.values()):
                self.sizer.maintain(p)
        return low

    async def check_state_disk(self) -> None:
        store = self.store
        self.state_free_bytes = _free_bytes(store.path.parent)
        if store.read_only is not None and (self.state_free_bytes or 0) >= DISK_FULL_BELOW:
            # Room again: one write brings the store back (as any change that succeeds does).
            event = Event("daemon", "state.writable", {"free_bytes": self.state_free_bytes})
            await self.table.persist_quietly([event])
        if self._state_was_read_only and store.read_only is None:
            # Slots whose creation could not be recorded were dropped: fill the pools again.
            for p in list(self.table.pools.values()):
                self.sizer.maintain(p)
        self._state_was_read_only = store.read_only is not None

    async def _disk_loop(self) -> None:
        rounds = 0
        while True:
            await self.check_disk()
            if rounds % 20 == 0:
                await self.measure_slots()
            rounds += 1
            await self._every(lambda c: c.disk_check_interval_s)

    async def measure_slots(self) -> None:
        """Disk use: every held slot (agents change them), and one clean slot per base commit,
        whose size every idle slot at that commit shares (they are the same checkout)."""
        for p in list(self.table.pools.values()):
            for slot in list(p.slots.values()):
                if slot.state is SlotState.ALLOCATED:
                    await self._measure(p, slot)
            idle = [
                s for s in p.slots.values() if s.state is SlotState.AVAILABLE and s.commit == p.base_commit
            ]
            if idle and p.base_commit and (p.clean_bytes is None or p.clean_bytes[0] != p.base_commit):
                size = await self._measure(p, idle[0])
                if size is not None:
                    p.clean_bytes = (p.base_commit, size)
            if p.clean_bytes is not None:
                for slot in idle:
                    if slot.commit == p.clean_bytes[0]:
                        slot.disk_bytes = p.clean_bytes[1]

    @staticmethod
    async def _measure(p: Pool, slot: Slot) -> int | None:
        """Disk use of one slot, its own (an overlay slot's upper; shown by ``necroctl slots
        -l``); measured here, never on the cleanup path: a walk of a large checkout costs tens
        of milliseconds."""
        slot.disk_bytes = await disk_usage(p.kind_of(slot).own_disk(slot.admin, slot.path))
        return slot.disk_bytes

    # --- salvage retention -------------------------------------------------------------------------

    async def _salvage_loop(self) -> None:
        while True:
            await anyio.sleep(SALVAGE_PRUNE_EVERY_S)
            try:
                await self.keeper.prune_salvage()
            except (GitError, OSError) as exc:
                log.warning("salvage_prune_failed", error=str(exc))

    # --- idle slots above the baseline ------------------------------------------------------------------

    async def _idle_loop(self) -> None:
        while True:
            await anyio.sleep(5.0)
            for p in list(self.table.pools.values()):
                if p.state == "ready" and not p.draining:
                    self.sizer.retire_idle(p, p.config.idle_timeout_s)


def _free_bytes(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError as exc:
        log.error("statvfs_failed", path=str(path), error=str(exc))
        return None
    return st.f_bavail * st.f_frsize
