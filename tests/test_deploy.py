"""deploy/kubernetes: the manifests validate offline, and they agree with necrod itself.

No Kubernetes API server runs here. Each manifest is validated against the JSON schemas of the
newest Kubernetes release the installed ``kubernetes-validate`` ships, in strict mode (unknown
fields are errors); the ConfigMap's pools.yaml is loaded by necrod's own config loader; the
DaemonSet's probes (httpGet) and the annotated metrics path are fetched from a real necrod.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import shutil
import signal
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from necrod.core.config import Config, ConfigError, parse_config
from necrod.daemon.main import main as necrod_main
from tests.helpers import Necrod, pool_config, wait_for

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
CONTAINERFILE = ROOT / "deploy" / "Containerfile"
DOCS = ROOT / "docs" / "kubernetes.md"
#: The newest Kubernetes release the installed kubernetes-validate has schemas for.
K8S_VERSION = kubernetes_validate.latest_version()
K8S_MINOR = ".".join(K8S_VERSION.split(".")[:2])
#: The file kustomize reads; not a Kubernetes resource.
KUSTOMIZATION = "kustomization.yaml"
#: Kinds whose objects live in a namespace (the ones these manifests may use).
NAMESPACED = {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "DaemonSet", "Job", "Pod"}

MANIFESTS = sorted(p.name for p in KUBE.glob("*.yaml") if p.name != KUSTOMIZATION)


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def resources() -> list[dict[str, Any]]:
    return [doc for name in MANIFESTS for doc in documents(KUBE / name)]


def one(kind: str) -> dict[str, Any]:
    found = [r for r in resources() if r["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/kubernetes, found {len(found)}"
    return found[0]


def container() -> dict[str, Any]:
    containers = one("DaemonSet")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "the DaemonSet runs one container, necrod"
    return containers[0]  # type: ignore[no-any-return]


def argv() -> list[str]:
    c = container()
    return [*c.get("command", []), *c.get("args", [])]


def flag(name: str) -> str:
    args = argv()
    assert name in args, f"the necrod container is started without {name}: {args}"
    return args[args.index(name) + 1]


def pools_yaml() -> str:
    data = one("ConfigMap")["data"]
    assert "pools.yaml" in data, "the ConfigMap has no pools.yaml key"
    return data["pools.yaml"]  # type: ignore[no-any-return]


def config() -> Config:
    try:
        return parse_config(pools_yaml(), "deploy/kubernetes/configmap.yaml:pools.yaml")
    except ConfigError as exc:
        problem = str(exc)
    pytest.fail(f"necrod refuses the ConfigMap's pools.yaml: {problem}")


def validate(doc: dict[str, Any], where: str) -> None:
    """Strict validation; a failure names the file, the object, the field and the schema's message."""
    what = f"{where}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    try:
        version = kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        field = ".".join(str(p) for p in exc.path) or "(top)"
        problem = f"{what} is invalid for Kubernetes {exc.version} (strict): {field}: {exc.message}"
    except kubernetes_validate.SchemaNotFoundError as exc:
        problem = f"{what}: {exc.message}"
    else:
        assert version == K8S_MINOR
        return
    # Outside the except: the validator's own exception would drag the whole schema into the report.
    pytest.fail(problem)


def volume_mounts() -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in container().get("volumeMounts", [])}


def volumes() -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in one("DaemonSet")["spec"]["template"]["spec"]["volumes"]}


