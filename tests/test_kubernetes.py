"""The ``kubernetes`` launcher through a real daemon, against the FAKE API server of
``tests/k8sfake.py`` and, marked ``kubernetes_live``, against a real cluster.

No API server can be had where these tests usually run, so every scenario runs on the fake
(Jobs, Pods, watch and logs as the launcher uses them; pods are processes on this machine).
With ``NECROD_KUBE_LIVE=1`` and ``KUBECONFIG`` naming a cluster whose node is this machine
(kind with /tmp mounted, or k3s here), the scenarios that need no fault injection run live too
(docs/kubernetes.md). Fault injection (403, API down, a bad image) is fake-only.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from necrod.core.config import KubernetesSpec
from necrod.daemon.fleet import origin_id
from necrod.io.kubeapi import connect
from necrod.io.kubernetes import LABEL_DAEMON, label_value
from tests.helpers import Necrod, cleanup_dir, git, short_tmpdir, wait_for
from tests.k8sfake import Cluster, fake_cluster

FINISHED = ("succeeded", "failed", "cancelled")
LIVE = os.environ.get("NECROD_KUBE_LIVE") == "1"
#: The pod's uid: handing the slot to another uid needs root; otherwise our own (never root).
USER = "1000:100" if os.getuid() == 0 else f"{os.getuid()}:{os.getgid()}"


def _live_cluster() -> Iterator[Cluster]:
    if not LIVE or not os.environ.get("KUBECONFIG"):
        pytest.skip("live Kubernetes suite: set NECROD_KUBE_LIVE=1 and KUBECONFIG (docs/kubernetes.md)")
    node = os.environ.get("NECROD_KUBE_NODE")
    if not node:
        pytest.skip("live Kubernetes suite: set NECROD_KUBE_NODE to the node that is this machine")
    yield Cluster(Path(os.environ["KUBECONFIG"]), os.environ.get("NECROD_KUBE_NAMESPACE", "default"), node,
                  os.environ.get("NECROD_KUBE_IMAGE", "busybox:1.36"), None)  # fmt: skip


@pytest.fixture(params=["fake", pytest.param("live", marks=pytest.mark.kubernetes_live)])
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    if request.param == "live":
        yield from _live_cluster()
        return
    root = short_tmpdir()
    try:
        yield from fake_cluster(root)
    finally:
        cleanup_dir(root)


@pytest.fixture
def fake(cluster: Cluster) -> Cluster:
    """Scenarios that inject faults: the fake only."""
    if cluster.fake is None:
        pytest.skip("fault injection needs the fake API server")
    return cluster


def config(origin: Path, cluster: Cluster, *, kube: dict[str, Any] | None = None, **runner: Any) -> str:
    spec = {"image": cluster.image, "namespace": cluster.namespace, "node": cluster.node,
            "kubeconfig": str(cluster.kubeconfig), "user": USER, **(kube or {})}  # fmt: skip
    profile = {"launcher": "kubernetes", "max_concurrency": 2, "grace_s": 2, "lease_ttl_s": 60,
               "kubernetes": spec, **runner}  # fmt: skip
    return (
        "pools:\n"
        f'  repo: {{"repo_url": "{origin}", "slots": 2, "max_slots": 2, "min_idle": 0, "isolation": "shared-clone"}}\n'
        f"runners:\n  k8s: {json.dumps(profile)}\n"
        'dispatcher: {"max_running": 4, "retry_backoff_s": 0}\n'
    )


@pytest.fixture
def daemon(necrod_factory: Callable[..., Necrod], origin: Path, cluster: Cluster) -> Iterator[Necrod]:
    d = necrod_factory(config(origin, cluster))
    yield d
    d.stop()
    assert cluster.ours() == [], "a Job outlived its task"


def submit(d: Necrod, command: str, **kw: Any) -> str:
    return str(
        d.call("tasks.submit", {"pool": "repo", "runner": "k8s", "command": ["sh", "-c", command], **kw})[
            "task_id"
        ]
    )


def task(d: Necrod, task_id: str) -> dict[str, Any]:
    return d.call("tasks.get", {"task_id": task_id})  # type: ignore[no-any-return]


def finished(d: Necrod, task_id: str, timeout: float = 60) -> dict[str, Any]:
    return wait_for(lambda: (t := task(d, task_id))["state"] in FINISHED and t,  # type: ignore[no-any-return]
                    timeout, what=f"task {task_id} to finish")  # fmt: skip


def running(d: Necrod, task_id: str, cluster: Cluster) -> dict[str, Any]:
    """The task once its pod is running (its log says so)."""

    def up() -> dict[str, Any] | None:
        t = task(d, task_id)
        return t if t["attempts"] and "STARTED" in log_of(t) else None

    return wait_for(up, 60, what=f"task {task_id} to run")  # type: ignore[no-any-return]


def log_of(t: dict[str, Any]) -> str:
    try:
        return Path(t["attempts"][-1]["log"]).read_text()
    except (OSError, KeyError, IndexError):
        return ""


def slots_clean(d: Necrod) -> None:
    wait_for(lambda: all(s["state"] == "available" for s in d.call("slots.list")["slots"]), 30,
             what="every slot available again")  # fmt: skip
    for s in d.call("slots.list")["slots"]:
        path = Path(s["path"])
        assert git(path, "status", "--porcelain", "--ignored") == "", s
        assert {p.stat().st_uid for p in [path, *path.rglob("*")]} == {os.getuid()}, s


def test_a_task_runs_as_a_job_pinned_to_the_node_and_its_result_is_the_pods(
    daemon: Necrod, cluster: Cluster
) -> None:
    mirror = daemon.call("pools.list")["pools"][0]["mirror"]
    script = ("echo STARTED; echo hello from $NECROD_TASK_ID; pwd; echo mine > $NECROD_SLOT_PATH/mine.txt; "
              "git -C /workspace rev-parse HEAD 2>/dev/null || true; test -S $NECROD_SOCKET && echo SOCKET-THERE")  # fmt: skip
    done = finished(daemon, submit(daemon, script))
    out = log_of(done)
    attempt = done["attempts"][-1]
    assert done["state"] == "succeeded" and attempt["exit_code"] == 0, (done, out)
    assert f"hello from {done['task_id']}" in out and "SOCKET-THERE" in out, out
    slots_clean(daemon)
    if cluster.fake is None:
        return
    job = cluster.fake.job(f"necro-{done['task_id']}-1")
    assert job is not None, "finished Jobs are left to ttlSecondsAfterFinished"
    labels = job["metadata"]["labels"]
    assert labels["necrod.task"] == done["task_id"] and labels["necrod.attempt"] == "1"
    assert labels[LABEL_DAEMON] == label_value(origin_id(daemon.state_dir))
    spec = job["spec"]
    assert spec["backoffLimit"] == 0 and spec["ttlSecondsAfterFinished"] == 600
    pod = spec["template"]["spec"]
    assert pod["nodeName"] == cluster.node and pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsUser"] == int(USER.split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v["hostPath"] for v in pod["volumes"]}
    assert mounts["slot"]["mountPath"] == "/workspace" and volumes["slot"]["path"] == attempt["path"]
    assert mounts["mirror"] == {"name": "mirror", "mountPath": mirror, "readOnly": True}
    assert volumes["necrod-socket"] == {"path": str(daemon.socket.parent), "type": "Directory"}
    assert mounts["necrod-socket"] == {"name": "necrod-socket", "mountPath": "/run/necrod", "readOnly": True}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["NECROD_SLOT_PATH"] == "/workspace" and env["NECROD_SOCKET"] == "/run/necrod/necrod.sock"
    assert env["NECROD_LEASE_ID"] == attempt["lease_id"] and "PATH" not in env


def test_a_failure_is_retried_as_a_new_job_and_its_work_salvaged(daemon: Necrod, cluster: Cluster) -> None:
    script = 'echo STARTED; echo work > wip.txt; [ "$NECROD_ATTEMPT" -ge 2 ] || exit 3; echo second try'
    done = finished(daemon, submit(daemon, script, max_retries=2))
    first, second = done["attempts"]
    assert done["state"] == "succeeded", done
    assert (first["outcome"], first["exit_code"]) == ("failed", 3) and second["exit_code"] == 0, done
    assert "second try" in Path(second["log"]).read_text()
    slots_clean(daemon)  # salvage happens on the way back to available
    shown = daemon.call("salvage.show", {"lease_id": first["lease_id"]})
    assert "wip.txt" in {f["path"] for f in shown["files"]}
    if cluster.fake is not None:
        assert cluster.fake.job_names() == [f"necro-{done['task_id']}-1", f"necro-{done['task_id']}-2"]


def test_a_timeout_and_a_cancel_delete_the_job_within_the_grace(daemon: Necrod, cluster: Cluster) -> None:
    slow = submit(daemon, "echo STARTED; exec sleep 60", timeout_s=2, max_retries=0)
    cancelled = submit(
        daemon, "trap 'echo TERM; exit 143' TERM; echo STARTED; sleep 60 & wait", max_retries=0
    )
    running(daemon, cancelled, cluster)
    asked = time.monotonic()
    daemon.call("tasks.cancel", {"task_id": cancelled})
    gone = finished(daemon, cancelled, timeout=20)
    assert gone["state"] == "cancelled" and time.monotonic() - asked < 2 + 8, gone
    assert "TERM" in log_of(gone), "the pod got SIGTERM first, then its grace"
    timed_out = finished(daemon, slow, timeout=30)
    assert timed_out["state"] == "failed" and timed_out["attempts"][-1]["outcome"] == "timeout", timed_out
    if cluster.fake is not None:
        wait_for(lambda: cluster.fake.job_names() == [] and not cluster.fake.running_pids(), 10,  # type: ignore[union-attr]
                 what="both Jobs deleted with their pods")  # fmt: skip
    slots_clean(daemon)


def test_heartbeats_from_the_pod_keep_the_lease_and_silence_loses_it(
    necrod_factory: Callable[..., Necrod], origin: Path, fake: Cluster
) -> None:
    d = necrod_factory(config(origin, fake, lease_ttl_s=2, grace_s=1))
    beat = f"{sys.executable} -m necrod.ctl.main heartbeat $NECROD_LEASE_ID >/dev/null"
    kept = finished(d, submit(d, f"echo STARTED; for i in 1 2 3 4 5; do {beat}; sleep 1; done; echo kept"))
    assert kept["state"] == "succeeded" and "kept" in log_of(kept), (kept, log_of(kept))
    silent = finished(d, submit(d, '[ "$NECROD_ATTEMPT" -ge 2 ] && exit 0; echo STARTED; exec sleep 60',
                                max_retries=1), timeout=40)  # fmt: skip
    first = silent["attempts"][0]
    assert silent["state"] == "succeeded" and first["outcome"] == "lease_lost", silent
    assert fake.fake is not None and fake.fake.job(f"necro-{silent['task_id']}-1") is None, "deleted"


def test_a_restarted_daemon_adopts_running_jobs_reconciles_finished_ones_and_deletes_orphans(
    necrod_factory: Callable[..., Necrod], origin: Path, cluster: Cluster
) -> None:
    d = necrod_factory(config(origin, cluster))
    long = submit(d, "echo STARTED; sleep 4; echo still here; exit 0")
    short = submit(d, "echo STARTED; exit 4", max_retries=0)
    running(d, long, cluster)
    wait_for(lambda: task(d, short)["attempts"] and "STARTED" in log_of(task(d, short)), 30, what="short ran")
    d.kill9()
    time.sleep(0.5)
    if cluster.fake is not None:
        # A Job of this daemon that no attempt claims (as if created just before a crash).
        orphan = {"apiVersion": "batch/v1", "kind": "Job",
                  "metadata": {"name": "necro-t-999-1", "labels": {LABEL_DAEMON: label_value(origin_id(d.state_dir))}},
                  "spec": {"backoffLimit": 0, "template": {"metadata": {"labels": {"necrod.run": "necro-t-999-1"}},
                           "spec": {"restartPolicy": "Never", "containers": [
                               {"name": "runner", "image": "x", "command": ["sleep", "60"]}]}}}}  # fmt: skip
        _create(cluster, orphan)
    d.start()
    adopted = finished(d, long)
    assert adopted["state"] == "succeeded" and len(adopted["attempts"]) == 1, adopted
    assert "still here" in log_of(adopted)
    reconciled = finished(d, short)
    assert reconciled["state"] == "failed" and reconciled["attempts"][-1]["exit_code"] == 4, reconciled
    assert '"runner_adopted"' in d.log()
    if cluster.fake is not None:
        wait_for(lambda: "necro-t-999-1" not in cluster.fake.job_names(), 10, what="the orphan deleted")  # type: ignore[union-attr]
    slots_clean(d)
    d.stop()
    assert cluster.ours() == []


def _create(cluster: Cluster, body: dict[str, Any]) -> None:
    async def go() -> None:
        spec = KubernetesSpec(image="x", namespace=cluster.namespace, kubeconfig=str(cluster.kubeconfig))
        api = await connect(spec)
        try:
            await api.create_job(body)
        finally:
            await api.client.close()

    anyio.run(go)


def test_without_credentials_the_attempt_says_so(
    necrod_factory: Callable[..., Necrod], origin: Path, cluster: Cluster
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    d = necrod_factory(config(origin, cluster, kube={"kubeconfig": None}), env=env)
    failed = finished(d, submit(d, "echo never", max_retries=0))
    attempt = failed["attempts"][-1]
    assert failed["state"] == "failed" and attempt["outcome"] == "start_failed", failed
    assert "no Kubernetes credentials" in attempt["detail"] and "KUBECONFIG" in attempt["detail"], attempt
    assert "failed_precondition" in attempt["detail"]
    slots_clean(d)


def test_a_refusing_or_unreachable_api_fails_the_start_with_its_code(daemon: Necrod, fake: Cluster) -> None:
    assert fake.fake is not None
    fake.fake.forbid = {"create"}
    refused = finished(daemon, submit(daemon, "echo never", max_retries=0))
    detail = refused["attempts"][-1]["detail"]
    assert refused["attempts"][-1]["outcome"] == "start_failed" and "permission_denied" in detail, refused
    assert "forbidden" in detail
    fake.fake.forbid = set()
    fake.fake.down()
    try:
        down = finished(daemon, submit(daemon, "echo never", max_retries=0))
    finally:
        fake.fake.up()
    assert "unavailable" in (down["attempts"][-1]["detail"] or ""), down
    assert fake.fake.job_names() == []
    slots_clean(daemon)


def test_the_api_going_away_mid_run_does_not_lose_the_attempt(daemon: Necrod, fake: Cluster) -> None:
    assert fake.fake is not None
    t = submit(daemon, "echo STARTED; sleep 3; echo finished anyway; exit 5", max_retries=0)
    running(daemon, t, fake)
    fake.fake.down()
    time.sleep(4)
    fake.fake.up()
    done = finished(daemon, t, timeout=40)
    assert done["attempts"][-1]["exit_code"] == 5, done
    assert '"kubernetes_watch_failed"' in daemon.log()


def test_a_runner_that_cannot_be_stopped_keeps_its_slot_out_of_rotation(
    daemon: Necrod, fake: Cluster
) -> None:
    assert fake.fake is not None
    t = submit(daemon, "echo STARTED; exec sleep 60", max_retries=0)
    slot_id = running(daemon, t, fake)["attempts"][-1]["slot_id"]
    fake.fake.down()
    try:
        daemon.call("tasks.cancel", {"task_id": t})
        assert finished(daemon, t, timeout=40)["state"] == "cancelled"
        # The pod may still be writing in the slot: not cleaned, not handed out, kept for a look.
        slot = next(s for s in daemon.call("slots.list")["slots"] if s["slot_id"] == slot_id)
        assert slot["state"] == "error" and "could not be confirmed stopped" in slot["error"], slot
        assert fake.fake.running_pids(), "the pod runs on while the API is away"
    finally:
        fake.fake.up()
    # Once the API answers again the Job is deleted after all; an operator recovers the slot.
    wait_for(lambda: fake.fake.job_names() == [] and not fake.fake.running_pids(), 30,  # type: ignore[union-attr]
             what="the Job deleted once the API is back")  # fmt: skip
    daemon.call("slots.recover", {"slot_id": slot_id})
    daemon.wait_slots("repo", "available", 2)


def test_a_pod_that_can_never_start_ends_the_attempt(
    necrod_factory: Callable[..., Necrod], origin: Path, fake: Cluster
) -> None:
    d = necrod_factory(config(origin, fake, kube={"image": "invalid:Not An Image"}))
    failed = finished(d, submit(d, "echo never", max_retries=0))
    attempt = failed["attempts"][-1]
    assert attempt["outcome"] == "lost" and "InvalidImageName" in attempt["detail"], attempt
    assert fake.fake is not None
    wait_for(lambda: fake.fake.job_names() == [], 10, what="the stuck Job deleted")  # type: ignore[union-attr]
    slots_clean(d)


def test_a_worktree_pool_is_refused_for_kubernetes_runners(
    necrod_factory: Callable[..., Necrod], origin: Path, fake: Cluster
) -> None:
    d = necrod_factory(config(origin, fake).replace('"isolation": "shared-clone"', '"isolation": "worktree"'))
    failed = finished(d, submit(d, "echo never", max_retries=0))
    assert "isolation: shared-clone" in failed["attempts"][-1]["detail"], failed
    assert fake.fake is not None and fake.fake.job_names() == []
