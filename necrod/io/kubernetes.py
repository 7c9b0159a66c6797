"""The ``kubernetes`` launcher: a task's runner as a Kubernetes Job on the daemon's own node.

One Job per attempt, named after it (``necro-<task>-<attempt>``), with ``backoffLimit: 0`` (necrod
does the retries), pinned to the node by ``nodeName``; its pod mounts by hostPath the slot
(read-write, at the profile's ``workdir``), the pool's mirror (read-only, at its own path: a
shared-clone slot's ``alternates`` name it) and the directory of the daemon's socket (read-only,
at ``/run/necrod``: a restarted daemon's new socket is seen there, as a mounted file would not be). It runs as the profile's
``uid:gid``, never root by default, with no capabilities and no privilege escalation. Files in
the slot are handed to that uid before the Job is created and back when the pod has ended, as
for the container launcher.

The pod's phase and its container's exit code, watched, are the attempt's result; its log is
followed into the attempt's log. A stop deletes the Job with foreground propagation (the pod
gets its grace, then SIGKILL). Jobs carry the labels ``necrod.daemon``, ``necrod.task`` and
``necrod.attempt``: after a daemon restart a running Job is adopted by name, a finished one
gives its result, and any Job of ours that no attempt claims is deleted. Finished Jobs are left
for ``ttlSecondsAfterFinished`` so ``kubectl logs`` still works for a while.

The API calls and credentials are ``io.kubeapi``'s.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import structlog

from necrod.core.config import KubernetesSpec
from necrod.io.attemptlog import CappedLog
from necrod.io.contained import SOCKET_DIR_INSIDE, hand_over, socket_inside
from necrod.io.kubeapi import CONTAINER, Api, KubeError, connect
from necrod.io.launchers import Exit, LaunchSpec, Run

log = structlog.get_logger("necrod.kubernetes")

LABEL_DAEMON = "necrod.daemon"
#: On the pod template, so the Job's pods can be selected without relying on ``job-name``.
LABEL_RUN = "necrod.run"
#: Waiting reasons after which the pod will never start by itself.
HOPELESS = {"InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError", "CreateContainerError"}
#: Waiting reasons that may pass (a registry hiccup), until this long after the Job was created.
PULLING = {"ErrImagePull", "ImagePullBackOff"}
PULL_PATIENCE_S = 120.0
#: How long past the grace a stop keeps asking an unreachable API to delete the Job (then the
#: dispatcher keeps the slot out of rotation: the pod may still be writing in it).
STOP_RETRY_S = 10.0


def label_value(text: str) -> str:
    """``text`` made a valid label value (at most 63 of [A-Za-z0-9-_.], alphanumeric ends)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", text)[-63:].strip("-_.") or "x"


@dataclass(frozen=True, slots=True)
class KubeLaunch:
    """What the dispatcher knows that a Job needs beyond a ``LaunchSpec``."""

    spec: KubernetesSpec
    slot: str
    mirror: str
    socket: str
    labels: dict[str, str]
    grace_s: float
    #: The Job's ``activeDeadlineSeconds``: a backstop for when the daemon is not there to stop it.
    deadline_s: float | None = None
    #: The host's submodule mirrors, which the slot's submodules borrow objects from (read-only).
    submodule_mirrors: str | None = None


def _user(spec: KubernetesSpec) -> tuple[int, int]:
    uid, gid = spec.user.split(":")
    return int(uid), int(gid)


