"""The ``daemon:``, ``defaults:`` and ``pools:`` sections, in native and NecroCode spelling."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from yaml.nodes import Node

from necrod.core.config.model import (
    ISOLATIONS,
    KNOWN_PROTOCOLS,
    MAX_LEASE_PORTS,
    MIN_BUFFERED_BYTES,
    WEEK_S,
    DaemonConfig,
    PoolConfig,
    PrepareConfig,
)
from necrod.core.config.schema import (
    COMMAND_SCHEMA,
    MISSING,
    SIZE_CHECKS,
    STRINGS_SCHEMA,
    Reader,
    Section,
    described,
    env_value,
    int_in,
    is_bool,
    is_size,
    is_str,
    mapping_of,
    mapping_schema,
    nullable,
    num_in,
    one_of,
    parse_size,
    read_command,
    schema_of,
    size_at_least,
)
from necrod.core.config.urls import repo_url_problem
from necrod.core.names import index_path_problem, ref_name_problem
from necrod.core.sparse import SPARSE_SCHEMA, filter_problem, normalize, sparse_set_problem

# --- the schema ---------------------------------------------------------------------------------

#: NecroCode's names for native keys.
_ALIASES = {
    "num_slots": "slots",
    "cleanup_timeout": "cleanup_timeout_s",
    "enable_metrics": "metrics",
    "lock_timeout": "lock_timeout_s",
}
_NECRO_ONLY = ["cleanup_options", "lock_timeout_s"]
_CLEANUP_OPTIONS = ["fetch_on_allocate", "clean_on_release", "warmup_enabled"]

_POOL_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "base": described(
        lambda v: is_str(v) or (f"is not a valid ref: {p}" if (p := ref_name_problem(v)) else None),
        schema_of(is_str),
    ),
    "slots": int_in(1, 10_000),
    "min_idle": int_in(0, 10_000),
    "max_slots": int_in(1, 10_000),
    "lease_ttl_s": num_in(1, WEEK_S),
    "max_lease_s": nullable(num_in(1, 4 * WEEK_S)),
    "fetch_interval_s": described(
        lambda v: None if v == 0 else num_in(1, WEEK_S)(v),
        {"anyOf": [{"const": 0}, schema_of(num_in(1, WEEK_S))]},
    ),
    "cleanup": one_of("full", "keep-ignored"),
    "lfs": described(
        lambda v: (
            None if isinstance(v, bool) or v == "pointers" else f"must be true, false or pointers (got {v!r})"
        ),
        {"enum": [False, True, "pointers"]},
    ),
    "salvage": described(
        lambda v: None if isinstance(v, bool) or v == "always" else "must be true, false or always",
        {"anyOf": [{"type": "boolean"}, {"const": "always"}]},
    ),
    "salvage_max_bytes": is_size,
    "salvage_max_files": int_in(1, 10_000_000),
    "salvage_max_file_bytes": is_size,
    "salvage_keep_days": num_in(0, 3650),
    "salvage_keep_count": int_in(0, 10_000_000),
    "salvage_keep_bytes": is_size,
    "cleanup_timeout_s": num_in(1, 24 * 3600),
    "clone_timeout_s": num_in(1, 7 * 24 * 3600),
    "git_concurrency": int_in(1, 256),
    "idle_timeout_s": num_in(0, WEEK_S),
    "isolation": one_of(*ISOLATIONS),
    "ports": int_in(0, MAX_LEASE_PORTS),
    "submodules": described(
        lambda v: None if v is True or v is False or v == "recursive" else "must be true, false or recursive",
        {"enum": [False, True, "recursive"]},
    ),
    "filter": described(
        filter_problem, {"type": "string", "pattern": r"^blob:(none|limit=[1-9][0-9]{0,12}[kmg]?)$"}
    ),
    "metrics": is_bool,
    "stale_lock_hours": num_in(0, 24 * 365, above=True),
    "lock_timeout_s": num_in(0, 24 * 3600),
}


_PREPARE_CHECKS: dict[str, Callable[[Any], str | None]] = {"timeout_s": num_in(1, 24 * 3600)}
#: ``prepare:``'s keys that are not single values, with their JSON Schema.
PREPARE_EXTRA: dict[str, dict[str, Any]] = {
    "command": COMMAND_SCHEMA, "key_files": STRINGS_SCHEMA, "env": mapping_schema(schema_of(env_value)),
}  # fmt: skip


#: A pool's keys that are not single values, with their JSON Schema (``repo_url`` is the pool's own).
POOL_EXTRA: dict[str, dict[str, Any]] = {
    "prepare": {"type": "object", "required": ["command"], "additionalProperties": False,
                "properties": {**{k: schema_of(c) for k, c in _PREPARE_CHECKS.items()}, **PREPARE_EXTRA}},
    "files": mapping_schema({"type": "string", "minLength": 1}),
    "sparse": SPARSE_SCHEMA,
    "cleanup_options": {"type": "object", "additionalProperties": False,
                        "properties": dict.fromkeys(_CLEANUP_OPTIONS, schema_of(is_bool))},
}  # fmt: skip


def pool_schema(*, pool: bool) -> dict[str, Any]:
    """The JSON Schema of a pool (``pool``) or of ``defaults:``, from the tables the reader uses."""
    props = {k: schema_of(c) for k, c in _POOL_CHECKS.items()}
    props.update({alias: props[native] for alias, native in _ALIASES.items()})
    props.update(POOL_EXTRA)
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": props}
    if pool:
        props["repo_url"] = schema_of(is_str)
        schema["required"] = ["repo_url"]
    return schema


def read_pool_options(r: Reader, sec: Section, *, allow_repo: bool) -> tuple[dict[str, Any], dict[str, Node]]:
    """Pool options present in ``sec`` (native or NecroCode names), and the node of each."""
    options: dict[str, Any] = {}
    nodes: dict[str, Node] = {}
    for key in list(sec.items):
        native = _ALIASES.get(key, key)
        if native not in _POOL_CHECKS:
            continue
        if native in nodes:
            sec.taken.add(key)
            r.report(sec.items[key][0], f"{sec.path}: both {key!r} and {native!r} given; keep one")
            continue
        nodes[native] = sec.items[key][1]
        value = sec.value(key, _POOL_CHECKS[native])
        if value is not MISSING:
            options[native] = parse_size(value) if _POOL_CHECKS[native] in SIZE_CHECKS else value
    if sec.has("prepare"):
        prepare = r.attempt(lambda: read_prepare(r, sec.raw("prepare")[1], f"{sec.path}.prepare"))  # type: ignore[index]
        if prepare is not None:
            options["prepare"] = prepare
        nodes["prepare"] = sec.items["prepare"][1]
    if sec.has("files"):
        files = r.attempt(lambda: read_files(r, sec))
        if files is not None:
            options["files"] = files
        nodes["files"] = sec.items["files"][1]
    if sec.has("sparse"):
        sparse = r.attempt(lambda: read_sparse(r, sec))
        if sparse is not None:
            options["sparse"] = sparse
        nodes["sparse"] = sec.items["sparse"][1]
    if sec.has("cleanup_options"):

        def cleanup_options() -> None:
            opts = Section(r, sec.raw("cleanup_options")[1], f"{sec.path}.cleanup_options")  # type: ignore[index]
            for key in _CLEANUP_OPTIONS:
                if opts.has(key):
                    opts.value(key, is_bool)
            opts.finish(_CLEANUP_OPTIONS)

        r.attempt(cleanup_options)
        r.notes.append(
            f"{sec.path}.cleanup_options: accepted; necrod always cleans after release and keeps "
            "slots fetched in the background, so these options change nothing"
        )
    if "lock_timeout_s" in options:
        r.notes.append(f"{sec.path}.lock_timeout: accepted; allocation takes no lock that could wait")
    allowed = [*_POOL_CHECKS, *_ALIASES, *POOL_EXTRA, *(["repo_url"] if allow_repo else [])]
    if not allow_repo and sec.has("repo_url"):
        sec.taken.add("repo_url")
        r.report(sec.items["repo_url"][0], f"{sec.path}: repo_url belongs to a pool, not to defaults")
    if allow_repo:
        sec.taken.add("repo_url")
    sec.finish(allowed)
    return options, nodes


def read_prepare(r: Reader, node: Node, path: str) -> PrepareConfig:
    """``prepare:``: ``command`` (required), ``key_files``, ``env``, ``timeout_s``."""
    sec = Section(r, node, path)
    values: dict[str, Any] = sec.values(_PREPARE_CHECKS)
    item = sec.raw("command")
    if item is None:
        raise r.error(node, f"{path} needs a command (a list of arguments or a shell command)")
    values["command"] = read_command(r, item[1], f"{path}.command")
    item = sec.raw("key_files")
    if item is not None:
        patterns = r.strings(item[1], f"{path}.key_files")
        for pattern in patterns:
            problem = index_path_problem(pattern.removeprefix("./"))
            if problem:
                raise r.error(
                    item[1], f"{path}.key_files: {pattern!r} {problem}; name paths in the repository"
                )
        values["key_files"] = tuple(patterns)
    values["env"] = tuple((k, str(v)) for k, v in mapping_of(r, sec, "env", env_value).items())
    sec.finish([*_PREPARE_CHECKS, *PREPARE_EXTRA])
    return PrepareConfig(**values)


def read_files(r: Reader, sec: Section) -> tuple[tuple[str, str], ...]:
    """``files:``: path in the slot → path on the host (relative to the config's directory)."""
    path = f"{sec.path}.files"
    out = []
    for slot_path, (key_node, value_node) in r.mapping(sec.raw("files")[1], path).items():  # type: ignore[index]
        problem = index_path_problem(slot_path)
        if problem:
            raise r.error(key_node, f"{path}: {slot_path!r} {problem}; name a path inside the slot")
        host = r.scalar(value_node, f"{path}.{slot_path}")
        bad = is_str(host)
        if bad:
            raise r.error(value_node, f"{path}.{slot_path} {bad}")
        out.append((slot_path, host))
    return tuple(out)


def read_sparse(r: Reader, sec: Section) -> tuple[str, ...]:
    """``sparse:``: directories (cone mode) a slot holds besides the top-level files."""
    path = f"{sec.path}.sparse"
    node = sec.raw("sparse")[1]  # type: ignore[index]
    entries = r.strings(node, path)
    problem = sparse_set_problem(entries)
    if problem:
        raise r.error(node, f"{path}: {problem}")
    return normalize(entries)


#: ``daemon:``'s keys whose values are not checked one by one, with their JSON Schema.
DAEMON_EXTRA: dict[str, dict[str, Any]] = {
    "metrics_listen": {"type": "string", "pattern": r"^\[?[^\]]+\]?:\d{1,5}$"},
    "allowed_protocols": {"type": "array", "items": {"enum": list(KNOWN_PROTOCOLS)}},
    "port_range": {"type": "string", "pattern": r"^\d{1,5}-\d{1,5}$"},
}

_DAEMON_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "workspaces": is_str,
    "git_concurrency": int_in(1, 256),
    "socket_group": is_str,
    "admin_group": is_str,
    "max_connections": int_in(1, 65_536),
    "max_connections_per_uid": int_in(1, 65_536),
    "max_leases_per_uid": int_in(1, 1_000_000),
    "max_tasks_per_uid": int_in(1, 10_000_000),
    "shutdown_grace_s": num_in(0, 3600),
    "write_timeout_s": num_in(0.1, 3600),
    "read_timeout_s": num_in(0.1, 3600),
    "git": is_str,
    "event_history": int_in(100, 10_000_000),
    "heal_interval_s": num_in(0, WEEK_S),
    "release_overdue_leases": is_bool,
    "disk_check_interval_s": num_in(1, 3600),
    "mirror_check_interval_s": num_in(0, 30 * 24 * 3600),
    "min_free_disk": is_size,
    "max_buffered_bytes": size_at_least(MIN_BUFFERED_BYTES, "8 MiB"),
}


