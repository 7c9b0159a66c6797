"""The daemon's task tree: what starts in which order, and how it stops.

Start: check git, take the instance locks (state directory, then socket), open the state
database, start the store writer, the HTTP endpoint when ``metrics_listen`` is set (so the
probes answer "alive, not ready" while the rest starts), the pool engine, the socket server, the
dispatcher, the signal handler, the watchdog and the ``STATUS=`` line (``vitals``); then tell
systemd READY. Every failure before READY is a one-line message and exit 1.

Stop (SIGTERM/SIGINT): tell systemd STOPPING, refuse new leases, stop accepting connections,
let calls in flight finish within ``shutdown_grace_s``, then cancel the background work (git
process groups are stopped, slots caught mid-cleanup are cleaned again at the next start) and
flush the store. A second SIGTERM/SIGINT skips the grace.

Over 500 lines, on purpose: the daemon's start, stop, reload and status are one object's,
because each reads the same few fields (the config and its generation, the parts wired at start,
whether it is stopping); split apart, each piece would need the whole daemon handed back to it.
The parts themselves are built here and live in their own modules.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import structlog

from necrod import __version__
from necrod.core.config import Config, ConfigError
from necrod.daemon.dispatcher import Dispatcher
from necrod.daemon.engine import PoolEngine
from necrod.daemon.events import EventBus
from necrod.daemon.gauges import About, Gauges
from necrod.daemon.health import Healer
from necrod.daemon.metrics import Metrics
from necrod.daemon.rpc import Api
from necrod.daemon.supervisor import DISK_FULL_BELOW, Supervisor
from necrod.daemon.vitals import Vitals
from necrod.io.config_files import load_config
from necrod.io.gitrun import (
    GitRunner,
    GitVersionError,
    git_environment,
    version_problem,
)
from necrod.io.instance import InstanceLock
from necrod.io.metrics_http import metrics_route, serve_http
from necrod.io.preflight import restart_only_changed, start_problems
from necrod.io.sdnotify import Notifier
from necrod.io.server import Limits, RpcServer, raise_fd_limit
from necrod.io.socketaccess import AccessPolicy
from necrod.io.store import Event, StateStore, StoreError
from necrod.io.watcher import ConfigWatcher, content_digest
from necrod.paths import ensure_private_dir, shared_tmp_dir
from necrod.proto.errors import FailedPrecondition

log = structlog.get_logger("necrod")


def keep_private(directory: Path, gid: int | None) -> None:
    """Mirrors hold every lease's salvage: nobody but the daemon's user (and the socket group,
    who are handed slots there) may look in. A directory someone else owns is left as it is
    and said so."""
    st = directory.stat()
    if st.st_uid != os.getuid():
        log.warning("workspaces_not_ours", path=str(directory), owner=st.st_uid)
        return
    if gid is not None and st.st_gid != gid:
        os.chown(directory, -1, gid)
    mode = 0o750 if gid is not None else 0o700
    if st.st_mode & 0o777 != mode:
        os.chmod(directory, mode)


class StartupError(Exception):
    """necrod cannot start; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Settings:
    socket: Path
    state_dir: Path
    #: None when running on the embedded default (nothing to reload).
    config_path: Path | None