def job_manifest(spec: LaunchSpec, launch: KubeLaunch, node: str, labels: dict[str, str]) -> dict[str, Any]:
    k = launch.spec
    uid, gid = _user(k)
    env = {**spec.env, "NECROD_SOCKET": socket_inside(launch.socket), "NECROD_SLOT_PATH": k.workdir}
    env = {key: v for key, v in env.items() if key not in ("PATH", "HOME")}
    limits: dict[str, str] = {}
    if spec.memory_limit:
        limits["memory"] = str(spec.memory_limit)
    if k.cpus:
        limits["cpu"] = f"{round(k.cpus * 1000)}m"
    container: dict[str, Any] = {
        "name": CONTAINER, "image": k.image, "imagePullPolicy": k.image_pull_policy, "command": spec.argv,
        "workingDir": k.workdir, "env": [{"name": key, "value": v} for key, v in env.items()],
        "resources": {"limits": limits, "requests": dict(limits)},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [
            {"name": "slot", "mountPath": k.workdir},
            {"name": "mirror", "mountPath": launch.mirror, "readOnly": True},
            {"name": "necrod-socket", "mountPath": SOCKET_DIR_INSIDE, "readOnly": True},
        ],
    }  # fmt: skip
    if launch.submodule_mirrors:
        container["volumeMounts"].append(
            {"name": "submodule-mirrors", "mountPath": launch.submodule_mirrors, "readOnly": True}
        )
    pod: dict[str, Any] = {
        "restartPolicy": "Never", "nodeName": node, "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": max(1, round(launch.grace_s)),
        "securityContext": {"runAsUser": uid, "runAsGroup": gid, "runAsNonRoot": uid != 0},
        "containers": [container],
        "volumes": [
            {"name": "slot", "hostPath": {"path": launch.slot, "type": "Directory"}},
            {"name": "mirror", "hostPath": {"path": launch.mirror, "type": "Directory"}},
            {"name": "necrod-socket", "hostPath": {"path": os.path.dirname(launch.socket), "type": "Directory"}},
        ],
    }  # fmt: skip
    if launch.submodule_mirrors:
        pod["volumes"].append(
            {"name": "submodule-mirrors", "hostPath": {"path": launch.submodule_mirrors, "type": "Directory"}}
        )
    if k.service_account:
        pod["serviceAccountName"] = k.service_account
    job_spec: dict[str, Any] = {
        "backoffLimit": 0, "ttlSecondsAfterFinished": k.ttl_after_finished_s,
        "template": {"metadata": {"labels": {**labels, LABEL_RUN: spec.name}}, "spec": pod},
    }  # fmt: skip
    if launch.deadline_s:
        job_spec["activeDeadlineSeconds"] = max(1, round(launch.deadline_s))
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": spec.name, "labels": labels},
            "spec": job_spec}  # fmt: skip


def pod_exit(pod: dict[str, Any]) -> Exit | None:
    """The attempt's result if the pod has ended, else None."""
    status = pod.get("status") or {}
    for c in status.get("containerStatuses") or []:
        if c.get("name") != CONTAINER:
            continue
        ended = (c.get("state") or {}).get("terminated")
        if ended:
            code = int(ended.get("exitCode", -1))
            oom = ended.get("reason") == "OOMKilled"
            if code > 128:
                return Exit(code=None, signal=code - 128, oom=oom)
            return Exit(code=code, oom=oom)
    if status.get("phase") in ("Succeeded", "Failed"):
        why = status.get("reason") or "no exit status"
        return Exit(code=None, lost=True, detail=f"the pod ended without an exit status: {why}: "
                    f"{status.get('message', '')}".rstrip(": "))  # fmt: skip
    return None


def _waiting(pod: dict[str, Any]) -> tuple[str, str] | None:
    for c in (pod.get("status") or {}).get("containerStatuses") or []:
        waiting = (c.get("state") or {}).get("waiting")
        if c.get("name") == CONTAINER and waiting:
            return str(waiting.get("reason", "")), str(waiting.get("message", ""))
    return None


def _started(pod: dict[str, Any]) -> bool:
    for c in (pod.get("status") or {}).get("containerStatuses") or []:
        state = c.get("state") or {}
        if c.get("name") == CONTAINER and ("running" in state or "terminated" in state):
            return True
    return False


def _job_failure(job: dict[str, Any]) -> str | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Failed" and cond.get("status") == "True":
            return f"{cond.get('reason', 'Failed')}: {cond.get('message', '')}".rstrip(": ")
    return None