def host_path_volume(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The hostPath volume for node path ``path``, and its mount in the necrod container."""
    found = [v for v in volumes().values() if v.get("hostPath", {}).get("path") == path]
    assert len(found) == 1, f"expected one hostPath volume for {path}, found {len(found)}"
    mount = volume_mounts().get(found[0]["name"])
    assert mount is not None, f"the hostPath volume for {path} is not mounted in the necrod container"
    return found[0], mount


# --- offline validation -------------------------------------------------------------------------


def test_the_newest_schemas_are_the_ones_used() -> None:
    versions = kubernetes_validate.utils.all_versions()
    newest = max(versions, key=lambda v: tuple(int(x) for x in v.split(".")))
    assert newest == K8S_VERSION
    assert MANIFESTS, "deploy/kubernetes has no manifests"


@pytest.mark.parametrize("name", MANIFESTS)
def test_each_manifest_validates_strictly(name: str) -> None:
    docs = documents(KUBE / name)
    assert docs, f"{name} holds no object"
    for doc in docs:
        validate(doc, name)


def test_strict_validation_catches_what_a_typo_or_a_wrong_type_would_be() -> None:
    """The check above is not vacuous: an unknown field and a wrong type are refused."""
    daemonset = one("DaemonSet")
    validate(daemonset, "daemonset.yaml")
    typo = copy.deepcopy(daemonset)
    typo["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(kubernetes_validate.ValidationError, match="volumeMount"):
        kubernetes_validate.validate(typo, K8S_VERSION, strict=True)
    wrong = copy.deepcopy(daemonset)
    wrong["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "9464"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, K8S_VERSION, strict=True)


def test_the_kustomization_lists_exactly_the_files_of_the_directory() -> None:
    kustomization = documents(KUBE / KUSTOMIZATION)
    assert len(kustomization) == 1
    k = kustomization[0]
    assert k["kind"] == "Kustomization" and k["apiVersion"].startswith("kustomize.config.k8s.io/")
    listed = k["resources"]
    assert len(listed) == len(set(listed)), f"a resource is listed twice: {listed}"
    on_disk = {p.name for p in KUBE.iterdir() if p.name != KUSTOMIZATION}
    assert set(listed) == on_disk, (
        f"not listed: {sorted(on_disk - set(listed))}; listed but absent: {sorted(set(listed) - on_disk)}"
    )
    # Every object lives in the kustomization's namespace, which the manifests create.
    namespace = k["namespace"]
    assert namespace == "necrod"
    assert one("Namespace")["metadata"]["name"] == namespace
    for r in resources():
        if r["kind"] in NAMESPACED:
            assert r["metadata"].get("namespace") == namespace, f"{r['kind']}/{r['metadata']['name']}"
    # The image can be overridden: images: names the DaemonSet's image.
    image = container()["image"]
    image_name = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
    entries = {i["name"]: i for i in k["images"]}
    assert image_name in entries, f"kustomization images: has no entry for {image_name!r}"
    assert entries[image_name].get("newName") or entries[image_name].get("newTag")


@pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl (for `kubectl kustomize`) is not installed"
)
def test_kustomize_renders_valid_objects_with_the_image_override() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(KUBE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert sorted(r["kind"] for r in rendered) == sorted(r["kind"] for r in resources())
    for doc in rendered:
        validate(doc, "kubectl kustomize")
    entry = documents(KUBE / KUSTOMIZATION)[0]["images"][0]
    (daemonset,) = (r for r in rendered if r["kind"] == "DaemonSet")
    image = daemonset["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"{entry['newName']}:{entry['newTag']}"


# --- RBAC -----------------------------------------------------------------------------------------


def test_rbac_is_a_namespaced_role_for_jobs_pods_and_pod_logs_only() -> None:
    kinds = [r["kind"] for r in resources()]
    assert "ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds
    role = one("Role")
    namespace = role["metadata"]["namespace"]
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "nonResourceURLs" not in rule and "resourceNames" not in rule, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == {
        ("batch", "jobs"): {"create", "get", "list", "watch", "delete"},
        ("", "pods"): {"get", "list", "watch"},
        ("", "pods/log"): {"get"},
    }
    binding = one("RoleBinding")
    assert binding["metadata"]["namespace"] == namespace
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    account = one("ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": namespace}
    ]
    pod = one("DaemonSet")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert pod.get("automountServiceAccountToken", True) is True  # the launcher's credentials


# --- the ConfigMap's pools.yaml -------------------------------------------------------------------


def test_the_configmap_pools_yaml_loads_with_a_kubernetes_runner() -> None:
    cfg = config()
    k8s = {name: r for name, r in cfg.runners.items() if r.launcher == "kubernetes"}
    assert k8s, "the example config has no runner profile with launcher: kubernetes"
    raw = yaml.safe_load(pools_yaml())
    for name, runner in k8s.items():
        spec = runner.kubernetes
        assert spec is not None, f"runners.{name}: the loader kept no kubernetes: section"
        assert spec.image == raw["runners"][name]["kubernetes"]["image"]
        assert spec.user == raw["runners"][name]["kubernetes"]["user"]
        served = runner.pools or tuple(cfg.pools)
        assert served
        for pool in served:
            assert cfg.pools[pool].isolation == "shared-clone", (
                f"{pool}: kubernetes runners need shared-clone"
            )
    assert cfg.pools and all(p.repo_url.startswith("https://") for p in cfg.pools.values())


def test_the_configmap_pools_yaml_passes_necrod_check_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "pools.yaml"
    path.write_text(pools_yaml())
    status = necrod_main(["--check-config", str(path)])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert f"{path}: ok" in out


def test_the_socket_group_is_the_image_group_the_runner_runs_with() -> None:
    cfg = config()
    group = cfg.daemon.socket_group
    assert group is not None, "without daemon.socket_group only root could use the socket"
    m = re.search(r"groupadd\s+--gid\s+(\d+)\s+(\S+)", CONTAINERFILE.read_text(encoding="utf-8"))
    assert m is not None, "deploy/Containerfile creates no group with a fixed gid"
    gid, name = m.groups()
    assert name == group, f"socket_group {group!r} is not the group the image creates ({name!r})"
    for runner in cfg.runners.values():
        if runner.launcher == "kubernetes":
            assert runner.kubernetes is not None
            user = runner.kubernetes.user
            assert user.split(":")[1] == gid, f"runners.{runner.name} runs as {user}, not in group {gid}"


def test_the_image_installs_the_extras_the_configmap_runners_need() -> None:
    from necrod.io.contained import EXTRAS

    m = re.search(r"pip install [^\n]*'/src\[([a-z,]+)\]'", CONTAINERFILE.read_text(encoding="utf-8"))
    installed = set(m.group(1).split(",")) if m else set()
    for runner in config().runners.values():
        if runner.launcher in EXTRAS:
            extra = EXTRAS[runner.launcher][0]
            assert extra in installed, (
                f"runners.{runner.name} needs necrod[{extra}]; the image installs {installed}"
            )


# --- the DaemonSet --------------------------------------------------------------------------------


def test_pools_yaml_comes_from_the_configmap_mounted_as_a_directory() -> None:
    configmap = one("ConfigMap")
    (volume,) = (v for v in volumes().values() if "configMap" in v)
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    # items: would rename keys; pools.yaml must stay pools.yaml.
    for item in volume["configMap"].get("items", []):
        assert item["key"] != "pools.yaml" or item["path"] == "pools.yaml"
    mount = volume_mounts()[volume["name"]]
    assert "subPath" not in mount and "subPathExpr" not in mount, (
        "a subPath mount of a ConfigMap never sees updates: mount the directory"
    )
    assert mount.get("readOnly") is True
    assert flag("--config") == str(PurePosixPath(mount["mountPath"]) / "pools.yaml")


def test_the_state_directory_is_a_hostpath_at_the_same_path_as_on_the_node() -> None:
    state_dir = flag("--state-dir")
    volume, mount = host_path_volume(state_dir)
    assert mount["mountPath"] == volume["hostPath"]["path"] == state_dir
    assert volume["hostPath"]["type"] == "DirectoryOrCreate"
    assert not mount.get("readOnly")
    workspaces = config().daemon.workspaces
    assert workspaces is not None and PurePosixPath(workspaces).is_relative_to(state_dir), (
        f"daemon.workspaces {workspaces} is not on the {state_dir} hostPath"
    )


def test_the_socket_directory_is_a_hostpath_other_pods_can_mount() -> None:
    sock = PurePosixPath(flag("--socket"))
    volume, mount = host_path_volume(str(sock.parent))
    assert mount["mountPath"] == volume["hostPath"]["path"] == "/run/necrod"
    assert volume["hostPath"]["type"] == "DirectoryOrCreate"
    assert str(sock) == "/run/necrod/necrod.sock"  # where Job pods and docs/kubernetes.md look


def test_every_hostpath_is_mounted_at_its_own_path() -> None:
    mounts = volume_mounts()
    host_paths = [v for v in volumes().values() if "hostPath" in v]
    assert len(host_paths) == 2
    for v in host_paths:
        assert mounts[v["name"]]["mountPath"] == v["hostPath"]["path"], v["name"]


def test_the_node_and_namespace_come_from_the_downward_api() -> None:
    env = {e["name"]: e for e in container()["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


PROBE_PATHS = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}


def probe_get(kind: str) -> dict[str, Any]:
    probe = container()[kind]
    assert "httpGet" in probe, f"{kind} is not an httpGet probe (necrod serves /healthz and /readyz)"
    return probe["httpGet"]  # type: ignore[no-any-return]


def probe_port(kind: str) -> int:
    """The container port a probe's httpGet names (by name or number)."""
    port = probe_get(kind)["port"]
    if isinstance(port, int):
        return port
    named = {p.get("name"): p["containerPort"] for p in container()["ports"]}
    assert port in named, f"{kind} names port {port!r}, which the container does not declare"
    return int(named[port])


@pytest.mark.parametrize("kind", sorted(PROBE_PATHS))
def test_the_probes_are_http_gets_of_necrods_own_endpoint(kind: str) -> None:
    get = probe_get(kind)
    assert get["path"] == PROBE_PATHS[kind]
    assert get.get("scheme", "HTTP") == "HTTP"
    listen = config().daemon.metrics_listen
    assert listen is not None, "daemon.metrics_listen is not set: nothing would answer the probes"
    assert probe_port(kind) == listen[1]
    # /readyz asks the daemon's socket and its state store at once, each given 5 s to answer.
    assert container()[kind]["timeoutSeconds"] >= (6 if kind == "readinessProbe" else 2)


def test_resources_security_and_rollout() -> None:
    c = container()
    requests, limits = c["resources"]["requests"], c["resources"]["limits"]
    assert requests["cpu"] and requests["memory"] and limits["memory"]
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and not sc.get("privileged")
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"].get("add", [])) <= {"CHOWN", "DAC_OVERRIDE", "FOWNER"}
    if sc.get("readOnlyRootFilesystem"):
        tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert tmp and "emptyDir" in volumes()[tmp[0]["name"]], "a read-only root needs a writable /tmp"
    spec = one("DaemonSet")["spec"]
    assert spec["updateStrategy"]["type"] == "RollingUpdate"
    # Two necrods cannot share the node's state directory: never surge.
    assert spec["updateStrategy"]["rollingUpdate"].get("maxSurge", 0) in (0, "0%")
    grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= 2 * config().daemon.shutdown_grace_s + 10


def test_prometheus_annotations_match_the_declared_port_and_necrods_metrics_listen() -> None:
    annotations = one("DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    ports = {p["containerPort"] for p in container()["ports"]}
    assert int(annotations["prometheus.io/port"]) in ports
    assert annotations["prometheus.io/path"] == "/metrics"
    listen = config().daemon.metrics_listen
    assert listen is not None, "daemon.metrics_listen is not set: necrod would serve no metrics"
    host, port = listen
    assert port == int(annotations["prometheus.io/port"])
    assert host in ("0.0.0.0", "::"), f"metrics on {host} cannot be reached at the pod's IP"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str, timeout: float = 15.0) -> tuple[int, bytes]:
    """GET ``path`` as the kubelet does: the status and the body."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as reply:
            return int(reply.status), reply.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def test_the_annotated_metrics_path_and_the_probe_paths_are_what_necrod_serves(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    annotated = one("DaemonSet")["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]
    port = free_port()
    necrod_factory(f"daemon:\n  metrics_listen: 127.0.0.1:{port}\n" + pool_config({"repo": origin}, slots=1))
    status, body = http_get(port, annotated)
    assert status == 200 and b"# TYPE necrod_" in body
    for kind in PROBE_PATHS:
        assert http_get(port, probe_get(kind)["path"])[0] == 200, kind
    assert http_get(port, "/")[0] == 404


def test_the_probes_tell_alive_from_ready_against_a_real_necrod(
    necrod_factory: Callable[..., Necrod], origin: Path
) -> None:
    port = free_port()
    # A runner that shrugs off SIGTERM: cancelling it waits its grace_s, and that call in flight
    # holds the daemon's stop open (daemon.shutdown_grace_s) long enough to look. (Runners
    # themselves outlive a stop, issue 19: the stop does not wait for them.)
    stubborn = '    stubborn:\n      command: ["sh", "-c", "trap \\"\\" TERM; echo up; sleep 60"]\n      grace_s: 6\n'
    d = necrod_factory(f"daemon:\n  metrics_listen: 127.0.0.1:{port}\n"
                       + pool_config({"repo": origin}, slots=1, min_idle=0) + "runners:\n" + stubborn)  # fmt: skip
    assert d.proc is not None and d.config_path is not None

    def results() -> dict[str, int]:
        out = {}
        for kind in PROBE_PATHS:
            try:
                out[kind] = http_get(port, probe_get(kind)["path"], timeout=5)[0]
            except OSError:
                out[kind] = 0  # nothing answers
        return out

    assert results() == {"startupProbe": 200, "livenessProbe": 200, "readinessProbe": 200}
    # Degraded (a rejected config): alive and still ready; the body says why it is degraded.
    good = d.config_path.read_text()
    d.config_path.write_text("pools: [\n")
    wait_for(lambda: d.call("daemon.status")["state"] == "degraded", 20, what="a degraded daemon")
    assert results() == {"startupProbe": 200, "livenessProbe": 200, "readinessProbe": 200}
    ready = json.loads(http_get(port, "/readyz")[1])
    assert ready["state"] == "degraded" and any("config rejected" in r for r in ready["degraded"]), ready
    d.config_path.write_text(good)
    wait_for(lambda: d.call("daemon.status")["state"] == "running", 20, what="the good config back")
    # Stopping: alive, no longer ready.
    task_id = d.call("tasks.submit", {"pool": "repo", "runner": "stubborn"})["task_id"]
    wait_for(lambda: "up" in d.call("tasks.logs", {"task_id": task_id})["data"], 20, what="the runner")

    def cancel() -> None:
        with contextlib.suppress(Exception):  # answered, or cut off by the stop: either will do
            d.call("tasks.cancel", {"task_id": task_id, "reason": "holds the stop open"})

    cancelling = threading.Thread(target=cancel, daemon=True)
    cancelling.start()
    wait_for(lambda: d.call("tasks.get", {"task_id": task_id}).get("cancel_reason"), 10, what="the cancel")
    d.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: results()["readinessProbe"] == 503, 5, what="not ready while stopping")
    assert results()["livenessProbe"] == 200
    reasons = json.loads(http_get(port, "/readyz")[1])["reasons"]
    assert any(r.startswith("stopping") for r in reasons), reasons
    # Gone: neither alive nor ready.
    assert d.proc.wait(30) == 0
    cancelling.join(30)
    assert all(code == 0 for code in results().values()), results()


# --- docs/kubernetes.md ---------------------------------------------------------------------------


def doc_manifests() -> list[dict[str, Any]]:
    blocks = re.findall(r"```yaml\n(.*?)```", DOCS.read_text(encoding="utf-8"), flags=re.DOTALL)
    found = []
    for block in blocks:
        for doc in yaml.safe_load_all(block):
            if not (isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc):
                continue
            # Not Kubernetes objects: kind's cluster config, kustomize's file.
            if not doc["apiVersion"].split("/")[0].endswith(("x-k8s.io", "kustomize.config.k8s.io")):
                found.append(doc)
    return found


def test_the_documented_job_with_necroctl_run_validates_and_mounts_what_it_needs() -> None:
    docs = doc_manifests()
    for doc in docs:
        validate(doc, "docs/kubernetes.md")
    jobs = [d for d in docs if d["kind"] == "Job"]
    assert jobs, "docs/kubernetes.md shows no Job"
    pod = jobs[0]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    command = [*c.get("command", []), *c.get("args", [])]
    assert command[:2] == ["necroctl", "run"] and "--pool" in command and "--" in command
    host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert "/run/necrod" in host.values(), "the Job does not mount the socket directory"
    for name, path in host.items():
        assert mounts[name] == path, f"{name}: the slot path must be the same in the pod as on the node"
    workspaces = config().daemon.workspaces
    assert any(PurePosixPath(p).is_relative_to(workspaces) for p in host.values()), (  # type: ignore[arg-type]
        "the Job mounts no slot directory"
    )