def read_daemon(r: Reader, node: Node) -> DaemonConfig:
    sec = Section(r, node, "daemon")
    values: dict[str, Any] = sec.values(_DAEMON_CHECKS)
    values.update({k: parse_size(v) for k, v in values.items() if _DAEMON_CHECKS[k] in SIZE_CHECKS})
    if sec.has("metrics_listen"):
        node_ = sec.node_of("metrics_listen")
        v = sec.value("metrics_listen")
        m = re.fullmatch(r"\[?([^\]]*?)\]?:(\d{1,5})", v) if isinstance(v, str) else None
        if not m or not 0 < int(m.group(2)) < 65536 or not m.group(1):
            if v is not MISSING:
                r.report(node_, "daemon.metrics_listen must be HOST:PORT, e.g. 127.0.0.1:9464")
        else:
            values["metrics_listen"] = (m.group(1), int(m.group(2)))
    if sec.has("port_range"):
        node_ = sec.node_of("port_range")
        v = sec.value("port_range")
        m = re.fullmatch(r"(\d{1,5})-(\d{1,5})", v) if isinstance(v, str) else None
        low, high = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
        if not m or not 1024 <= low <= high <= 65535:
            if v is not MISSING:
                r.report(node_, "daemon.port_range must be LOW-HIGH within 1024-65535, e.g. 20000-29999")
        else:
            values["port_range"] = (low, high)
    if sec.has("allowed_protocols"):
        _key_node, value_node = sec.raw("allowed_protocols")  # type: ignore[misc]
        protocols = r.strings(value_node, "daemon.allowed_protocols")
        bad = [p for p in protocols if p not in KNOWN_PROTOCOLS]
        if bad:
            r.report(
                value_node,
                f"daemon.allowed_protocols: unknown transport(s) {', '.join(bad)}; "
                f"known: {', '.join(KNOWN_PROTOCOLS)}",
            )
        else:
            values["allowed_protocols"] = tuple(dict.fromkeys(protocols))
    sec.finish([*_DAEMON_CHECKS, *DAEMON_EXTRA])
    return DaemonConfig(**values)