class KubeRun(Run):
    """A Job being watched. The watch (and the log it follows) runs in the dispatcher's task
    group, not in ``wait()``: a wait cut short by a stop must not miss the pod's last words,
    which vanish with the pod once the Job is deleted."""

    def __init__(self, launcher: KubeLauncher, api: Api, name: str, slot: str, log_path: Path) -> None:
        self.launcher = launcher
        self.api = api
        self.name = name
        self.session = name
        self.slot = slot
        self.log_path = log_path
        #: When this daemon started watching: how long an image pull may keep failing counts from here.
        self.created = time.time()
        self._exit: Exit | None = None
        self._ended = anyio.Event()
        self._stopping = False
        self._deleted = False
        #: The pod whose log is followed, and the end of the latest follow.
        self._pod: str | None = None
        self._pumped: anyio.Event | None = None
        launcher.spawn(self._monitor)

    async def _pump_log(self, pod: str, drained: anyio.Event) -> None:
        """Follow the container's log from its start, skipping what the attempt's log already
        holds: a wait cut short, or a daemon restart, picks up where the file ends."""
        try:
            resp = await self.api.follow_log(pod)
            async with resp:
                if resp.status != 200:
                    log.warning("kubernetes_log_refused", pod=pod, status=resp.status)
                    return
                with open(self.log_path, "ab", buffering=0) as out:  # noqa: ASYNC230 (small appends)
                    sink = CappedLog(out)
                    if sink.full:
                        return
                    skip = out.tell()
                    async for chunk in resp.content.iter_any():
                        if skip >= len(chunk):
                            skip -= len(chunk)
                            continue
                        if not sink.write(chunk[skip:]):
                            return
                        skip = 0
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("kubernetes_log_failed", pod=pod, error=str(exc) or type(exc).__name__)
        finally:
            drained.set()

    def _follow_log(self, tg: Any) -> None:
        """(Re)start following the log: a follow cut short (the API went away) resumes."""
        if self._pod is not None and (self._pumped is None or self._pumped.is_set()):
            self._pumped = anyio.Event()
            tg.start_soon(self._pump_log, self._pod, self._pumped)

    def _see(self, pod: dict[str, Any], tg: Any) -> Exit | None:
        if _started(pod):
            self._pod = (pod.get("metadata") or {}).get("name", "")
            self._follow_log(tg)
        ended = pod_exit(pod)
        if ended is not None:
            return ended
        waiting = _waiting(pod)
        if waiting is not None:
            reason, message = waiting
            waited = time.time() - self.created
            if reason in HOPELESS or (reason in PULLING and waited > PULL_PATIENCE_S):
                return Exit(
                    code=None, lost=True, detail=f"the pod cannot start: {reason}: {message}".rstrip(": ")
                )
        return None

    async def _follow(self, tg: Any) -> tuple[Exit, bool]:
        """Watch the Job's pod until it ends; the result, and whether the Job must be deleted."""
        selector = f"{LABEL_RUN}={self.name}"
        backoff = 1.0
        while True:
            try:
                if self._stopping and not self._deleted:
                    # A stop that could not reach the API: finish it now that the API answers.
                    await self.api.delete_job(self.name, grace=0)
                    self._deleted = True
                listed = await self.api.list_pods(selector)
                pods = listed.get("items") or []
                for pod in pods:
                    if (ended := self._see(pod, tg)) is not None:
                        return ended, ended.lost
                if not pods:
                    job = await self.api.read_job(self.name)
                    if job is None:
                        return self._gone("the Job was deleted from outside"), False
                    if (failure := _job_failure(job)) is not None:
                        return Exit(code=None, lost=True, detail=f"the Job failed: {failure}"), False
                since = str((listed.get("metadata") or {}).get("resourceVersion", ""))
                async for kind, pod in self.api.watch_pods(selector, since):
                    if kind == "DELETED":
                        return pod_exit(pod) or self._gone("its pod was deleted from outside"), False
                    if (ended := self._see(pod, tg)) is not None:
                        return ended, ended.lost
                backoff = 1.0
            except KubeError as exc:
                log.warning("kubernetes_watch_failed", job=self.name, error=exc.message)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 15.0)

    def _gone(self, why: str) -> Exit:
        if self._stopping:
            return Exit(code=None, signal=signal.SIGTERM)
        return Exit(code=None, lost=True, detail=why)

    async def _monitor(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                result, delete = await self._follow(tg)
                self._follow_log(tg)  # catch up, if the last follow ended before the pod did
                if self._pumped is not None:
                    with anyio.move_on_after(5):  # the log stream ends with the container
                        await self._pumped.wait()
                tg.cancel_scope.cancel()
            if delete:
                with anyio.CancelScope(shield=True):
                    try:
                        await self.api.delete_job(self.name, grace=0, propagation="Background")
                    except KubeError as exc:
                        log.warning("kubernetes_delete_failed", job=self.name, error=exc.message)
            await self.launcher.give_back(self.slot)
        except Exception as exc:
            log.exception("kubernetes_monitor_failed", job=self.name)
            result = Exit(code=None, lost=True, detail=f"necrod lost track of the Job: {exc}")
        self._exit = result
        self._ended.set()

    async def wait(self) -> Exit:
        await self._ended.wait()
        assert self._exit is not None
        return self._exit

    async def stop(self, grace: float) -> None:
        """Delete the Job; an API that is away is asked again for a while (the pod must not go
        on writing in a slot that is about to be cleaned)."""
        self._stopping = True
        with anyio.CancelScope(shield=True), anyio.move_on_after(grace + STOP_RETRY_S):
            backoff = 0.5
            while True:
                try:
                    await self.api.delete_job(self.name, grace=grace)
                    self._deleted = True
                    return
                except KubeError as exc:
                    log.warning("kubernetes_stop_failed", job=self.name, error=exc.message)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)


