"""The Kubernetes API calls the launcher makes, and where its credentials come from.

Credentials: the profile's ``kubeconfig``, else the in-cluster service account, else
``$KUBECONFIG``. Every API failure is a ``KubeError`` with a protocol code: ``failed_precondition``
(no credentials, no node), ``permission_denied`` (401/403), ``unavailable`` (unreachable, 5xx).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from kubernetes_asyncio import client, config

from necrod.core.config import KubernetesSpec

log = structlog.get_logger("necrod.kubernetes")

#: The runner's container in the Job's pod.
CONTAINER = "runner"
#: A watch is re-opened after this long: servers end them anyway, and a re-list catches anything missed.
WATCH_S = 60
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
CALL_TIMEOUT = aiohttp.ClientTimeout(sock_connect=10, sock_read=30)
WATCH_TIMEOUT = aiohttp.ClientTimeout(sock_connect=10, sock_read=WATCH_S + 15)
FOLLOW_TIMEOUT = aiohttp.ClientTimeout(sock_connect=10)


class KubeError(OSError):
    """The API could not be reached, refused, or there is no way to talk to it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message


def _refusal(status: int, body: bytes, what: str) -> KubeError:
    try:
        detail = json.loads(body).get("message") or body.decode(errors="replace")
    except (ValueError, AttributeError):
        detail = body.decode(errors="replace")[:300]
    code = {401: "permission_denied", 403: "permission_denied", 404: "not_found", 409: "already_exists",
            400: "invalid_params", 422: "invalid_params"}.get(status, "unavailable")  # fmt: skip
    return KubeError(code, f"the Kubernetes API refused to {what}: HTTP {status}: {detail}")


class Api:
    """The few calls the launcher makes, on raw JSON: no model objects, so the same dicts come
    from a real API server and from the test's fake."""

    def __init__(self, api: client.ApiClient, namespace: str, where: str) -> None:
        self.client = api
        self.namespace = namespace
        self.where = where
        self.batch = client.BatchV1Api(api)
        self.core = client.CoreV1Api(api)

    @staticmethod
    async def _open(method: Any, *args: Any, **kwargs: Any) -> aiohttp.ClientResponse:
        """The raw HTTP response of a generated API method (``_preload_content=False``)."""
        kwargs.setdefault("_request_timeout", CALL_TIMEOUT)
        resp: aiohttp.ClientResponse = await method(*args, _preload_content=False, **kwargs)
        return resp

    async def _call(self, what: str, method: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            resp = await self._open(method, *args, **kwargs)
            async with resp:
                body = await resp.read()
                if not 200 <= resp.status < 300:
                    raise _refusal(resp.status, body, what)
                return dict(json.loads(body))
        except KubeError:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            raise KubeError("unavailable", f"cannot reach the Kubernetes API at {self.where} to {what}: "
                            f"{exc or type(exc).__name__}") from None  # fmt: skip

    async def create_job(self, body: dict[str, Any]) -> dict[str, Any]:
        name = body["metadata"]["name"]
        return await self._call(f"create job {name}", self.batch.create_namespaced_job, self.namespace, body)

    async def read_job(self, name: str) -> dict[str, Any] | None:
        try:
            return await self._call(f"read job {name}", self.batch.read_namespaced_job, name, self.namespace)
        except KubeError as exc:
            if exc.code == "not_found":
                return None
            raise

    async def list_jobs(self, selector: str) -> list[dict[str, Any]]:
        found = await self._call("list jobs", self.batch.list_namespaced_job, self.namespace,
                                 label_selector=selector)  # fmt: skip
        return list(found.get("items") or [])

    async def delete_job(self, name: str, grace: float | None, propagation: str = "Foreground") -> None:
        kwargs: dict[str, Any] = {"propagation_policy": propagation}
        if grace is not None:
            kwargs["grace_period_seconds"] = max(1, round(grace))
        try:
            await self._call(f"delete job {name}", self.batch.delete_namespaced_job, name, self.namespace,
                             **kwargs)  # fmt: skip
        except KubeError as exc:
            if exc.code != "not_found":
                raise

    async def list_pods(self, selector: str) -> dict[str, Any]:
        return await self._call("list pods", self.core.list_namespaced_pod, self.namespace,
                                label_selector=selector)  # fmt: skip

    async def watch_pods(self, selector: str, since: str) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Pod events after resource version ``since``, until the server ends the watch."""
        try:
            resp = await self._open(
                self.core.list_namespaced_pod, self.namespace, label_selector=selector, watch=True,
                resource_version=since, timeout_seconds=WATCH_S, allow_watch_bookmarks=False,
                _request_timeout=WATCH_TIMEOUT,
            )  # fmt: skip
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise KubeError("unavailable", f"cannot watch pods at {self.where}: {exc}") from None
        async with resp:
            if resp.status != 200:
                raise _refusal(resp.status, await resp.read(), "watch pods")
            try:
                async for line in resp.content:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event.get("type") == "ERROR":
                        return  # typically 410 Gone: the caller lists again
                    yield event["type"], event["object"]
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("kubernetes_watch_broken", error=str(exc) or type(exc).__name__)

    async def follow_log(self, pod: str) -> aiohttp.ClientResponse:
        try:
            return await self._open(self.core.read_namespaced_pod_log, pod, self.namespace, container=CONTAINER,
                                    follow=True, _request_timeout=FOLLOW_TIMEOUT)  # fmt: skip
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise KubeError("unavailable", f"cannot read the log of pod {pod}: {exc}") from None


def _namespace(spec: KubernetesSpec, kube_namespace: str | None) -> str:
    if spec.namespace:
        return spec.namespace
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        return (SERVICE_ACCOUNT_DIR / "namespace").read_text().strip()
    except OSError:
        return kube_namespace or "default"


async def connect(spec: KubernetesSpec) -> Api:
    """An API client from the profile's kubeconfig, the pod's service account, or ``$KUBECONFIG``."""
    cfg = client.Configuration()
    kubeconfig = spec.kubeconfig or (None if _in_cluster() else os.environ.get("KUBECONFIG"))
    context_namespace = None
    try:
        if kubeconfig:
            path = kubeconfig.split(os.pathsep)[0]
            loader = await config.load_kube_config(config_file=path, client_configuration=cfg,
                                                   persist_config=False)  # fmt: skip
            context_namespace = (loader.current_context or {}).get("context", {}).get("namespace")
        elif _in_cluster():
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        else:
            raise KubeError("failed_precondition", "no Kubernetes credentials: not in a cluster (no service "
                            f"account token in {SERVICE_ACCOUNT_DIR}) and KUBECONFIG is not set")  # fmt: skip
    except config.ConfigException as exc:
        raise KubeError("failed_precondition", f"bad Kubernetes credentials ({kubeconfig or 'in-cluster'}): "
                        f"{exc}") from None  # fmt: skip
    except KubeError:
        raise
    except OSError as exc:
        raise KubeError("failed_precondition", f"cannot read the kubeconfig {kubeconfig}: {exc}") from None
    return Api(client.ApiClient(configuration=cfg), _namespace(spec, context_namespace), cfg.host or "?")


def _in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and (SERVICE_ACCOUNT_DIR / "token").exists()
