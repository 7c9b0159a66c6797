"""The ``runners:`` (with their container and Kubernetes specs), ``hosts:`` and ``dispatcher:`` sections."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from yaml.nodes import Node

from necrod.core.config.model import (
    LAUNCHERS,
    MAX_LEASE_PORTS,
    WEEK_S,
    Config,
    ContainerSpec,
    DispatcherConfig,
    HostConfig,
    KubernetesSpec,
    PoolConfig,
    RunnerProfile,
)
from necrod.core.config.schema import (
    COMMAND_SCHEMA,
    MISSING,
    SIZE_SCHEMA,
    STRINGS_SCHEMA,
    Reader,
    Reported,
    Section,
    described,
    env_value,
    int_in,
    is_bool,
    is_str,
    mapping_of,
    mapping_schema,
    nullable,
    num_in,
    one_of,
    optional_num,
    parse_size,
    read_command,
    schema_of,
)
from necrod.core.sparse import SPARSE_SCHEMA, normalize, sparse_set_problem

_RUNNER_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "launcher": one_of(*LAUNCHERS),
    "max_concurrency": int_in(1, 10_000),
    "timeout_s": optional_num(0, 30 * 24 * 3600),
    "output_timeout_s": optional_num(0, 30 * 24 * 3600),
    "lease_ttl_s": num_in(1, WEEK_S),
    "grace_s": num_in(0, 3600),
    "cpu_limit": optional_num(0, 1024),
    "ports": int_in(0, MAX_LEASE_PORTS),
    "salvage": one_of("on-failure", "always"),
    "resume": one_of("base", "salvage"),
    "submitters": one_of("anyone", "admins"),
}


def read_runner(r: Reader, name: str, node: Node, pools: dict[str, PoolConfig]) -> RunnerProfile:
    sec = Section(r, node, f"runners.{name}")
    values: dict[str, Any] = {"name": name}
    values.update(sec.values(_RUNNER_CHECKS))
    item = sec.raw("command")
    if item is not None:
        values["command"] = read_command(r, item[1], f"runners.{name}.command")
    for key in ("skills", "pools"):
        item = sec.raw(key)
        if item is not None:
            values[key] = tuple(r.strings(item[1], f"runners.{name}.{key}"))
    item = sec.raw("sparse")
    if item is not None:
        entries = r.strings(item[1], f"runners.{name}.sparse")
        problem = sparse_set_problem(entries)
        if problem:
            raise r.error(item[1], f"runners.{name}.sparse: {problem}")
        values["sparse"] = normalize(entries)
    env = mapping_of(r, sec, "env", env_value)
    values["env"] = tuple((k, str(v)) for k, v in env.items())
    if sec.has("memory_limit"):
        node_ = sec.node_of("memory_limit")
        limit = sec.value("memory_limit")
        try:
            if limit is not MISSING:
                values["memory_limit"] = parse_size(limit)
        except ValueError as exc:
            r.report(node_, f"runners.{name}.memory_limit: {exc}")
    container = sec.raw("container")
    if container is not None:
        spec = r.attempt(lambda: _read_container(r, name, container[1]))
        if spec is not None:
            values["container"] = spec
    kubernetes = sec.raw("kubernetes")
    if kubernetes is not None:
        kspec = r.attempt(lambda: _read_kubernetes(r, name, kubernetes[1]))
        if kspec is not None:
            values["kubernetes"] = kspec
    for launcher in ("container", "kubernetes"):
        if values.get("launcher") == launcher and not sec.has(launcher):
            raise r.error(
                node, f"runners.{name}: launcher {launcher} needs a {launcher}: section with an image"
            )
    sec.finish([*_RUNNER_CHECKS, *RUNNER_EXTRA])
    return RunnerProfile(**values)


def _user_spec(v: Any) -> str | None:
    if not isinstance(v, str) or not re.fullmatch(r"\d+:\d+", v):
        return "must be uid:gid, numbers"
    return None


def _abs_path(v: Any) -> str | None:
    return is_str(v) or (None if str(v).startswith("/") and ":" not in v else "must be an absolute path")


described(_user_spec, {"type": "string", "pattern": r"^\d+:\d+$"})
described(_abs_path, {"type": "string", "pattern": "^/[^:]*$"})


_CONTAINER_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "image": is_str, "user": _user_spec, "workdir": _abs_path, "network": is_str,
    "cpus": optional_num(0, 1024), "pids_limit": nullable(int_in(16, 4_194_304)), "docker_host": is_str,
}  # fmt: skip
CONTAINER_EXTRA: dict[str, dict[str, Any]] = {"mounts": {"type": "array", "items": schema_of(_abs_path)}}


def _read_container(r: Reader, name: str, node: Node) -> ContainerSpec:
    sec = Section(r, node, f"runners.{name}.container")
    values: dict[str, Any] = sec.values(_CONTAINER_CHECKS)
    if not sec.has("image"):
        raise r.error(node, f"runners.{name}.container.image is required")
    item = sec.raw("mounts")
    if item is not None:
        mounts = r.strings(item[1], f"runners.{name}.container.mounts")
        for m in mounts:
            if _abs_path(m):
                raise r.error(item[1], f"runners.{name}.container.mounts: {m!r} must be an absolute path")
        values["mounts"] = tuple(mounts)
    sec.finish([*_CONTAINER_CHECKS, *CONTAINER_EXTRA])
    if "image" not in values:
        raise Reported  # its image was refused
    return ContainerSpec(**values)


def _dns_label(v: Any) -> str | None:
    if not isinstance(v, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", v):
        return "must be a Kubernetes name: lowercase letters, digits and '-', at most 63"
    return None


def _dns_subdomain(v: Any) -> str | None:
    if not isinstance(v, str) or len(v) > 253 or not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", v):
        return "must be a Kubernetes name: lowercase letters, digits, '-' and '.', at most 253"
    return None


described(_dns_label, {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"})
described(_dns_subdomain, {"type": "string", "maxLength": 253, "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"})
_or_null = nullable


_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")

_KUBERNETES_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "image": is_str, "namespace": _or_null(_dns_label), "node": _or_null(_dns_subdomain), "user": _user_spec,
    "workdir": _abs_path, "cpus": optional_num(0, 1024), "service_account": _or_null(_dns_subdomain),
    "image_pull_policy": one_of("Always", "IfNotPresent", "Never"),
    "ttl_after_finished_s": int_in(0, 365 * 24 * 3600), "kubeconfig": _or_null(is_str),
}  # fmt: skip
KUBERNETES_EXTRA: dict[str, dict[str, Any]] = {"labels": mapping_schema({"type": "string", "maxLength": 63})}


def _read_kubernetes(r: Reader, name: str, node: Node) -> KubernetesSpec:
    sec = Section(r, node, f"runners.{name}.kubernetes")
    values: dict[str, Any] = sec.values(_KUBERNETES_CHECKS)
    if not sec.has("image"):
        raise r.error(node, f"runners.{name}.kubernetes.image is required")

    def label_value(v: Any) -> str | None:
        ok = isinstance(v, str) and len(v) <= 63 and _LABEL_VALUE.fullmatch(v)
        return None if ok else "must be a Kubernetes label value: at most 63 letters, digits, '-', '_', '.'"

    labels = mapping_of(r, sec, "labels", label_value)
    values["labels"] = tuple((k, str(v)) for k, v in labels.items())
    sec.finish([*_KUBERNETES_CHECKS, *KUBERNETES_EXTRA])
    if "image" not in values:
        raise Reported  # its image was refused
    return KubernetesSpec(**values)


_DISPATCHER_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "policy": one_of("fifo", "priority", "skill", "fair-share"),
    "max_running": int_in(1, 100_000),
    "max_retries": int_in(0, 1000),
    "retry_backoff_s": num_in(0, 24 * 3600),
    "retry_backoff_max_s": num_in(0, 7 * 24 * 3600),
    "failure_strategy": one_of("continue", "stop-all", "retry"),
    "max_memory_percent": num_in(1, 100),
    "max_load_per_cpu": optional_num(0, 10_000),
    "keep_finished": int_in(0, 10_000_000),
    "logs": is_str,
    "run_locally": is_bool,
    "host_grace_s": num_in(1, 7 * 24 * 3600),
    "default_runner": is_str,
}


def _section_schema(checks: dict[str, Callable[[Any], str | None]], extra: dict[str, dict[str, Any]],
                    required: tuple[str, ...] = ()) -> dict[str, Any]:  # fmt: skip
    props = {k: schema_of(c) for k, c in checks.items()} | extra
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": props}
    if required:
        schema["required"] = list(required)
    return schema


#: A runner profile's keys that are not single values, with their JSON Schema.
RUNNER_EXTRA: dict[str, dict[str, Any]] = {
    "sparse": SPARSE_SCHEMA,
    "command": COMMAND_SCHEMA, "skills": STRINGS_SCHEMA, "pools": STRINGS_SCHEMA,
    "env": mapping_schema(schema_of(env_value)), "memory_limit": SIZE_SCHEMA,
    "container": _section_schema(_CONTAINER_CHECKS, CONTAINER_EXTRA, ("image",)),
    "kubernetes": _section_schema(_KUBERNETES_CHECKS, KUBERNETES_EXTRA, ("image",)),
}  # fmt: skip

_HOST_CHECKS: dict[str, Callable[[Any], str | None]] = {
    # Checked in full by read_host (the form of an ssh:// URL); the schema says as much as it can.
    "address": described(lambda v: is_str(v), {"type": "string", "pattern": "^ssh://"}),
    "key": is_str, "known_hosts": is_str, "accept_unknown_host_key": is_bool,
    "max_concurrency": int_in(1, 100_000), "workdir": is_str,
}  # fmt: skip
HOST_EXTRA: dict[str, dict[str, Any]] = {
    "pools": STRINGS_SCHEMA,
    "skills": STRINGS_SCHEMA,
    "labels": STRINGS_SCHEMA,
}
_FAIR_SHARE: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "properties": {"half_life_s": schema_of(num_in(1, 365 * 24 * 3600)), "key": {"enum": ["project", "label"]},
                   "weights": mapping_schema({"type": "number", "exclusiveMinimum": 0})},
}  # fmt: skip
DISPATCHER_EXTRA: dict[str, dict[str, Any]] = {
    "label_priority": mapping_schema(schema_of(int_in(-1_000_000, 1_000_000))), "fair_share": _FAIR_SHARE,
}  # fmt: skip


def runner_schema() -> dict[str, Any]:
    return _section_schema(_RUNNER_CHECKS, RUNNER_EXTRA)


def host_schema() -> dict[str, Any]:
    return _section_schema(_HOST_CHECKS, HOST_EXTRA, ("address", "pools"))


def dispatcher_schema() -> dict[str, Any]:
    return _section_schema(_DISPATCHER_CHECKS, DISPATCHER_EXTRA)


def read_host(r: Reader, name: str, node: Node) -> HostConfig:
    sec = Section(r, node, f"hosts.{name}")
    values: dict[str, Any] = {"name": name}
    values.update(sec.values(_HOST_CHECKS))
    address = values.get("address")
    if not sec.has("address"):
        raise r.error(
            node, f"hosts.{name}: address is required (ssh://[user@]host[:port][/path/to/necrod.sock])"
        )
    if address is not None and (
        not re.fullmatch(r"ssh://(?:[^@/\s]+@)?[A-Za-z0-9._\[\]:-]+(?::\d+)?(?:/\S*)?", address)
        or re.match(r"ssh://(?:[^@/]+@)?-", address)
    ):
        r.report(sec.node_of("address"), f"hosts.{name}.address must be ssh://[user@]host[:port][/socket]")
        address = values.pop("address")
    for key in ("pools", "skills", "labels"):
        item = sec.raw(key)
        if item is not None:
            values[key] = tuple(r.strings(item[1], f"hosts.{name}.{key}"))
    if not values.get("pools"):
        raise r.error(
            node, f"hosts.{name}: pools is required (the pools of that host's necrod to run tasks in)"
        )
    sec.finish([*_HOST_CHECKS, *HOST_EXTRA])
    if address is None:
        raise Reported  # its address was refused: no host to build
    return HostConfig(**values)


def read_dispatcher(r: Reader, node: Node) -> DispatcherConfig:
    sec = Section(r, node, "dispatcher")
    values: dict[str, Any] = sec.values(_DISPATCHER_CHECKS)
    rules = mapping_of(r, sec, "label_priority", int_in(-1_000_000, 1_000_000))
    values["label_priority"] = tuple(rules.items())
    if sec.has("fair_share"):
        fs = Section(r, sec.raw("fair_share")[1], "dispatcher.fair_share")  # type: ignore[index]
        half = fs.value("half_life_s", num_in(1, 365 * 24 * 3600))
        if half is not MISSING:
            values["fair_share_half_life_s"] = half
        key = fs.value("key", one_of("project", "label"))
        if key is not MISSING:
            values["fair_share_key"] = key
        weights = mapping_of(r, fs, "weights", num_in(0, 1e9, above=True))
        values["fair_share_weights"] = tuple((k, float(v)) for k, v in weights.items())
        fs.finish(list(_FAIR_SHARE["properties"]))
    sec.finish([*_DISPATCHER_CHECKS, *DISPATCHER_EXTRA])
    return DispatcherConfig(**values)


def dispatch_changes(old: Config, new: Config) -> list[str]:
    """What a reload changes of the runner profiles and the dispatcher, one line each (the
    hosts are the fleet's to tell, as it reconnects them)."""
    changes = [f"removed runner {name}" for name in old.runners if name not in new.runners]
    for name, profile in new.runners.items():
        before = old.runners.get(name)
        if before is None:
            changes.append(f"runner {name}: {profile.launcher}")
        elif before != profile:
            keys = [f.name for f in fields(profile) if getattr(before, f.name) != getattr(profile, f.name)]
            changes.append(f"runner {name}: {', '.join(keys)} changed")
    for f in fields(new.dispatcher):
        was, now = getattr(old.dispatcher, f.name), getattr(new.dispatcher, f.name)
        if was != now:
            changes.append(f"dispatcher.{f.name}: {was!r} -> {now!r}")
    return changes
