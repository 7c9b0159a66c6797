"""A pool's prepare step and ``files:``: slots that are ready to work, not only clean.

The step's **key** is a digest of its command, its ``env`` and the content (blob ids) of its
``key_files`` at the pool's base commit. A base move that leaves the key as it was reuses what
the step made; a new key runs it again, in the background, while slots keep being served from
the last good output (or bare, if there never was one).

- **overlay pools**: the step runs once per key, in a scratch overlay of the base layer (and the
  files layer); what it wrote becomes the layer ``prepared-<key>`` (``layers.py`` keeps only
  its untracked files). Slots stand on it; an agent that deletes or corrupts the output gets it
  back at its next lease, since the reset drops only the slot's upper. ``files:`` are a layer
  too, made again when a host file changes (looked at before every reset).
- **worktree and shared-clone pools**: the step runs in each slot, when the slot is made or the
  key changes (``slot.prepared``); cleanup keeps ignored files (``-ffd``) so the output stays.
  ``files:`` are copied into the slot at each cleanup.

A failing step is a ``pool.prepare`` event and a pool error with the end of its log; it is run
again after a backoff (30 s doubling, at most an hour). The step runs as the daemon's user, in a
session of its own, with the daemon's PATH, HOME and locale, the ``env`` given and
``NECROD_POOL``, ``NECROD_COMMIT``, ``NECROD_PREPARE_KEY``; its log is ``<pool>/prepare/<key>.log``.

It calls the slot table (events), the background jobs (kicks, retries), the gate (limits) and
the pool's mirror and layers.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
from pathlib import Path

import anyio
import structlog

from necrod.core.clock import Clock
from necrod.core.config import PrepareConfig
from necrod.core.slots import Slot, SlotState
from necrod.daemon.gitgate import GitGate
from necrod.daemon.jobs import Jobs
from necrod.daemon.layers import FILES, PREPARED, read_host_file
from necrod.daemon.pool import Pool
from necrod.daemon.slottable import SlotTable
from necrod.io import overlay, slotfs
from necrod.io.steps import StepResult, log_tail, passed_through, run_step
from necrod.io.store import Event

log = structlog.get_logger("necrod.prepare")

#: First wait after a failed step; doubles up to the cap.
RETRY_FIRST_S = 30.0
RETRY_MAX_S = 3600.0
#: Keys remembered per pool (one per recent base commit).
KEYS_REMEMBERED = 16
#: The end of a failed step's log shown in the pool's error and event.
ERROR_TAIL_BYTES = 1500


def prepare_key(cfg: PrepareConfig, tree: list[tuple[str, str, str]]) -> str:
    """The digest of the command, its ``env`` and the blob ids of the ``key_files`` in
    ``tree`` ((mode, object, path) entries). Globs are fnmatch's (``*`` also matches ``/``;
    ``**/x`` also matches ``x`` at the top)."""
    patterns = [p.removeprefix("./") for p in cfg.key_files]

    def wanted(path: str) -> bool:
        return any(
            fnmatch.fnmatchcase(path, p) or (p.startswith("**/") and fnmatch.fnmatchcase(path, p[3:]))
            for p in patterns
        )

    matched = sorted((path, obj) for _, obj, path in tree if wanted(path))
    text = json.dumps([cfg.command, sorted(cfg.env), matched, cfg.key_files])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def step_argv(cfg: PrepareConfig) -> list[str]:
    return ["/bin/sh", "-c", cfg.command] if isinstance(cfg.command, str) else list(cfg.command)


class Preparer:
    def __init__(self, *, table: SlotTable, jobs: Jobs, gate: GitGate, clock: Clock) -> None:
        self.table = table
        self.jobs = jobs
        self.gate = gate
        self.clock = clock

    # --- what a pool's slots should stand on ------------------------------------------------------

    def stale(self, p: Pool, slot: Slot) -> bool:
        """Whether an idle slot at the base is behind the pool's layers or prepare key."""
        if slot.kind == "overlay":
            wanted = p.wanted_layers()
            return wanted is not None and slot.layers != wanted
        return self._slot_wants_step(p, slot)

    def _slot_wants_step(self, p: Pool, slot: Slot) -> bool:
        st = p.prepare
        return (
            p.config.prepare is not None
            and st.key is not None
            and slot.prepared != st.key
            and self.clock.monotonic() >= st.retry_at
        )

    # --- keeping the pool's output up to date -----------------------------------------------------

    async def refresh(self, p: Pool) -> None:
        """Bring the pool's files layer and prepared output up to date with its base and config,
        then move idle slots onto them (they are kicked). Background work; one at a time."""
        if p.state != "ready" or p.base_commit is None:
            return
        async with p.prepare_lock:
            base = p.base_commit
            cfg = p.config.prepare
            overlay_pool = p.config.isolation == "overlay"
            top: list[str] = []
            if overlay_pool:
                files = await self._files_layer(p)
                top += [files] if files else []
            if cfg is None:
                p.prepare.state, p.prepare.key, p.prepare.error = "idle", None, None
            else:
                key = await self._key(p, base, cfg)
                p.prepare.key = key
                if overlay_pool and not p.layers.exists(PREPARED + key) and self._may_run(p):
                    await self._run_in_overlay(p, base, key, cfg, top)
                if overlay_pool and p.layers.exists(PREPARED + key):
                    self._ready(p, key)
                if overlay_pool and p.prepare.ready and p.layers.exists(PREPARED + p.prepare.ready):
                    top.append(PREPARED + p.prepare.ready)
            if overlay_pool:
                p.top_layers = tuple(top)
        for slot in list(p.slots.values()):
            if slot.state is SlotState.AVAILABLE and self.stale(p, slot):
                self.jobs.kick(slot)
        await self.collect(p)

    def _may_run(self, p: Pool) -> bool:
        return self.clock.monotonic() >= p.prepare.retry_at

    def _ready(self, p: Pool, key: str) -> None:
        st = p.prepare
        st.ready, st.state, st.error, st.failures, st.retry_at = key, "ready", None, 0, 0.0

    async def _key(self, p: Pool, commit: str, cfg: PrepareConfig) -> str:
        st = p.prepare
        key = st.keys.get(commit)
        if key is None:
            tree = await p.mirror.tree(commit)
            key = await anyio.to_thread.run_sync(prepare_key, cfg, tree)
            if len(st.keys) >= KEYS_REMEMBERED:
                st.keys.pop(next(iter(st.keys)))
            st.keys[commit] = key
        return key

    async def _files_layer(self, p: Pool) -> str | None:
        try:
            return await anyio.to_thread.run_sync(p.layers.files, p.config.files)
        except OSError as exc:
            log.error("files_unreadable", pool=p.name, error=str(exc))
            return next((n for n in p.top_layers if n.startswith(FILES)), None)  # the last good ones

    async def files_changed(self, p: Pool) -> bool:
        """Before a reset in an overlay pool: whether a host file of ``files:`` changed (its new
        layer is then made, and the pool's layers updated)."""
        if p.config.isolation != "overlay" or not p.config.files:
            return False
        files = await self._files_layer(p)
        current = next((n for n in p.top_layers if n.startswith(FILES)), None)
        if files is None or files == current:
            return False
        p.top_layers = (files, *(n for n in p.top_layers if not n.startswith(FILES)))
        return True

    # --- running the step -----------------------------------------------------------------------

    def _env(self, p: Pool, cfg: PrepareConfig, commit: str, key: str) -> dict[str, str]:
        env = passed_through()
        env.update(dict(cfg.env))
        env.update({"NECROD_POOL": p.name, "NECROD_COMMIT": commit, "NECROD_PREPARE_KEY": key})
        return env

    def _log(self, p: Pool, key: str, slot: Slot | None = None) -> Path:
        name = f"{key}.log" if slot is None else f"{key}-slot-{slot.number}.log"
        path = p.root / "prepare" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        return path

    async def _run_in_overlay(
        self, p: Pool, commit: str, key: str, cfg: PrepareConfig, top: list[str]
    ) -> None:
        """The step in a scratch overlay of the base (and files) layers; its upper becomes
        ``prepared-<key>`` when it succeeds."""
        scratch = p.root / "prepare" / key
        mnt, upper, work = scratch / "mnt", scratch / "upper", scratch / "work"
        log_path = self._log(p, key)
        await self._started(p, key, log_path)
        result: StepResult | None = None
        try:
            async with self.gate.limits(p):  # the layer's checkout is git like any other
                base = await p.layers.base(commit, timeout=p.config.clone_timeout_s)

            def mount() -> None:
                shutil.rmtree(scratch, ignore_errors=True)
                for d in (mnt, upper, work):
                    d.mkdir(parents=True)
                overlay.mount(mnt, p.layers.paths([*top, base]), upper, work)

            await anyio.to_thread.run_sync(mount)
            try:
                result = await run_step(step_argv(cfg), cwd=mnt, env=self._env(p, cfg, commit, key), log=log_path,
                                        timeout=cfg.timeout_s)  # fmt: skip
            finally:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(overlay.unmount, mnt)
            if result.ok:
                tracked = {path for _, _, path in await p.mirror.tree(commit)}
                await anyio.to_thread.run_sync(p.layers.keep_prepared, key, upper, tracked)
        except OSError as exc:
            await self._failed(p, key, f"could not run it: {exc}", log_path)
            return
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(shutil.rmtree, scratch, True)
        await self._ended(p, key, result, cfg, log_path)

    async def prepare_slot(self, p: Pool, slot: Slot, commit: str) -> None:
        """In a worktree or shared-clone slot just made or cleaned: run the step when the slot
        does not hold the output of the pool's key, and copy ``files:`` in. (An overlay
        slot has both from its layers.)"""
        if slot.kind == "overlay":
            return
        if p.config.files:
            await anyio.to_thread.run_sync(copy_files, slot.path, p.config.files)
        cfg = p.config.prepare
        if cfg is None or not self._slot_wants_step(p, slot):
            return
        key = p.prepare.key
        assert key is not None
        log_path = self._log(p, key, slot)
        await self._started(p, key, log_path, slot)
        try:
            result = await run_step(step_argv(cfg), cwd=Path(slot.path), env=self._env(p, cfg, commit, key),
                                    log=log_path, timeout=cfg.timeout_s)  # fmt: skip
        except OSError as exc:
            await self._failed(p, key, f"could not run it: {exc}", log_path)
            return
        await self._ended(p, key, result, cfg, log_path)
        if result.ok:
            slot.prepared = key

    async def _started(self, p: Pool, key: str, log_path: Path, slot: Slot | None = None) -> None:
        st = p.prepare
        st.state, st.log, st.runs = "running", str(log_path), st.runs + 1
        log.info("prepare_started", pool=p.name, key=key, slot=slot.slot_id if slot else None)
        await self._event(p, "running", key)

    async def _ended(
        self, p: Pool, key: str, result: StepResult | None, cfg: PrepareConfig, log_path: Path
    ) -> None:
        assert result is not None
        p.prepare.last_duration_s = round(result.duration_s, 3)
        if result.ok:
            self._ready(p, key)
            log.info("prepare_ready", pool=p.name, key=key, s=p.prepare.last_duration_s)
            await self._event(p, "ready", key)
        else:
            await self._failed(p, key, f"the prepare step {result.describe(cfg.timeout_s)}", log_path)

    async def _failed(self, p: Pool, key: str, why: str, log_path: Path) -> None:
        st = p.prepare
        st.failures += 1
        delay = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (st.failures - 1))
        st.retry_at = self.clock.monotonic() + delay
        tail = await anyio.to_thread.run_sync(log_tail, log_path, ERROR_TAIL_BYTES)
        st.state = "failed"
        st.error = why + (f"; the end of its log ({log_path}):\n{tail}" if tail else f" (log: {log_path})")
        log.error("prepare_failed", pool=p.name, key=key, error=why, retry_in_s=delay, log=str(log_path))
        await self._event(p, "failed", key, error=st.error, retry_in_s=delay)
        self.jobs.spawn(self._retry_later, p, delay)

    async def _retry_later(self, p: Pool, delay: float) -> None:
        await anyio.sleep(delay)
        if self.table.pools.get(p.name) is p:
            await self.refresh(p)

    async def _event(self, p: Pool, state: str, key: str, **extra: object) -> None:
        data = {"pool": p.name, "state": state, "key": key, "log": p.prepare.log,
                "duration_s": p.prepare.last_duration_s, **extra}  # fmt: skip
        await self.table.persist_quietly([Event("pools", "pool.prepare", data)])

    # --- layers no slot stands on -------------------------------------------------------------------

    async def tidy(self, p: Pool, slot: Slot) -> None:
        """What a reset or move of an overlay slot left: its old upper, layers nobody uses."""
        await p.kind_of(slot).tidy()
        await self.collect(p)

    async def collect(self, p: Pool) -> None:
        """Remove the layers of an overlay pool that neither a slot nor the pool's current
        stack stands on."""
        if p.config.isolation != "overlay" and not any(s.layers for s in p.slots.values()):
            return
        keep = {name for s in p.slots.values() for name in s.layers} | set(p.top_layers)
        if p.base_commit:
            keep.add(p.layers.base_name(p.base_commit))
        # The output in use, and the one being made for the key the base calls for.
        keep |= {PREPARED + key for key in (p.prepare.ready, p.prepare.key) if key}
        gone = await anyio.to_thread.run_sync(p.layers.remove_unused, keep)
        if gone:
            log.info("layers_removed", pool=p.name, layers=gone)


def copy_files(slot_path: str, files: tuple[tuple[str, str], ...]) -> None:
    """``files:`` into a git slot, as the host has them now (written under a fresh name and
    renamed over whatever the agent left there; nothing in the slot is followed)."""
    for rel, host in files:
        data, mode = read_host_file(host)
        if os.path.dirname(rel):
            slotfs.ensure_dir(slot_path, os.path.dirname(rel))
        slotfs.write_atomic(slot_path, rel, data, mode)
