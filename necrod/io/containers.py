"""The ``container`` launcher: a task's runner in a container, through the Docker Engine API.

Docker itself or podman's compatible service (``podman system service``), at ``DOCKER_HOST`` or
the profile's ``docker_host``, spoken to with aiodocker. What the container sees:

- the slot, read-write, at the profile's ``workdir`` (``/workspace``), also its working directory;
- the pool's mirror, read-only, at its own path: a shared-clone slot's ``alternates`` name it;
- the directory of the daemon's socket, read-only, at ``/run/necrod``, so the runner can heartbeat
  (the directory, not the socket file: a restarted daemon binds a new socket there);
- the profile's extra mounts, read-only; nothing else of the host.

It runs as the profile's ``uid:gid`` (never root by default), with no capabilities,
``no-new-privileges``, the network the profile names (none by default) and the profile's memory,
CPU and pids limits. Files in the slot are handed to that uid before the start and handed back
when the container is gone, so the daemon's git can clean them (git refuses a repository owned
by someone else).

Containers carry the labels ``necrod.daemon``, ``necrod.task`` and ``necrod.attempt`` and are
named after the attempt: after a daemon restart a running one is adopted by name, and any of
ours that no attempt claims is removed. Output is streamed to the attempt's log; the exit status
is the attempt's result; a stop is the engine's own SIGTERM, grace, SIGKILL.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import anyio
import structlog

from necrod.core.config import ContainerSpec
from necrod.io.attemptlog import CappedLog
from necrod.io.contained import SOCKET_DIR_INSIDE, hand_over, socket_inside
from necrod.io.launchers import Exit, LaunchSpec, Run

log = structlog.get_logger("necrod.containers")

LABEL_DAEMON = "necrod.daemon"
#: How long past the grace a stop keeps asking an unreachable engine (then the dispatcher keeps
#: the slot out of rotation: the container may still be writing in it).
STOP_RETRY_S = 10.0
#: What aiohttp raises when the engine's socket is gone or the connection breaks.
UNREACHABLE = (OSError, aiohttp.ClientError)
#: aiodocker's status for "Cannot connect to Docker Engine".
NO_ENGINE = 900
#: The engine's states of a container that has not ended ("created": ours were all started).
STILL_RUNNING = ("created", "running", "paused", "restarting")
#: How long the log stream may take to end after the container did; then how long the second pass
#: may take to read what is left.
DRAIN_S = 2.0
CATCH_UP_S = 10.0


def _away(exc: Exception) -> bool:
    """The engine could not be reached (as opposed to refusing)."""
    return isinstance(exc, UNREACHABLE) or (
        isinstance(exc, aiodocker.DockerError) and exc.status == NO_ENGINE
    )


class ContainerError(OSError):
    """The engine could not be reached, or refused what we asked."""


def _user(spec: ContainerSpec) -> tuple[int, int]:
    uid, gid = spec.user.split(":")
    return int(uid), int(gid)


@dataclass(frozen=True, slots=True)
class ContainerLaunch:
    """What the dispatcher knows that a container needs beyond a ``LaunchSpec``."""

    spec: ContainerSpec
    slot: str
    mirror: str
    socket: str
    labels: dict[str, str]
    #: The host's submodule mirrors, which the slot's submodules borrow objects from (read-only).
    submodule_mirrors: str | None = None


class ContainerRun(Run):
    def __init__(self, launcher: ContainerLauncher, container: Any, name: str, slot: str, log_path: Path,
                 since: int = 0) -> None:  # fmt: skip
        self.launcher = launcher
        self.container = container
        self.name = name
        self.session = name
        self.slot = slot
        self.log_path = log_path
        self.since = since
        self._exit: Exit | None = None
        #: Bytes of the engine's log stream already copied (a later pass skips them).
        self._streamed = 0

    async def _pump_logs(self) -> None:
        """Copy the container's output to the attempt's log, from where an earlier pass stopped,
        until the engine's stream ends or the log is full."""
        try:
            with open(self.log_path, "ab", buffering=0) as out:  # noqa: ASYNC230 (small appends)
                sink = CappedLog(out)
                if sink.full:
                    return
                skip = self._streamed
                async for chunk in self.container.log(
                    stdout=True, stderr=True, follow=True, since=self.since
                ):
                    data = chunk.encode() if isinstance(chunk, str) else chunk
                    if skip:
                        seen = min(skip, len(data))
                        data, skip = data[seen:], skip - seen
                    self._streamed += len(data)
                    if data and not sink.write(data):
                        return
        except (aiodocker.DockerError, *UNREACHABLE) as exc:
            log.warning("container_logs_failed", container=self.name, error=str(exc))

    async def _exited(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The wait's answer and the engine's record, once the record agrees the container ended:
        podman's wait can answer while the container still runs, with a status of 0."""
        backoff = 0.1
        while True:
            status = await self.container.wait()
            info = await self.container.show()
            if info.get("State", {}).get("Status") not in STILL_RUNNING:
                return status, info
            log.warning("container_wait_answered_early", container=self.name)
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _wait_once(self) -> tuple[dict[str, Any], dict[str, Any]]:
        failure: Exception | None = None
        drained = anyio.Event()

        async def follow() -> None:
            await self._pump_logs()
            drained.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            try:
                status, info = await self._exited()
                with anyio.move_on_after(DRAIN_S):  # the log stream ends with the container
                    await drained.wait()
            except (aiodocker.DockerError, *UNREACHABLE) as exc:
                failure = exc  # raised as itself, not inside the task group's ExceptionGroup
            tg.cancel_scope.cancel()
        if failure is not None:
            raise failure
        if not drained.is_set():
            # podman's follow can miss a short-lived container's end and hang with the last lines
            # unsent. The container has ended: a second pass reads to the end of what it kept.
            with anyio.move_on_after(CATCH_UP_S):
                await self._pump_logs()
        return status, info

    async def wait(self) -> Exit:
        if self._exit is not None:
            return self._exit
        backoff = 1.0
        while True:
            try:
                status, info = await self._wait_once()
                break
            except (aiodocker.DockerError, *UNREACHABLE) as exc:
                if isinstance(exc, aiodocker.DockerError) and exc.status == 404:
                    self._exit = Exit(code=None, lost=True, detail="the container was removed from outside")
                    await self.launcher.give_back(self.slot)
                    return self._exit
                if not _away(exc):
                    raise ContainerError(f"the container engine failed: {exc}") from None
                # The engine is away (restarting, say): the container may well run on. Wait for it.
                log.warning(
                    "container_engine_unreachable", container=self.name, error=str(exc) or type(exc).__name__
                )
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 15.0)
        code = int(status.get("StatusCode", -1))
        oom = bool(info.get("State", {}).get("OOMKilled"))
        self._exit = Exit(code=None, signal=code - 128, oom=oom) if code > 128 else Exit(code=code, oom=oom)
        await self.launcher.remove(self.container)
        await self.launcher.give_back(self.slot)
        return self._exit

    async def stop(self, grace: float) -> None:
        """The engine's SIGTERM, grace, SIGKILL; an engine that is away is asked again for a while."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(grace + STOP_RETRY_S):
            backoff = 0.5
            while True:
                try:
                    await self.container.stop(t=max(1, round(grace)))
                    return
                except (aiodocker.DockerError, *UNREACHABLE) as exc:
                    if not _away(exc):
                        if not (isinstance(exc, aiodocker.DockerError) and exc.status in (304, 404)):
                            log.warning("container_stop_failed", container=self.name, error=str(exc))
                        return
                    log.warning(
                        "container_stop_failed", container=self.name, error=str(exc) or type(exc).__name__
                    )
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)


class ContainerLauncher:
    def __init__(self, daemon_id: str) -> None:
        self.daemon_id = daemon_id
        self._clients: dict[str | None, aiodocker.Docker] = {}

    def _docker(self, host: str | None) -> aiodocker.Docker:
        if host not in self._clients:
            self._clients[host] = aiodocker.Docker(url=host or os.environ.get("DOCKER_HOST"))
        return self._clients[host]

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()

    async def start(self, spec: LaunchSpec, launch: ContainerLaunch) -> ContainerRun:
        c = launch.spec
        uid, gid = _user(c)
        env = {**spec.env, "NECROD_SOCKET": socket_inside(launch.socket), "NECROD_SLOT_PATH": c.workdir}
        env = {k: v for k, v in env.items() if k not in ("PATH", "HOME")}
        binds = [f"{launch.slot}:{c.workdir}:rw", f"{launch.mirror}:{launch.mirror}:ro",
                 f"{os.path.dirname(launch.socket)}:{SOCKET_DIR_INSIDE}:ro", *(f"{m}:{m}:ro" for m in c.mounts)]  # fmt: skip
        if launch.submodule_mirrors:
            binds.append(f"{launch.submodule_mirrors}:{launch.submodule_mirrors}:ro")
        host: dict[str, Any] = {
            "Binds": binds, "NetworkMode": c.network, "CapDrop": ["ALL"],
            "SecurityOpt": ["no-new-privileges"], "PidsLimit": c.pids_limit or 0,
        }  # fmt: skip
        if spec.memory_limit:
            host["Memory"] = host["MemorySwap"] = spec.memory_limit
        if c.cpus:
            host["NanoCpus"] = int(c.cpus * 1e9)
        config: dict[str, Any] = {
            "Image": c.image, "Cmd": spec.argv, "User": c.user, "WorkingDir": c.workdir,
            "Env": [f"{k}={v}" for k, v in env.items()], "Tty": False, "HostConfig": host,
            "Labels": {**launch.labels, LABEL_DAEMON: self.daemon_id},
        }  # fmt: skip
        spec.log.parent.mkdir(parents=True, exist_ok=True)
        spec.log.touch()
        started = time.perf_counter()
        await anyio.to_thread.run_sync(hand_over, launch.slot, uid, gid)
        handed = time.perf_counter() - started
        docker = self._docker(c.docker_host)
        try:
            container = await docker.containers.create(config=config, name=spec.name)
            await container.start()
        except aiodocker.DockerError as exc:
            await self.give_back(launch.slot)
            raise ContainerError(
                f"could not start container {spec.name} from {c.image}: {exc.message}"
            ) from None
        except OSError as exc:
            await self.give_back(launch.slot)
            raise ContainerError(
                f"cannot reach the container engine ({c.docker_host or 'DOCKER_HOST'}): {exc}"
            ) from None
        log.info("container_started", container=spec.name, image=c.image, user=c.user,
                 hand_over_ms=round(handed * 1000, 1))  # fmt: skip
        return ContainerRun(self, container, spec.name, launch.slot, spec.log)

    async def give_back(self, slot: str) -> None:
        if os.path.isdir(slot):
            await anyio.to_thread.run_sync(hand_over, slot, os.getuid(), os.getgid())

    async def remove(self, container: Any) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await container.delete(force=True)
            except aiodocker.DockerError as exc:
                if exc.status != 404:
                    log.warning("container_remove_failed", error=exc.message)

    async def adopt(self, name: str, spec: ContainerSpec, slot: str, log_path: Path) -> ContainerRun | None:
        """The container of an attempt that ran while the daemon was down, or None if it is gone."""
        docker = self._docker(spec.docker_host)
        try:
            container = await docker.containers.get(name)
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return None
            raise ContainerError(f"the container engine failed: {exc.message}") from None
        try:
            since = int(log_path.stat().st_mtime)
        except OSError:
            since = 0
        return ContainerRun(self, container, name, slot, log_path, since=since)

    async def sweep(self, hosts: set[str | None], keep: set[str]) -> list[str]:
        """Remove every container of this daemon that no running attempt claims."""
        removed = []
        for host in hosts:
            try:
                found = await self._docker(host).containers.list(
                    all=True, filters={"label": [f"{LABEL_DAEMON}={self.daemon_id}"]}
                )
            except (aiodocker.DockerError, OSError) as exc:
                log.warning("container_sweep_failed", docker_host=host, error=str(exc))
                continue
            for container in found:
                names = [n.lstrip("/") for n in container._container.get("Names", [])]
                if not set(names) & keep:
                    await self.remove(container)
                    removed.extend(names)
        if removed:
            log.warning("orphan_containers_removed", containers=removed)
        return removed