def daemon_schema() -> dict[str, Any]:
    props = {k: schema_of(c) for k, c in _DAEMON_CHECKS.items()} | DAEMON_EXTRA
    return {"type": "object", "additionalProperties": False, "properties": props}


def resolve_pool(
    r: Reader,
    name: str,
    options: dict[str, Any],
    nodes: dict[str, Node],
    defaults: dict[str, Any],
    repo_url: str,
    repo_node: Node,
    daemon: DaemonConfig,
    name_node: Node,
) -> PoolConfig:
    merged = {**defaults, **options}
    if merged.get("salvage") == "always":
        merged.update(salvage=True, salvage_succeeded=True)
    slots = merged.get("slots", 2)
    if "max_slots" not in merged:
        merged["max_slots"] = max(8, slots)
    elif merged["max_slots"] < slots:
        node = nodes.get("max_slots") or nodes.get("slots") or name_node
        raise r.error(node, f"pools.{name}: max_slots ({merged['max_slots']}) is below slots ({slots})")
    if merged.get("min_idle", 1) > merged["max_slots"]:
        node = nodes.get("min_idle") or name_node
        raise r.error(
            node, f"pools.{name}: min_idle ({merged['min_idle']}) is above max_slots ({merged['max_slots']})"
        )
    if merged.get("submodules") and merged.get("isolation") == "overlay":
        node = nodes.get("submodules") or nodes.get("isolation") or name_node
        raise r.error(node, f"pools.{name}: submodules are not checked out in overlay slots yet; "
                            "use isolation: worktree or shared-clone, or submodules: false")  # fmt: skip
    if merged.get("sparse") and merged.get("isolation") == "overlay":
        node = nodes.get("sparse") or nodes.get("isolation") or name_node
        raise r.error(
            node,
            f"pools.{name}: sparse does not apply to overlay slots (they stand on one full "
            "checkout shared by every slot); use isolation: worktree or shared-clone",
        )
    problem = repo_url_problem(repo_url, daemon.allowed_protocols)
    if problem:
        raise r.error(repo_node, f"pools.{name}.repo_url {problem}")
    return PoolConfig(name=name, repo_url=repo_url, **merged)