class Daemon:
    def __init__(self, settings: Settings, config: Config) -> None:
        self.settings = settings
        self.config = config
        self.pid = os.getpid()
        self.started_mono = time.monotonic()
        self.started_at = time.time()
        self.generation = 1
        self.loaded_at = time.time()
        self.last_reload_error: ConfigError | None = None
        self.reloads = {"applied": 0, "rejected": 0}
        self.notifier = Notifier()
        self.bus = EventBus()
        self.metrics = Metrics()
        self.watcher: ConfigWatcher | None = None
        self._reload_lock = anyio.Lock()
        self._stop = anyio.Event()
        self._stopping = False
        self._ready = False
        self.git_version = ""
        self._locks: list[InstanceLock] = []
        # Set up in run():
        self.store: StateStore
        self.engine: PoolEngine
        self.server: RpcServer
        self.supervisor: Supervisor
        self.dispatcher: Dispatcher
        self.vitals: Vitals

    # --- startup ------------------------------------------------------------------------------------

    def _prepare(self) -> GitRunner:
        state = self.settings.state_dir
        try:
            state.mkdir(parents=True, exist_ok=True)
            os.chmod(state, 0o700 if self.config.daemon.socket_group is None else 0o750)
        except OSError as exc:
            raise StartupError(f"cannot use the state directory {state}: {exc.strerror}") from None
        socket_dir = self.settings.socket.parent
        try:
            if socket_dir == shared_tmp_dir():
                ensure_private_dir(socket_dir)  # a shared /tmp: someone may have planted it
            elif not socket_dir.exists():
                socket_dir.mkdir(
                    mode=0o700 if self.config.daemon.socket_group is None else 0o750, parents=True
                )
        except OSError as exc:
            raise StartupError(f"cannot use the socket directory {socket_dir}: {exc}") from None
        (state / "gitconfig").unlink(missing_ok=True)  # written by earlier versions; unused
        env = git_environment(self.config.daemon.allowed_protocols)
        return GitRunner(self.config.daemon.git, env)

    def _lock(self) -> None:
        socket = self.settings.socket
        for path in (self.settings.state_dir / "necrod.lock", socket.with_name(socket.name + ".lock")):
            lock = InstanceLock(path)
            lock.acquire()
            self._locks.append(lock)

    async def run(self) -> int:
        git = self._prepare()
        try:
            version = await git.version()
        except GitVersionError as exc:
            raise StartupError(str(exc)) from None
        problem = version_problem(version)
        if problem:
            raise StartupError(problem)
        self.git_version = ".".join(map(str, version))
        self._lock()
        try:
            policy = AccessPolicy.for_group(self.config.daemon.socket_group, self.config.daemon.admin_group)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        try:
            self.store = StateStore.open(self.settings.state_dir / "necrod.db")
        except StoreError as exc:
            raise StartupError(str(exc)) from None
        self.store.set_history(self.config.daemon.event_history)
        self.store.on_commit = self.bus.publish
        workspaces = Path(self.config.daemon.workspaces or self.settings.state_dir / "workspaces")
        try:
            workspaces.mkdir(parents=True, exist_ok=True)
            workspaces = workspaces.resolve()
            keep_private(workspaces, policy.gid)
        except OSError as exc:
            raise StartupError(f"cannot use the workspaces directory {workspaces}: {exc.strerror}") from None
        self.workspaces = workspaces
        self.engine = PoolEngine(
            store=self.store,
            git=git,
            workspaces=workspaces,
            git_concurrency=self.config.daemon.git_concurrency,
            port_range=self.config.daemon.port_range,
            max_leases_per_uid=self.config.daemon.max_leases_per_uid,
            allowed_protocols=self.config.daemon.allowed_protocols,
            metrics=self.metrics,
        )
        e = self.engine
        healer = Healer(table=e.table, jobs=e.jobs, gate=e.gate, allocator=e.allocator, lifecycle=e.lifecycle,
                        keeper=e.keeper, metrics=self.metrics, clock=e.clock)  # fmt: skip
        self.supervisor = Supervisor(table=e.table, sizer=e.sizer, keeper=e.keeper, healer=healer, store=self.store,
                                     workspaces=workspaces, clock=e.clock, config=lambda: self.config.daemon)  # fmt: skip
        self.dispatcher = Dispatcher(table=e.table, allocator=e.allocator, lifecycle=e.lifecycle, store=self.store, config=lambda: self.config,
                                     socket=self.settings.socket, state_dir=self.settings.state_dir,
                                     metrics=self.metrics)  # fmt: skip
        api = Api(table=e.table, allocator=e.allocator, sizer=e.sizer, lifecycle=e.lifecycle, keeper=e.keeper,
                  dispatcher=self.dispatcher, store=self.store, bus=self.bus, metrics=self.metrics,
                  supervisor=self.supervisor, status=self.status, reload=self.reload)  # fmt: skip
        d = self.config.daemon
        self.server = RpcServer(
            self.settings.socket,
            api.router(),
            policy=policy,
            limits=Limits.of(d),
        )
        self.metrics.add_gauges(Gauges(table=e.table, git=git, supervisor=self.supervisor, store=self.store,
                                       dispatcher=self.dispatcher, server=self.server, about=self._about,
                                       clock=e.clock).collect)  # fmt: skip
        self._track_metrics()
        self.vitals = Vitals(socket=self.settings.socket, store=self.store, server=self.server, table=e.table,
                             dispatcher=self.dispatcher, notifier=self.notifier, phase=self.phase,
                             degraded=self.degraded_reasons, clock=e.clock)  # fmt: skip
        fds = raise_fd_limit()
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(self.store.run)
                # Quietly: on a full state disk the daemon starts read-only rather than not at all.
                await self._persist_event(
                    Event("daemon", "daemon.started", {"pid": self.pid, "version": __version__})
                )
                # First, so the probes answer while the rest starts (alive, not yet ready).
                if d.metrics_listen is not None:
                    await self._serve_http(tg, *d.metrics_listen)
                await tg.start(self.engine.run, self.config)
                try:
                    await tg.start(self.server.serve)
                except OSError as exc:
                    raise StartupError(
                        f"cannot listen on {self.settings.socket}: {exc.strerror or exc}"
                    ) from None
                await tg.start(self.supervisor.run)
                await tg.start(self.dispatcher.run)
                if self.settings.config_path is not None:
                    self.watcher = ConfigWatcher(self.settings.config_path, self._on_config_change)
                    tg.start_soon(self.watcher.run)
                tg.start_soon(self._signals, tg)
                tg.start_soon(self.vitals.watchdog)
                tg.start_soon(self.vitals.keep_status)
                log.info(
                    "ready",
                    socket=str(self.settings.socket),
                    state_dir=str(self.settings.state_dir),
                    workspaces=str(workspaces),
                    pools=sorted(self.config.pools),
                    git=self.git_version,
                    open_files_limit=fds,
                    config=str(self.settings.config_path or "embedded default"),
                )
                for note in self.config.notes:
                    log.info("config_note", note=note)
                self._ready = True
                self.vitals.send_status(ready=True)
                await self._stop.wait()
                await self._shutdown()
                self._cancel(tg)
        except BaseExceptionGroup as group:
            # Raised inside the task group, a StartupError arrives wrapped: unwrap it, so that
            # it is the one-line message it is meant to be.
            found: BaseException | None = group.subgroup(StartupError)
            while isinstance(found, BaseExceptionGroup):
                found = found.exceptions[0]
            if found is not None:
                raise found from None
            raise
        finally:
            self.store.close()
        log.info("stopped")
        return 0

    async def _serve_http(self, tg: anyio.abc.TaskGroup, host: str, port: int) -> None:
        routes = {"/metrics": metrics_route(self.metrics.render), "/healthz": self.vitals.healthz,
                  "/readyz": self.vitals.readyz}  # fmt: skip
        try:
            await tg.start(serve_http, host, port, routes)
        except OSError as exc:
            raise StartupError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None

    def phase(self) -> str:
        if self._stopping or self._stop.is_set():
            return "stopping"
        return "running" if self._ready else "starting"

    # --- stopping -----------------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    def _cancel(self, tg: anyio.abc.TaskGroup) -> None:
        # The watcher's thread returns promptly only once its stop event is set (trap 4).
        if self.watcher is not None:
            self.watcher.stop()
        tg.cancel_scope.cancel()

    async def _shutdown(self) -> None:
        self._stopping = True
        grace = self.config.daemon.shutdown_grace_s
        log.info("stopping", grace_s=grace, in_flight=self.server.in_flight)
        self.notifier.stopping()
        await self.dispatcher.stop()
        self.engine.stop()
        self.server.stop_accepting()
        with anyio.move_on_after(grace) as scope:
            await self.server.wait_idle()
        if scope.cancelled_caught:
            log.warning("grace_expired", in_flight=self.server.in_flight)
        try:
            await self.store.write([Event("daemon", "daemon.stopping", {"pid": self.pid})])
        except Exception:
            log.warning("stop_event_not_saved")

    async def _signals(self, tg: anyio.abc.TaskGroup) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    tg.start_soon(self._reload_quietly, "SIGHUP")
                elif self._stop.is_set():
                    log.warning("stop_now", signal=signal.Signals(signum).name)
                    self._cancel(tg)
                else:
                    log.info("signal", signal=signal.Signals(signum).name)
                    self.request_stop()

    # --- reload -------------------------------------------------------------------------------------

    async def _on_config_change(self) -> None:
        await self._reload_quietly("file changed")

    async def _reload_quietly(self, reason: str) -> None:
        try:
            await self.reload(reason)
        except FailedPrecondition:
            pass  # rejected: already logged, kept for daemon.status and sent as an event
        except Exception:
            # A reload runs in the daemon's own task group: whatever it raises must not stop it.
            log.exception("reload_crashed", reason=reason)

    async def reload(self, reason: str) -> dict[str, Any]:
        """Re-read pools.yaml and apply it as a difference; one reload at a time.

        Error handling: a file that cannot be read or validated, or a config that fails while
        being applied, changes nothing (the running config and its generation stay): the error
        is logged, kept for ``daemon.status`` until a good file arrives, sent as a
        ``config.rejected`` event, and raised as ``failed_precondition``.
        """
        async with self._reload_lock:
            path = self.settings.config_path
            if path is None:
                return {
                    "generation": self.generation,
                    "changes": [],
                    "note": "running on the embedded default: there is no file to reload",
                }
            self.notifier.reloading()
            try:
                new = await self._read_config(path)
                await self._check_startable(new, path)
                changes = await self._apply(new, path)
            except ConfigError as exc:
                await self._reject(reason, exc)
                raise FailedPrecondition(f"config not applied: {exc}", **exc.to_dict()) from None
            finally:
                self.vitals.send_status(ready=True)
            self.config = new
            self.generation += 1
            self.loaded_at = time.time()
            self.last_reload_error = None
            self.reloads["applied"] += 1
            self.metrics.reloads.labels("applied").inc()
            self._track_metrics()
            log.info("config_applied", reason=reason, generation=self.generation, changes=changes)
            await self._persist_event(
                Event(
                    "config",
                    "config.reloaded",
                    {"reason": reason, "generation": self.generation, "changes": changes},
                )
            )
            return {"generation": self.generation, "changes": changes}

    async def _read_config(self, path: Path) -> Config:
        """pools.yaml, read and validated in a worker thread: a big file takes seconds to parse."""
        if self.watcher is not None:  # what this reload reads, the watcher need not reload again
            self.watcher.last_digest = await anyio.to_thread.run_sync(content_digest, path)
        try:
            return await anyio.to_thread.run_sync(load_config, path)
        except ConfigError:
            raise
        except Exception as exc:
            log.exception("config_read_crashed", path=str(path))
            raise ConfigError(f"cannot read it: {type(exc).__name__}: {exc}", file=str(path)) from None

    async def _apply(self, new: Config, path: Path) -> list[str]:
        try:
            changes = self._restart_only_changes(new)
            if new.daemon.admin_group != self.config.daemon.admin_group:
                changes.append(
                    f"daemon.admin_group {self.config.daemon.admin_group!r} -> {new.daemon.admin_group!r}"
                )
            changes += await self.engine.apply_config(new)
            changes += self.dispatcher.apply_config(new)
            d = new.daemon
            self.server.configure(Limits.of(d))
            # load_config checked that the group exists.
            self.server.policy = self.server.policy.with_admin_group(d.admin_group)
            self.store.set_history(d.event_history)
        except Exception as exc:
            log.exception("config_apply_crashed", path=str(path))
            raise ConfigError(
                f"applying it failed ({type(exc).__name__}: {exc}); generation {self.generation} stays",
                file=str(path),
            ) from None
        return changes

    async def _reject(self, reason: str, exc: ConfigError) -> None:
        self.last_reload_error = exc
        self.reloads["rejected"] += 1
        self.metrics.reloads.labels("rejected").inc()
        log.error("config_rejected", reason=reason, error=str(exc))
        await self._persist_event(Event("config", "config.rejected", {"reason": reason, **exc.to_dict()}))

    def _restart_only_changes(self, new: Config) -> list[str]:
        return [
            f"daemon.{key} changed: takes effect at the next restart"
            for key in restart_only_changed(self.config.daemon, new.daemon)
        ]

    async def _check_startable(self, new: Config, path: Path) -> None:
        """Refuse a config the next start would refuse (``preflight``)."""
        problems = await start_problems(
            self.config.daemon, new.daemon, state_dir=self.settings.state_dir, git=self.engine.git
        )
        if problems:
            raise ConfigError(
                "; ".join(problems) + " (a restart-only key: necrod would not start again with it)",
                file=str(path),
            )

    async def _persist_event(self, event: Event) -> None:
        try:
            await self.store.write([event])
        except Exception:
            log.warning("event_not_saved", type=event.type)

    # --- status -------------------------------------------------------------------------------------

    def degraded_reasons(self) -> list[str]:
        reasons = []
        if self.last_reload_error is not None:
            reasons.append(f"config rejected: {self.last_reload_error}")
        reasons += self._disk_reasons()
        if self.dispatcher.stalled:
            reasons.append("dispatcher stalled: " + "; ".join(self.dispatcher.stalled[:3]))
        reasons += (f"runner profile refused: {why}" for why in self.dispatcher.refused())
        for pool in self.engine.table.pools.values():
            if pool.state == "failed":
                reasons.append(f"pool {pool.name} failed: {pool.error}")
            if pool.fetch.failing_since is not None:
                since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(pool.fetch.failing_since))
                reasons.append(f"pool {pool.name} fetch: failing since {since}: {pool.fetch.last_error}")
            if pool.submodule_problems:
                first, more = pool.submodule_problems[0], len(pool.submodule_problems) - 1
                reasons.append(
                    f"pool {pool.name} submodules: {first}" + (f" (and {more} more)" if more else "")
                )
            quarantine = pool.quarantine_note()
            if quarantine:
                reasons.append(quarantine)
        return reasons

    def _disk_reasons(self) -> list[str]:
        reasons = []
        state_free = self.supervisor.state_free_bytes
        if self.store.read_only is not None:
            reasons.append(
                f"state read-only: {self.store.read_only}: changes are refused (unavailable) until "
                "there is room; reads and status are served"
            )
        elif state_free is not None and state_free < DISK_FULL_BELOW:
            reasons.append(
                f"state disk full: {state_free} bytes free on the file system of "
                f"{self.settings.state_dir}: changes will be refused when it runs out"
            )
        free = self.supervisor.free_bytes
        if free is not None and free < DISK_FULL_BELOW:
            reasons.append(
                f"workspaces disk full: {free} bytes free on {self.workspaces}: slots cannot be "
                "created, cleaned or salvaged"
            )
        elif self.engine.table.disk_low:
            reasons.append(
                f"disk: {free if free is not None else '?'} bytes free on {self.workspaces}, below "
                f"min_free_disk {self.config.daemon.min_free_disk}: no new slots are cut"
            )
        return reasons

    def status(self) -> dict[str, Any]:
        reasons = self.degraded_reasons()
        err = self.last_reload_error
        return {
            "server": "necrod",
            "version": __version__,
            "pid": self.pid,
            "state": "stopping" if self._stopping else ("degraded" if reasons else "running"),
            "degraded": reasons,
            "uptime_s": round(time.monotonic() - self.started_mono, 3),
            "started_at": self.started_at,
            "socket": str(self.settings.socket),
            "state_dir": str(self.settings.state_dir),
            "workspaces": str(self.workspaces),
            "git": {
                "version": self.git_version,
                "running": self.engine.git.running,
                "started": self.engine.git.started,
                "started_by_verb": dict(self.engine.git.started_by_verb),
                "submodule_mirrors": self.engine.submodules.statistics(),
            },
            "config": {
                "path": str(self.settings.config_path) if self.settings.config_path else None,
                "generation": self.generation,
                "loaded_at": self.loaded_at,
                "last_reload_error": err.to_dict() if err else None,
                "reloads": dict(self.reloads),
            },
            "pools": {
                name: {
                    "state": "draining" if p.draining else p.state,
                    "slots": p.by_state(),
                    "waiting": len(p.waiters),
                    "fetch": p.fetch.view()["state"],
                    "base_commit": p.base_commit,
                    "progress": p.progress.latest if p.progress is not None else None,
                }
                for name, p in self.engine.table.pools.items()
            },
            "disk": {
                "free_bytes": self.supervisor.free_bytes,
                "min_free_disk": self.config.daemon.min_free_disk,
                "low": self.engine.table.disk_low,
                "state_free_bytes": self.supervisor.state_free_bytes,
            },
            "store": self.store.statistics(),
            "procs": self.engine.cleanup.scanner.statistics(),
            "anomalies": {
                "last_scan_at": self.supervisor.last_scan_at,
                "found": len(self.supervisor.last_scan),
            },
            "dispatcher": self.dispatcher.status(),
            "connections": len(self.server.connections),
            "events": {"last_seq": self.store.last_seq, "subscribers": self.bus.subscribers},
        }

    def _about(self) -> About:
        return About(git_version=self.git_version, generation=self.generation,
                     last_reload_ok=self.last_reload_error is None, degraded_reasons=len(self.degraded_reasons()),
                     min_free_disk=self.config.daemon.min_free_disk)  # fmt: skip

    def _track_metrics(self) -> None:
        self.metrics.track((name for name, p in self.config.pools.items() if p.metrics), self.config.runners)