class KubeLauncher:
    def __init__(self, daemon_id: str, spawn: Callable[..., None]) -> None:
        self.daemon_id = daemon_id
        self.daemon_label = label_value(daemon_id)
        #: Starts a background task in the dispatcher's task group (where each Job is watched).
        self.spawn = spawn
        self._apis: dict[KubernetesSpec, Api] = {}

    async def api(self, spec: KubernetesSpec) -> Api:
        key = _connection_key(spec)
        if key not in self._apis:
            self._apis[key] = await connect(spec)
        return self._apis[key]

    async def aclose(self) -> None:
        for api in self._apis.values():
            await api.client.close()
        self._apis.clear()

    async def start(self, spec: LaunchSpec, launch: KubeLaunch) -> KubeRun:
        node = launch.spec.node or os.environ.get("NODE_NAME")
        if not node:
            raise KubeError("failed_precondition", "cannot pin the Job to this node: set NODE_NAME (the "
                            "downward API's spec.nodeName) or the profile's kubernetes.node")  # fmt: skip
        api = await self.api(launch.spec)
        labels = {**dict(launch.spec.labels), **{k: label_value(v) for k, v in launch.labels.items()},
                  LABEL_DAEMON: self.daemon_label}  # fmt: skip
        body = job_manifest(spec, launch, node, labels)
        spec.log.parent.mkdir(parents=True, exist_ok=True)
        spec.log.touch()
        uid, gid = _user(launch.spec)
        started = time.perf_counter()
        await anyio.to_thread.run_sync(hand_over, launch.slot, uid, gid)
        handed = time.perf_counter() - started
        try:
            await api.create_job(body)
        except KubeError as exc:
            if exc.code == "unavailable":
                # The request may have landed before the connection broke: no Job may run on
                # in a slot that goes back to the pool.
                with anyio.CancelScope(shield=True):
                    try:
                        await api.delete_job(spec.name, grace=0, propagation="Background")
                    except KubeError:
                        log.warning("kubernetes_job_maybe_left", job=spec.name)
            await self.give_back(launch.slot)
            raise
        log.info("kubernetes_job_created", job=spec.name, namespace=api.namespace, node=node,
                 image=launch.spec.image, hand_over_ms=round(handed * 1000, 1))  # fmt: skip
        return KubeRun(self, api, spec.name, launch.slot, spec.log)

    async def give_back(self, slot: str) -> None:
        if os.path.isdir(slot):
            await anyio.to_thread.run_sync(hand_over, slot, os.getuid(), os.getgid())

    async def adopt(self, name: str, spec: KubernetesSpec, slot: str, log_path: Path) -> KubeRun:
        """Watch again the Job of an attempt that ran while the daemon was down: a running one
        to its end, a finished one for its result; one that is gone ends the attempt as lost.
        An API that is away for now is waited for, like any watch."""
        return KubeRun(self, await self.api(spec), name, slot, log_path)

    async def sweep(self, specs: list[KubernetesSpec], keep: set[str]) -> list[str]:
        """Delete every unfinished Job of this daemon that no running attempt claims (finished
        ones are left to ``ttlSecondsAfterFinished``)."""
        deleted: list[str] = []
        seen: set[tuple[Any, ...]] = set()
        for spec in specs:
            try:
                api = await self.api(spec)
                if (api.where, api.namespace) in seen:
                    continue
                seen.add((api.where, api.namespace))
                for job in await api.list_jobs(f"{LABEL_DAEMON}={self.daemon_label}"):
                    name = job["metadata"]["name"]
                    status = job.get("status") or {}
                    finished = status.get("succeeded") or status.get("failed") or _job_failure(job)
                    if name not in keep and not finished:
                        await api.delete_job(name, grace=None)
                        deleted.append(name)
            except KubeError as exc:
                log.warning("kubernetes_sweep_failed", error=exc.message)
        if deleted:
            log.warning("orphan_jobs_deleted", jobs=deleted)
        return deleted


def _connection_key(spec: KubernetesSpec) -> KubernetesSpec:
    """Profiles that reach the same API the same way share one client."""
    return KubernetesSpec(image="", namespace=spec.namespace, kubeconfig=spec.kubeconfig)
