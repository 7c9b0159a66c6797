"""A FAKE Kubernetes API server and kubelet, for the ``kubernetes`` launcher's tests.

No API server can be had on the machines these tests run on (docs/kubernetes.md). This fake
serves exactly what the launcher uses, over plain HTTP on loopback, with a bearer token:

- Jobs (batch/v1): create, get, list by label selector, delete (with ``propagationPolicy`` and
  ``gracePeriodSeconds``); ``activeDeadlineSeconds`` is enforced; status conditions as a real
  Job controller sets them with ``backoffLimit: 0``;
- Pods (v1): list by label selector and the watch stream (``watch=true`` from a resource
  version, JSON lines, ``timeoutSeconds``), and ``log`` with ``follow`` and ``sinceSeconds``.

Its "kubelet" runs each Job's one pod as a process on this machine, not in a container: the
image is ignored, hostPath volumes are the host paths themselves (so paths under a volume's
``mountPath`` in the command, the working directory and the environment are rewritten to the
host path), and it runs as the test's own user: ``runAsUser``, read-only mounts and resource
limits are checked in the Job the launcher sent, not enforced (the container launcher's tests
show those boundaries with a real engine). Faults on demand: ``forbid`` (403 for a
verb), ``down()`` / ``up()`` (connection refused), an image named ``invalid:`` (the pod waits
with ``InvalidImageName``).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import ClientConnectionResetError, web

TOKEN = "fake-token-" + secrets.token_hex(4)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _matches(labels: dict[str, str], selector: str | None) -> bool:
    for term in filter(None, (selector or "").split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


def _status(code: int, reason: str, message: str) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason,
            "code": code}  # fmt: skip
    return web.json_response(body, status=code)


@dataclass
class FakePod:
    obj: dict[str, Any]
    job: str
    log: list[tuple[float, bytes]] = field(default_factory=list)
    process: asyncio.subprocess.Process | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    killing: bool = False


class FakeCluster:
    """See the module docstring. Runs its own event loop in a thread; its methods are thread-safe."""

    def __init__(self, root: Path, namespace: str = "ci", node: str = "node-1") -> None:
        self.root = root
        self.namespace = namespace
        self.node = node
        self.forbid: set[str] = set()
        self.is_down = False
        self.jobs: dict[str, dict[str, Any]] = {}
        self.pods: dict[str, FakePod] = {}
        self.history: list[tuple[int, str, dict[str, Any]]] = []
        self.rv = 1
        self.requests: list[tuple[str, str]] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="k8sfake", daemon=True)
        self._changed: asyncio.Condition | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.kubeconfig = root / "kubeconfig"

    # --- life ------------------------------------------------------------------------------------

    def __enter__(self) -> FakeCluster:
        self._thread.start()
        self._run(self._start())
        self.kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}],
            "users": [{"name": "fake", "user": {"token": TOKEN}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake",
                                                      "namespace": self.namespace}}],
        }))  # fmt: skip
        return self

    def __exit__(self, *exc: object) -> None:
        self._run(self._stop_all())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _run(self, coro: Any, timeout: float = 30) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)

    async def _start(self) -> None:
        self._changed = asyncio.Condition()
        app = web.Application()
        base = "/apis/batch/v1/namespaces/{ns}/jobs"
        app.router.add_post(base, self._create_job)
        app.router.add_get(base, self._list_jobs)
        app.router.add_get(base + "/{name}", self._get_job)
        app.router.add_delete(base + "/{name}", self._delete_job)
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self._list_pods)
        app.router.add_get("/api/v1/namespaces/{ns}/pods/{name}/log", self._pod_log)
        app.middlewares.append(self._guard)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        await self._listen()

    async def _listen(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()
        if not self.port:
            self.port = self._runner.addresses[0][1]

    def down(self) -> None:
        """The API server goes away: connections are refused until ``up()``."""

        async def stop() -> None:
            assert self._site is not None
            self.is_down = True
            await self._site.stop()
            assert self._changed is not None
            async with self._changed:
                self._changed.notify_all()  # open watches end with the server

        self._run(stop())

    def up(self) -> None:
        self._run(self._listen())
        self.is_down = False

    async def _stop_all(self) -> None:
        for pod in list(self.pods.values()):
            if pod.process is not None and pod.process.returncode is None:
                _signal(pod.process.pid, signal.SIGKILL)
                await pod.ended.wait()
        if self._runner is not None:
            await self._runner.cleanup()

    # --- what tests look at ---------------------------------------------------------------------

    def job_names(self, *, running_only: bool = False) -> list[str]:
        def running(name: str) -> bool:
            return any(p.job == name and not p.ended.is_set() for p in self.pods.values())

        return sorted(n for n in list(self.jobs) if not running_only or running(n))

    def job(self, name: str) -> dict[str, Any] | None:
        found = self.jobs.get(name)
        return json.loads(json.dumps(found)) if found else None

    def running_pids(self) -> list[int]:
        return [p.process.pid for p in list(self.pods.values()) if p.process and p.process.returncode is None]

    # --- the API ---------------------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        verb = {"POST": "create", "DELETE": "delete"}.get(request.method, "get")
        if request.query.get("watch") in ("true", "1", "True"):
            verb = "watch"
        self.requests.append((verb, request.path))
        if self.is_down and request.transport is not None:
            request.transport.abort()  # a kept-alive connection to a server that has gone away
            return web.Response(status=503)
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return _status(401, "Unauthorized", "Unauthorized")
        if request.match_info.get("ns") != self.namespace:
            return _status(404, "NotFound", f'namespaces "{request.match_info.get("ns")}" not found')
        if verb in self.forbid:
            resource = "jobs.batch" if "/jobs" in request.path else "pods"
            return _status(403, "Forbidden", f'{resource} is forbidden: User "system:serviceaccount:necrod:'
                           f'necrod" cannot {verb} resource in namespace "{self.namespace}"')  # fmt: skip
        try:
            response: web.StreamResponse = await handler(request)
        except (ClientConnectionResetError, ConnectionResetError):
            # The client went away mid-stream (a watch or a log follow it no longer needs).
            return web.Response(status=499)
        return response

    def _bump(self, obj: dict[str, Any]) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)

    async def _pod_event(self, kind: str, pod: dict[str, Any]) -> None:
        self._bump(pod)
        self.history.append((self.rv, kind, json.loads(json.dumps(pod))))
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    async def _create_job(self, request: web.Request) -> web.Response:
        body = await request.json()
        name = body.get("metadata", {}).get("name", "")
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", name):
            return _status(422, "Invalid", f'Job.batch "{name}" is invalid: metadata.name')
        if name in self.jobs:
            return _status(409, "AlreadyExists", f'jobs.batch "{name}" already exists')
        template = body["spec"]["template"]
        uid = secrets.token_hex(8)
        job = {**body, "metadata": {**body["metadata"], "namespace": self.namespace, "uid": uid,
                                    "creationTimestamp": _now()},
               "status": {"active": 1, "startTime": _now()}}  # fmt: skip
        self._bump(job)
        self.jobs[name] = job
        pod_name = f"{name}-{secrets.token_hex(3)[:5]}"
        labels = {**template["metadata"].get("labels", {}), "job-name": name,
                  "batch.kubernetes.io/job-name": name, "controller-uid": uid}  # fmt: skip
        container = template["spec"]["containers"][0]
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": pod_name, "namespace": self.namespace, "labels": labels, "uid": secrets.token_hex(8)},
               "spec": template["spec"],
               "status": {"phase": "Pending", "containerStatuses": [{
                   "name": container["name"], "image": container["image"], "imageID": "", "ready": False,
                   "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}}]}}  # fmt: skip
        fake = FakePod(pod, name)
        self.pods[pod_name] = fake
        await self._pod_event("ADDED", pod)
        asyncio.get_running_loop().create_task(self._kubelet(fake, body["spec"].get("activeDeadlineSeconds")))
        return web.json_response(job, status=201)

    async def _get_job(self, request: web.Request) -> web.Response:
        job = self.jobs.get(request.match_info["name"])
        if job is None:
            return _status(404, "NotFound", f'jobs.batch "{request.match_info["name"]}" not found')
        return web.json_response(job)

    async def _list_jobs(self, request: web.Request) -> web.Response:
        selector = request.query.get("labelSelector")
        items = [j for j in self.jobs.values() if _matches(j["metadata"].get("labels", {}), selector)]
        return web.json_response({"kind": "JobList", "apiVersion": "batch/v1",
                                  "metadata": {"resourceVersion": str(self.rv)}, "items": items})  # fmt: skip

    async def _delete_job(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        job = self.jobs.get(name)
        if job is None:
            return _status(404, "NotFound", f'jobs.batch "{name}" not found')
        try:
            options = await request.json() if request.can_read_body else {}
        except ValueError:
            options = {}
        grace = request.query.get("gracePeriodSeconds", options.get("gracePeriodSeconds"))
        asyncio.get_running_loop().create_task(self._remove(name, None if grace is None else int(grace)))
        return web.json_response({**job, "metadata": {**job["metadata"], "deletionTimestamp": _now()}})

    async def _remove(self, name: str, grace: int | None) -> None:
        for pod in [p for p in self.pods.values() if p.job == name]:
            await self._kill(pod, grace)
            self.pods.pop(pod.obj["metadata"]["name"], None)
            await self._pod_event("DELETED", pod.obj)
        self.jobs.pop(name, None)

    async def _kill(self, pod: FakePod, grace: int | None) -> None:
        if grace is None:
            grace = int(pod.obj["spec"].get("terminationGracePeriodSeconds", 30))
        if pod.process is None or pod.ended.is_set():
            return
        pod.killing = True
        _signal(pod.process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(pod.ended.wait(), grace)
        except TimeoutError:
            _signal(pod.process.pid, signal.SIGKILL)
            await pod.ended.wait()

    async def _list_pods(self, request: web.Request) -> web.StreamResponse:
        selector = request.query.get("labelSelector")
        if request.query.get("watch") not in ("true", "1", "True"):
            items = [p.obj for p in self.pods.values() if _matches(p.obj["metadata"]["labels"], selector)]
            return web.json_response({"kind": "PodList", "apiVersion": "v1",
                                      "metadata": {"resourceVersion": str(self.rv)}, "items": items})  # fmt: skip
        since = int(request.query.get("resourceVersion") or self.rv)
        deadline = time.monotonic() + float(request.query.get("timeoutSeconds", 1800))
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        assert self._changed is not None
        while time.monotonic() < deadline:
            for rv, kind, obj in [h for h in self.history if h[0] > since]:
                since = rv
                if _matches(obj["metadata"]["labels"], selector):
                    await response.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
            if self.is_down:
                break
            async with self._changed:
                try:
                    await asyncio.wait_for(self._changed.wait(), max(0.01, deadline - time.monotonic()))
                except TimeoutError:
                    break
        await response.write_eof()
        return response

    async def _pod_log(self, request: web.Request) -> web.StreamResponse:
        pod = self.pods.get(request.match_info["name"])
        if pod is None:
            return _status(404, "NotFound", f'pods "{request.match_info["name"]}" not found')
        since = request.query.get("sinceSeconds")
        after = time.time() - int(since) if since else 0.0
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        sent = 0
        while True:
            chunks = pod.log[sent:]
            sent += len(chunks)
            for at, data in chunks:
                if at >= after:
                    await response.write(data)
            if (pod.ended.is_set() and sent == len(pod.log)) or self.is_down:
                break
            if request.query.get("follow") not in ("true", "1", "True"):
                break
            await asyncio.sleep(0.05)
        await response.write_eof()
        return response

    # --- the kubelet ------------------------------------------------------------------------------

    async def _set_state(self, pod: FakePod, state: dict[str, Any], phase: str) -> None:
        status = pod.obj["status"]
        status["phase"] = phase
        status["containerStatuses"][0]["state"] = state
        status["containerStatuses"][0]["ready"] = "running" in state
        await self._pod_event("MODIFIED", pod.obj)

    async def _kubelet(self, pod: FakePod, deadline: int | None) -> None:
        spec = pod.obj["spec"]
        container = spec["containers"][0]
        await asyncio.sleep(0.05)
        if container["image"].startswith("invalid:"):
            await self._set_state(pod, {"waiting": {"reason": "InvalidImageName",
                                                    "message": f'Failed to apply default image tag "{container["image"]}"'}},
                                  "Pending")  # fmt: skip
            pod.ended.set()
            return
        mounts = _host_paths(spec)
        argv = [_on_host(a, mounts) for a in [*container.get("command", []), *container.get("args", [])]]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/",
               **{e["name"]: _on_host(e.get("value", ""), mounts) for e in container.get("env", [])}}  # fmt: skip
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, cwd=_on_host(container.get("workingDir", "/"), mounts), env=env,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            await self._set_state(pod, {"waiting": {"reason": "CreateContainerError", "message": str(exc)}},
                                  "Pending")  # fmt: skip
            pod.ended.set()
            return
        pod.process = process
        await self._set_state(pod, {"running": {"startedAt": _now()}}, "Running")
        expiry = asyncio.get_running_loop().call_later(
            deadline, lambda: asyncio.ensure_future(self._deadline(pod))) if deadline else None  # fmt: skip
        assert process.stdout is not None
        while chunk := await process.stdout.read(65536):
            pod.log.append((time.time(), chunk))
        code = await process.wait()
        if expiry is not None:
            expiry.cancel()
        exit_code = 128 - code if code < 0 else code
        reason = "Completed" if exit_code == 0 else "Error"
        await self._set_state(pod, {"terminated": {"exitCode": exit_code, "reason": reason, "finishedAt": _now()}},
                              "Succeeded" if exit_code == 0 else "Failed")  # fmt: skip
        pod.ended.set()
        job = self.jobs.get(pod.job)
        if job is not None and not pod.killing:
            condition = "Complete" if exit_code == 0 else "Failed"
            job["status"] = {"succeeded" if exit_code == 0 else "failed": 1, "completionTime": _now(),
                             "conditions": [{"type": condition, "status": "True",
                                             "reason": None if exit_code == 0 else "BackoffLimitExceeded",
                                             "message": None if exit_code == 0 else "Job has reached the specified backoff limit"}]}  # fmt: skip
            self._bump(job)

    async def _deadline(self, pod: FakePod) -> None:
        job = self.jobs.get(pod.job)
        await self._kill(pod, None)
        if job is not None:
            job["status"] = {"failed": 1, "conditions": [{"type": "Failed", "status": "True",
                             "reason": "DeadlineExceeded", "message": "Job was active longer than specified deadline"}]}  # fmt: skip
            self._bump(job)


def _signal(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _host_paths(spec: dict[str, Any]) -> list[tuple[str, str]]:
    """(mountPath, hostPath) of the pod's hostPath volumes, longest mount path first."""
    volumes = {v["name"]: v["hostPath"]["path"] for v in spec.get("volumes", []) if "hostPath" in v}
    pairs = [(m["mountPath"], volumes[m["name"]]) for m in spec["containers"][0].get("volumeMounts", [])
             if m["name"] in volumes]  # fmt: skip
    return sorted(pairs, key=lambda p: -len(p[0]))


def _on_host(text: str, mounts: list[tuple[str, str]]) -> str:
    for inside, host in mounts:
        text = re.sub(rf"(?<![\w/.-]){re.escape(inside)}(?=$|[/\s\"';:])", host, text)
    return text


@dataclass
class Cluster:
    """What a scenario needs of a cluster, fake or live."""

    kubeconfig: Path
    namespace: str
    node: str
    image: str
    fake: FakeCluster | None

    def ours(self) -> list[str]:
        """Names of Jobs still running, for 'nothing outlives the test'."""
        if self.fake is not None:
            return self.fake.job_names(running_only=True)
        return []


def fake_cluster(root: Path) -> Iterator[Cluster]:
    with FakeCluster(root) as fake:
        yield Cluster(fake.kubeconfig, fake.namespace, fake.node, "busybox:fake", fake)
