"""pools.yaml: the schema, its defaults, and validation that points at the offending line.

Two spellings load: the native one (``daemon:``, ``defaults:``, ``pools:``) and the NecroCode one
(``num_slots``, ``cleanup_timeout``, ``lock_timeout``, ``cleanup_options``, ...), whose keys are
accepted as aliases of the native keys. A file is validated whole: the first problem found is
raised as a ``ConfigError`` carrying the file, line and column, and nothing is half applied.

Pure: no file system access here (``io.config_files`` reads the file and checks paths exist).
"""

from __future__ import annotations

import difflib
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from necrod.core.names import pool_name_problem, ref_name_problem

WEEK_S = 7 * 24 * 3600.0
GIB = 1 << 30
MIB = 1 << 20
#: Room for a few whole 1 MiB request lines per uid (a quarter of the budget each).
MIN_BUFFERED_BYTES = 8 * MIB

#: Transports git may use unless the config says otherwise (GIT_ALLOW_PROTOCOL).
DEFAULT_PROTOCOLS = ("file", "https", "ssh")
KNOWN_PROTOCOLS = ("file", "https", "http", "ssh", "git")


class ConfigError(Exception):
    """A config that cannot be used, with where the problem is."""

    def __init__(
        self, message: str, *, file: str | None = None, line: int | None = None, column: int | None = None
    ) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.column = column
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file or "<config>"
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return f"{where}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "message": self.message,
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "text": str(self),
        }


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    workspaces: str | None = None
    git_concurrency: int = 4
    min_free_disk: int = 1 * GIB
    socket_group: str | None = None
    #: Members are admins (admin methods, every lease and task), besides root and the daemon's uid.
    admin_group: str | None = None
    metrics_listen: tuple[str, int] | None = None
    max_connections: int = 1024
    #: Connections one uid that is not an admin may hold (so one peer cannot lock others out).
    max_connections_per_uid: int = 256
    #: Bytes of unfinished request lines held for all connections together (a quarter per
    #: non-admin uid), so half-sent lines cannot exhaust memory.
    max_buffered_bytes: int = 64 * MIB
    shutdown_grace_s: float = 10.0
    write_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    allowed_protocols: tuple[str, ...] = DEFAULT_PROTOCOLS
    git: str = "git"
    event_history: int = 50_000
    heal_interval_s: float = 300.0
    release_overdue_leases: bool = False
    disk_check_interval_s: float = 30.0
    #: How often each mirror's object connectivity is checked (``git fsck --connectivity-only``).
    mirror_check_interval_s: float = 6 * 3600.0


@dataclass(frozen=True, slots=True)
class SalvageLimits:
    """What one salvage may take; past it, files are left out and listed (``salvage_max_*``)."""

    max_bytes: int
    max_files: int
    max_file_bytes: int


@dataclass(frozen=True, slots=True)
class SalvageRetention:
    """How long salvage refs are kept, per pool (``salvage_keep_*``); the oldest go first."""

    days: float
    count: int
    bytes: int


@dataclass(frozen=True, slots=True)
class PoolConfig:
    name: str
    repo_url: str
    base: str | None = None
    slots: int = 2
    min_idle: int = 1
    max_slots: int = 8
    lease_ttl_s: float = 900.0
    max_lease_s: float | None = None
    fetch_interval_s: float = 300.0
    cleanup: str = "full"
    salvage: bool = True
    salvage_max_bytes: int = 128 << 20
    salvage_max_files: int = 20_000
    salvage_max_file_bytes: int = 16 << 20
    salvage_keep_days: float = 30.0
    salvage_keep_count: int = 1_000
    salvage_keep_bytes: int = 4 * GIB
    cleanup_timeout_s: float = 300.0
    clone_timeout_s: float = 3600.0
    git_concurrency: int = 2
    idle_timeout_s: float = 600.0
    isolation: str = "worktree"
    metrics: bool = True
    stale_lock_hours: float = 24.0
    #: NecroCode's ``lock_timeout``: accepted for compatibility; allocation takes no file lock.
    lock_timeout_s: float | None = None

    @property
    def clean_flags(self) -> str:
        return "-ffdx" if self.cleanup == "full" else "-ffd"

    @property
    def salvage_limits(self) -> SalvageLimits:
        return SalvageLimits(self.salvage_max_bytes, self.salvage_max_files, self.salvage_max_file_bytes)

    @property
    def salvage_retention(self) -> SalvageRetention:
        return SalvageRetention(self.salvage_keep_days, self.salvage_keep_count, self.salvage_keep_bytes)


LAUNCHERS = ("process", "tmux", "container", "kubernetes")


@dataclass(frozen=True, slots=True)
class ContainerSpec:
    """``runners.<name>.container``: how a ``container`` launcher runs a task (docs/containers.md)."""

    image: str
    #: ``uid:gid`` inside the container; never root unless said so.
    user: str = "65534:65534"
    #: Where the slot is mounted, read-write (also the working directory).
    workdir: str = "/workspace"
    network: str = "none"
    cpus: float | None = None
    pids_limit: int | None = 512
    #: Extra host paths mounted read-only at the same path.
    mounts: tuple[str, ...] = ()
    #: The Docker Engine API (``unix://PATH``); None: ``$DOCKER_HOST``, else the default socket.
    docker_host: str | None = None


@dataclass(frozen=True, slots=True)
class KubernetesSpec:
    """``runners.<name>.kubernetes``: how a ``kubernetes`` launcher runs a task (docs/kubernetes.md)."""

    image: str
    #: None: ``$POD_NAMESPACE``, else the service account's namespace, else the kubeconfig's, else default.
    namespace: str | None = None
    #: The node the Job is pinned to; None: ``$NODE_NAME`` (the daemon's own node: slots are hostPaths).
    node: str | None = None
    user: str = "65534:65534"
    workdir: str = "/workspace"
    cpus: float | None = None
    service_account: str | None = None
    image_pull_policy: str = "IfNotPresent"
    ttl_after_finished_s: int = 600
    labels: tuple[tuple[str, str], ...] = ()
    #: None: the in-cluster service account, else ``$KUBECONFIG``.
    kubeconfig: str | None = None


@dataclass(frozen=True, slots=True)
class RunnerProfile:
    """A way to run tasks: ``runners.<name>`` in pools.yaml."""

    name: str
    launcher: str = "process"
    #: argv template (list) or a shell command (string, run with ``sh -c``); None: tasks bring theirs.
    command: tuple[str, ...] | str | None = None
    skills: tuple[str, ...] = ()
    max_concurrency: int = 1
    #: Pools this profile serves (empty: all).
    pools: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    memory_limit: int | None = None
    timeout_s: float | None = None
    #: Stop a runner that writes no output for this long (None: never).
    output_timeout_s: float | None = None
    #: TTL of the task's lease: the runner must heartbeat within it.
    lease_ttl_s: float = 300.0
    #: Between SIGTERM and SIGKILL when a runner is stopped.
    grace_s: float = 10.0
    container: ContainerSpec | None = None
    kubernetes: KubernetesSpec | None = None


@dataclass(frozen=True, slots=True)
class HostConfig:
    """Another necrod host, reached over SSH: ``hosts.<name>`` in pools.yaml."""

    name: str
    #: ``ssh://[user@]host[:port][/path/to/necrod.sock]``
    address: str
    key: str | None = None
    known_hosts: str | None = None
    accept_unknown_host_key: bool = False
    pools: tuple[str, ...] = ()
    max_concurrency: int = 4
    skills: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    #: Where runner scripts, exit statuses and logs live on that host (relative: to the login's home).
    workdir: str = ".necrod-fleet"


@dataclass(frozen=True, slots=True)
class DispatcherConfig:
    policy: str = "fifo"
    max_running: int = 8
    max_retries: int = 0
    retry_backoff_s: float = 10.0
    retry_backoff_max_s: float = 600.0
    failure_strategy: str = "continue"
    label_priority: tuple[tuple[str, int], ...] = ()
    fair_share_half_life_s: float = 3600.0
    fair_share_weights: tuple[tuple[str, float], ...] = ()
    fair_share_key: str = "project"
    #: No new task starts while the machine's memory use is above this percentage.
    max_memory_percent: float = 95.0
    #: No new task starts while the 1-minute load average per CPU is above this (None: ignored).
    max_load_per_cpu: float | None = None
    #: Finished tasks kept (the oldest beyond this are forgotten).
    keep_finished: int = 10_000
    logs: str | None = None
    #: Run tasks on this host too (its own pools), beside the ``hosts:``.
    run_locally: bool = True
    #: A host unreachable this long has its running attempts written off and retried elsewhere.
    host_grace_s: float = 120.0


@dataclass(frozen=True, slots=True)
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    pools: dict[str, PoolConfig] = field(default_factory=dict)
    runners: dict[str, RunnerProfile] = field(default_factory=dict)
    dispatcher: DispatcherConfig = field(default_factory=DispatcherConfig)
    hosts: dict[str, HostConfig] = field(default_factory=dict)
    #: The file it came from (None for the embedded default).
    source: str | None = None
    #: Things accepted but without effect (NecroCode options necrod covers another way).
    notes: tuple[str, ...] = ()
    #: (line, column) of values checked later against the file system, by dotted path.
    marks: dict[str, tuple[int, int]] = field(default_factory=dict, compare=False)

    def error_at(self, path: str, message: str) -> ConfigError:
        line, column = self.marks.get(path, (None, None))
        return ConfigError(message, file=self.source, line=line, column=column)


# --- reading YAML nodes with their positions -------------------------------------------------

_constructor = yaml.constructor.SafeConstructor()


class _Reader:
    """Walks the YAML node tree, converting values and raising errors that name the line."""

    def __init__(self, file: str | None) -> None:
        self.file = file
        self.notes: list[str] = []

    def error(self, node: Node | None, message: str) -> ConfigError:
        if node is None:
            return ConfigError(message, file=self.file)
        mark = node.start_mark
        return ConfigError(message, file=self.file, line=mark.line + 1, column=mark.column + 1)

    def mapping(self, node: Node, path: str) -> dict[str, tuple[Node, Node]]:
        if not isinstance(node, MappingNode):
            raise self.error(node, f"{path} must be a mapping")
        items: dict[str, tuple[Node, Node]] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                raise self.error(key_node, f"{path}: keys must be plain names (no merge keys)")
            key = str(self._construct(key_node, path))
            if key in items:
                first = items[key][0].start_mark.line + 1
                raise self.error(key_node, f"{path}: duplicate key {key!r} (first on line {first})")
            items[key] = (key_node, value_node)
        return items

    def scalar(self, node: Node, path: str) -> Any:
        if not isinstance(node, ScalarNode):
            raise self.error(
                node,
                f"{path} must be a single value, not a {'list' if isinstance(node, SequenceNode) else 'mapping'}",
            )
        return self._construct(node, path)

    def _construct(self, node: Node, path: str) -> Any:
        # A tag the safe constructor refuses (!!python/...) or a value its tag cannot read
        # (!!int abc, a 13th month) raises ConstructorError or ValueError, not a ConfigError.
        try:
            return _constructor.construct_object(node)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
            problem = getattr(exc, "problem", None) or str(exc)
            raise self.error(node, f"{path}: cannot read this value: {problem}") from None

    def strings(self, node: Node, path: str) -> list[str]:
        if not isinstance(node, SequenceNode):
            raise self.error(node, f"{path} must be a list")
        out = []
        for item in node.value:
            value = self.scalar(item, path)
            if not isinstance(value, str):
                raise self.error(item, f"{path}: every item must be a string")
            out.append(value)
        return out


class _Section:
    """One mapping being validated: take keys one by one, then ``finish`` refuses the rest."""

    def __init__(self, reader: _Reader, node: Node, path: str) -> None:
        self.r = reader
        self.node = node
        self.path = path
        self.items = reader.mapping(node, path)
        self.taken: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.items

    def node_of(self, key: str) -> Node | None:
        item = self.items.get(key)
        return item[1] if item else None

    def raw(self, key: str) -> tuple[Node, Node] | None:
        self.taken.add(key)
        return self.items.get(key)

    def value(self, key: str, check: Callable[[Any], str | None] | None = None) -> Any:
        item = self.raw(key)
        if item is None:
            return _MISSING
        value = self.r.scalar(item[1], f"{self.path}.{key}")
        if check is not None:
            problem = check(value)
            if problem:
                raise self.r.error(item[1], f"{self.path}.{key} {problem}")
        return value

    def values(self, checks: dict[str, Callable[[Any], str | None]]) -> dict[str, Any]:
        """Each of ``checks``' keys that is present, checked."""
        found = {}
        for key, check in checks.items():
            v = self.value(key, check)
            if v is not _MISSING:
                found[key] = v
        return found

    def finish(self, allowed: list[str]) -> None:
        for key, (key_node, _) in self.items.items():
            if key not in self.taken:
                near = difflib.get_close_matches(key, allowed, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise self.r.error(key_node, f"{self.path}: unknown key {key!r}{hint}")


_MISSING: Any = object()


# --- value checks ------------------------------------------------------------------------------


def _int_in(lo: int, hi: int) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int):
            return "must be a whole number"
        if not lo <= v <= hi:
            return f"must be between {lo} and {hi} (got {v})"
        return None

    return check


def _num_in(lo: float, hi: float, *, above: bool = False) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int | float) or v != v:
            return "must be a number"
        if (v <= lo if above else v < lo) or v > hi:
            low = f"above {lo:g}" if above else f"at least {lo:g}"
            return f"must be {low} and at most {hi:g} (got {v})"
        return None

    return check


def _is_size(v: Any) -> str | None:
    try:
        parse_size(v)
    except ValueError as exc:
        return f"must be a size: {exc}"
    return None


def _size_at_least(low: int, shown: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        problem = _is_size(v)
        if problem is None and parse_size(v) < low:
            return f"must be at least {low} ({shown})"
        return problem

    _SIZE_CHECKS.add(check)
    return check


#: Checks whose value is a size: the value is converted to bytes once checked.
_SIZE_CHECKS: set[Callable[[Any], str | None]] = {_is_size}


def _is_bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def _is_str(v: Any) -> str | None:
    if not isinstance(v, str) or not v:
        return "must be a non-empty string"
    if any(ord(c) < 0x20 for c in v):
        return "must not contain control characters"
    return None


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)} (got {v!r})"

    return check


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)\s*", re.IGNORECASE)


def parse_size(value: Any) -> int:
    """Bytes from ``5GiB``, ``500MB``, ``2G`` (binary) or a plain number of bytes."""
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string such as 5GiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size may not be negative")
        return value
    if not isinstance(value, str):
        raise ValueError("a size must be a number of bytes or a string such as 5GiB")
    m = _SIZE.fullmatch(value)
    if not m:
        raise ValueError(f"{value!r} is not a size (examples: 5GiB, 500MB, 1048576)")
    number, unit, binary, _ = m.groups()
    power = " kmgt".index(unit.lower()) if unit else 0
    base = 1024 if (binary or (unit and not m.group(4))) else 1000
    return int(float(number) * base**power)


def repo_transport(url: str) -> str:
    """The git transport ``url`` would use: file, ssh, https, http, git, or a ``x::`` helper."""
    if "::" in url.split("/", 1)[0]:
        return url.split("::", 1)[0]
    m = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", url)
    if m:
        scheme = m.group(1).lower()
        return {"git+ssh": "ssh", "ssh+git": "ssh"}.get(scheme, scheme)
    if re.match(r"[^/]*:", url) and not url.startswith("/"):
        return "ssh"  # scp-like user@host:path
    return "file"


def repo_url_problem(url: str, allowed: tuple[str, ...]) -> str | None:
    """Why git must not be pointed at ``url``, or None."""
    if not url:
        return "is empty"
    if url.startswith("-"):
        return "starts with '-' (git would read it as an option)"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return "contains a control character"
    transport = repo_transport(url)
    if transport not in allowed:
        return f"uses transport {transport!r}, which daemon.allowed_protocols does not allow ({', '.join(allowed)})"
    if transport == "ssh":
        m = re.match(r"(?:ssh|git\+ssh|ssh\+git)://(?:[^@/]*@)?([^/:]*)", url, re.IGNORECASE)
        host = m.group(1) if m else url.split(":", 1)[0].rsplit("@", 1)[-1]
        if not host or host.startswith("-"):
            return f"has an invalid host {host!r}"
    return None


def local_repo_path(url: str) -> str | None:
    """The local path a file-transport ``url`` names (``file://`` stripped), else None."""
    if repo_transport(url) != "file":
        return None
    return url[len("file://") :] if url.startswith("file://") else url


# --- the schema ---------------------------------------------------------------------------------

_POOL_KEYS = [
    "base",
    "slots",
    "min_idle",
    "max_slots",
    "lease_ttl_s",
    "max_lease_s",
    "fetch_interval_s",
    "cleanup",
    "salvage",
    "salvage_max_bytes",
    "salvage_max_files",
    "salvage_max_file_bytes",
    "salvage_keep_days",
    "salvage_keep_count",
    "salvage_keep_bytes",
    "cleanup_timeout_s",
    "clone_timeout_s",
    "git_concurrency",
    "idle_timeout_s",
    "isolation",
    "metrics",
    "stale_lock_hours",
]
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
    "base": lambda v: _is_str(v) or (f"is not a valid ref: {p}" if (p := ref_name_problem(v)) else None),
    "slots": _int_in(1, 10_000),
    "min_idle": _int_in(0, 10_000),
    "max_slots": _int_in(1, 10_000),
    "lease_ttl_s": _num_in(1, WEEK_S),
    "max_lease_s": lambda v: None if v is None else _num_in(1, 4 * WEEK_S)(v),
    "fetch_interval_s": lambda v: None if v == 0 else _num_in(1, WEEK_S)(v),
    "cleanup": _one_of("full", "keep-ignored"),
    "salvage": _is_bool,
    "salvage_max_bytes": _is_size,
    "salvage_max_files": _int_in(1, 10_000_000),
    "salvage_max_file_bytes": _is_size,
    "salvage_keep_days": _num_in(0, 3650),
    "salvage_keep_count": _int_in(0, 10_000_000),
    "salvage_keep_bytes": _is_size,
    "cleanup_timeout_s": _num_in(1, 24 * 3600),
    "clone_timeout_s": _num_in(1, 7 * 24 * 3600),
    "git_concurrency": _int_in(1, 256),
    "idle_timeout_s": _num_in(0, WEEK_S),
    "isolation": _one_of("worktree", "shared-clone"),
    "metrics": _is_bool,
    "stale_lock_hours": _num_in(0, 24 * 365, above=True),
    "lock_timeout_s": _num_in(0, 24 * 3600),
}


def _read_pool_options(
    r: _Reader, sec: _Section, *, allow_repo: bool
) -> tuple[dict[str, Any], dict[str, Node]]:
    """Pool options present in ``sec`` (native or NecroCode names), and the node of each."""
    options: dict[str, Any] = {}
    nodes: dict[str, Node] = {}
    for key in list(sec.items):
        native = _ALIASES.get(key, key)
        if native not in _POOL_CHECKS:
            continue
        if native in options:
            raise r.error(sec.items[key][0], f"{sec.path}: both {key!r} and {native!r} given; keep one")
        value = sec.value(key, _POOL_CHECKS[native])
        options[native] = parse_size(value) if _POOL_CHECKS[native] in _SIZE_CHECKS else value
        nodes[native] = sec.items[key][1]
    if sec.has("cleanup_options"):
        opts = _Section(r, sec.raw("cleanup_options")[1], f"{sec.path}.cleanup_options")  # type: ignore[index]
        for key in _CLEANUP_OPTIONS:
            if opts.has(key):
                opts.value(key, _is_bool)
        opts.finish(_CLEANUP_OPTIONS)
        r.notes.append(
            f"{sec.path}.cleanup_options: accepted; necrod always cleans after release and keeps "
            "slots fetched in the background, so these options change nothing"
        )
    if "lock_timeout_s" in options:
        r.notes.append(f"{sec.path}.lock_timeout: accepted; allocation takes no lock that could wait")
    allowed = _POOL_KEYS + list(_ALIASES) + ["cleanup_options"] + (["repo_url"] if allow_repo else [])
    if not allow_repo and sec.has("repo_url"):
        raise r.error(sec.items["repo_url"][0], f"{sec.path}: repo_url belongs to a pool, not to defaults")
    if allow_repo:
        sec.taken.add("repo_url")
    sec.finish(allowed)
    return options, nodes


_DAEMON_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "workspaces": _is_str,
    "git_concurrency": _int_in(1, 256),
    "socket_group": _is_str,
    "admin_group": _is_str,
    "max_connections": _int_in(1, 65_536),
    "max_connections_per_uid": _int_in(1, 65_536),
    "shutdown_grace_s": _num_in(0, 3600),
    "write_timeout_s": _num_in(0.1, 3600),
    "read_timeout_s": _num_in(0.1, 3600),
    "git": _is_str,
    "event_history": _int_in(100, 10_000_000),
    "heal_interval_s": _num_in(0, WEEK_S),
    "release_overdue_leases": _is_bool,
    "disk_check_interval_s": _num_in(1, 3600),
    "mirror_check_interval_s": _num_in(0, 30 * 24 * 3600),
    "min_free_disk": _is_size,
    "max_buffered_bytes": _size_at_least(MIN_BUFFERED_BYTES, "8 MiB"),
}


def _read_daemon(r: _Reader, node: Node) -> DaemonConfig:
    sec = _Section(r, node, "daemon")
    values: dict[str, Any] = sec.values(_DAEMON_CHECKS)
    values.update({k: parse_size(v) for k, v in values.items() if _DAEMON_CHECKS[k] in _SIZE_CHECKS})
    if sec.has("metrics_listen"):
        node_ = sec.node_of("metrics_listen")
        v = sec.value("metrics_listen")
        m = re.fullmatch(r"\[?([^\]]*?)\]?:(\d{1,5})", v) if isinstance(v, str) else None
        if not m or not 0 < int(m.group(2)) < 65536 or not m.group(1):
            raise r.error(node_, "daemon.metrics_listen must be HOST:PORT, e.g. 127.0.0.1:9464")
        values["metrics_listen"] = (m.group(1), int(m.group(2)))
    if sec.has("allowed_protocols"):
        _key_node, value_node = sec.raw("allowed_protocols")  # type: ignore[misc]
        protocols = r.strings(value_node, "daemon.allowed_protocols")
        bad = [p for p in protocols if p not in KNOWN_PROTOCOLS]
        if bad:
            raise r.error(
                value_node,
                f"daemon.allowed_protocols: unknown transport(s) {', '.join(bad)}; "
                f"known: {', '.join(KNOWN_PROTOCOLS)}",
            )
        values["allowed_protocols"] = tuple(dict.fromkeys(protocols))
    sec.finish([*_DAEMON_CHECKS, "metrics_listen", "allowed_protocols"])
    return DaemonConfig(**values)


def _mapping_of(
    r: _Reader, sec: _Section, key: str, value_check: Callable[[Any], str | None]
) -> dict[str, Any]:
    item = sec.raw(key)
    if item is None:
        return {}
    out = {}
    for name, (_, node) in r.mapping(item[1], f"{sec.path}.{key}").items():
        value = r.scalar(node, f"{sec.path}.{key}.{name}")
        problem = value_check(value)
        if problem:
            raise r.error(node, f"{sec.path}.{key}.{name} {problem}")
        out[name] = value
    return out


def _optional_num(lo: float, hi: float) -> Callable[[Any], str | None]:
    return lambda v: None if v is None else _num_in(lo, hi, above=True)(v)


_RUNNER_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "launcher": _one_of(*LAUNCHERS),
    "max_concurrency": _int_in(1, 10_000),
    "timeout_s": _optional_num(0, 30 * 24 * 3600),
    "output_timeout_s": _optional_num(0, 30 * 24 * 3600),
    "lease_ttl_s": _num_in(1, WEEK_S),
    "grace_s": _num_in(0, 3600),
}


def _read_runner(r: _Reader, name: str, node: Node, pools: dict[str, PoolConfig]) -> RunnerProfile:
    sec = _Section(r, node, f"runners.{name}")
    values: dict[str, Any] = {"name": name}
    values.update(sec.values(_RUNNER_CHECKS))
    item = sec.raw("command")
    if item is not None:
        cmd_node = item[1]
        if isinstance(cmd_node, SequenceNode):
            argv = r.strings(cmd_node, f"runners.{name}.command")
            if not argv:
                raise r.error(cmd_node, f"runners.{name}.command may not be empty")
            values["command"] = tuple(argv)
        else:
            text = r.scalar(cmd_node, f"runners.{name}.command")
            if not isinstance(text, str) or not text.strip():
                raise r.error(
                    cmd_node, f"runners.{name}.command must be a list of arguments or a shell command"
                )
            values["command"] = text
    for key in ("skills", "pools"):
        item = sec.raw(key)
        if item is not None:
            values[key] = tuple(r.strings(item[1], f"runners.{name}.{key}"))
    env = _mapping_of(r, sec, "env", lambda v: None if isinstance(v, str | int | float) and not isinstance(v, bool)
                      else "must be a string")  # fmt: skip
    values["env"] = tuple((k, str(v)) for k, v in env.items())
    if sec.has("memory_limit"):
        node_ = sec.node_of("memory_limit")
        try:
            values["memory_limit"] = parse_size(sec.value("memory_limit"))
        except ValueError as exc:
            raise r.error(node_, f"runners.{name}.memory_limit: {exc}") from None
    container = sec.raw("container")
    if container is not None:
        values["container"] = _read_container(r, name, container[1])
    kubernetes = sec.raw("kubernetes")
    if kubernetes is not None:
        values["kubernetes"] = _read_kubernetes(r, name, kubernetes[1])
    for launcher in ("container", "kubernetes"):
        if values.get("launcher") == launcher and launcher not in values:
            raise r.error(
                node, f"runners.{name}: launcher {launcher} needs a {launcher}: section with an image"
            )
    sec.finish(
        [*_RUNNER_CHECKS, "command", "skills", "pools", "env", "memory_limit", "container", "kubernetes"]
    )
    return RunnerProfile(**values)


def _user_spec(v: Any) -> str | None:
    if not isinstance(v, str) or not re.fullmatch(r"\d+:\d+", v):
        return "must be uid:gid, numbers"
    return None


def _abs_path(v: Any) -> str | None:
    return _is_str(v) or (None if str(v).startswith("/") and ":" not in v else "must be an absolute path")


_CONTAINER_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "image": _is_str, "user": _user_spec, "workdir": _abs_path, "network": _is_str,
    "cpus": _optional_num(0, 1024), "pids_limit": lambda v: None if v is None else _int_in(16, 4_194_304)(v),
    "docker_host": _is_str,
}  # fmt: skip


def _read_container(r: _Reader, name: str, node: Node) -> ContainerSpec:
    sec = _Section(r, node, f"runners.{name}.container")
    values: dict[str, Any] = sec.values(_CONTAINER_CHECKS)
    if "image" not in values:
        raise r.error(node, f"runners.{name}.container.image is required")
    item = sec.raw("mounts")
    if item is not None:
        mounts = r.strings(item[1], f"runners.{name}.container.mounts")
        for m in mounts:
            if _abs_path(m):
                raise r.error(item[1], f"runners.{name}.container.mounts: {m!r} must be an absolute path")
        values["mounts"] = tuple(mounts)
    sec.finish([*_CONTAINER_CHECKS, "mounts"])
    return ContainerSpec(**values)


def _dns_label(v: Any) -> str | None:
    if not isinstance(v, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", v):
        return "must be a Kubernetes name: lowercase letters, digits and '-', at most 63"
    return None


def _dns_subdomain(v: Any) -> str | None:
    if not isinstance(v, str) or len(v) > 253 or not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", v):
        return "must be a Kubernetes name: lowercase letters, digits, '-' and '.', at most 253"
    return None


def _or_null(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    return lambda v: None if v is None else check(v)


_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")

_KUBERNETES_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "image": _is_str, "namespace": _or_null(_dns_label), "node": _or_null(_dns_subdomain), "user": _user_spec,
    "workdir": _abs_path, "cpus": _optional_num(0, 1024), "service_account": _or_null(_dns_subdomain),
    "image_pull_policy": _one_of("Always", "IfNotPresent", "Never"),
    "ttl_after_finished_s": _int_in(0, 365 * 24 * 3600), "kubeconfig": _or_null(_is_str),
}  # fmt: skip


def _read_kubernetes(r: _Reader, name: str, node: Node) -> KubernetesSpec:
    sec = _Section(r, node, f"runners.{name}.kubernetes")
    values: dict[str, Any] = sec.values(_KUBERNETES_CHECKS)
    if "image" not in values:
        raise r.error(node, f"runners.{name}.kubernetes.image is required")

    def label_value(v: Any) -> str | None:
        ok = isinstance(v, str) and len(v) <= 63 and _LABEL_VALUE.fullmatch(v)
        return None if ok else "must be a Kubernetes label value: at most 63 letters, digits, '-', '_', '.'"

    labels = _mapping_of(r, sec, "labels", label_value)
    values["labels"] = tuple((k, str(v)) for k, v in labels.items())
    sec.finish([*_KUBERNETES_CHECKS, "labels"])
    return KubernetesSpec(**values)


_DISPATCHER_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "policy": _one_of("fifo", "priority", "skill", "fair-share"),
    "max_running": _int_in(1, 100_000),
    "max_retries": _int_in(0, 1000),
    "retry_backoff_s": _num_in(0, 24 * 3600),
    "retry_backoff_max_s": _num_in(0, 7 * 24 * 3600),
    "failure_strategy": _one_of("continue", "stop-all", "retry"),
    "max_memory_percent": _num_in(1, 100),
    "max_load_per_cpu": _optional_num(0, 10_000),
    "keep_finished": _int_in(0, 10_000_000),
    "logs": _is_str,
    "run_locally": _is_bool,
    "host_grace_s": _num_in(1, 7 * 24 * 3600),
}


def _read_host(r: _Reader, name: str, node: Node) -> HostConfig:
    sec = _Section(r, node, f"hosts.{name}")
    values: dict[str, Any] = {"name": name}
    checks: dict[str, Callable[[Any], str | None]] = {
        "address": _is_str, "key": _is_str, "known_hosts": _is_str, "accept_unknown_host_key": _is_bool,
        "max_concurrency": _int_in(1, 100_000), "workdir": _is_str,
    }  # fmt: skip
    values.update(sec.values(checks))
    address = values.get("address")
    if address is None:
        raise r.error(
            node, f"hosts.{name}: address is required (ssh://[user@]host[:port][/path/to/necrod.sock])"
        )
    if not re.fullmatch(r"ssh://(?:[^@/\s]+@)?[A-Za-z0-9._\[\]:-]+(?::\d+)?(?:/\S*)?", address) or re.match(
        r"ssh://(?:[^@/]+@)?-", address
    ):
        raise r.error(
            sec.node_of("address"), f"hosts.{name}.address must be ssh://[user@]host[:port][/socket]"
        )
    for key in ("pools", "skills", "labels"):
        item = sec.raw(key)
        if item is not None:
            values[key] = tuple(r.strings(item[1], f"hosts.{name}.{key}"))
    if not values.get("pools"):
        raise r.error(
            node, f"hosts.{name}: pools is required (the pools of that host's necrod to run tasks in)"
        )
    sec.finish([*checks, "pools", "skills", "labels"])
    return HostConfig(**values)


def _read_dispatcher(r: _Reader, node: Node) -> DispatcherConfig:
    sec = _Section(r, node, "dispatcher")
    values: dict[str, Any] = sec.values(_DISPATCHER_CHECKS)
    rules = _mapping_of(r, sec, "label_priority", _int_in(-1_000_000, 1_000_000))
    values["label_priority"] = tuple(rules.items())
    if sec.has("fair_share"):
        fs = _Section(r, sec.raw("fair_share")[1], "dispatcher.fair_share")  # type: ignore[index]
        half = fs.value("half_life_s", _num_in(1, 365 * 24 * 3600))
        if half is not _MISSING:
            values["fair_share_half_life_s"] = half
        key = fs.value("key", _one_of("project", "label"))
        if key is not _MISSING:
            values["fair_share_key"] = key
        weights = _mapping_of(r, fs, "weights", _num_in(0, 1e9, above=True))
        values["fair_share_weights"] = tuple((k, float(v)) for k, v in weights.items())
        fs.finish(["half_life_s", "key", "weights"])
    sec.finish([*_DISPATCHER_CHECKS, "label_priority", "fair_share"])
    return DispatcherConfig(**values)


def _resolve_pool(
    r: _Reader,
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
    problem = repo_url_problem(repo_url, daemon.allowed_protocols)
    if problem:
        raise r.error(repo_node, f"pools.{name}.repo_url {problem}")
    return PoolConfig(name=name, repo_url=repo_url, **merged)


def parse_config(text: str, file: str | None = None) -> Config:
    """Parse and validate a whole pools.yaml; raise ``ConfigError`` at the first problem."""
    r = _Reader(file)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        # PyYAML composes nested collections by recursion: a few hundred levels exhaust it.
        raise ConfigError(
            "nested too deeply to read (a few hundred levels of lists or mappings)", file=file
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise ConfigError(
            f"not valid YAML: {exc.problem or exc.context}",
            file=file,
            line=mark.line + 1 if mark else None,
            column=mark.column + 1 if mark else None,
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", file=file) from None
    if root is None:
        raise ConfigError("the config is empty (it needs at least a pools: section)", file=file)
    top = _Section(r, root, "config")

    daemon = DaemonConfig()
    if top.has("daemon"):
        daemon = _read_daemon(r, top.raw("daemon")[1])  # type: ignore[index]

    defaults: dict[str, Any] = {}
    if top.has("defaults"):
        dsec = _Section(r, top.raw("defaults")[1], "defaults")  # type: ignore[index]
        defaults, _ = _read_pool_options(r, dsec, allow_repo=False)

    pools: dict[str, PoolConfig] = {}
    marks: dict[str, tuple[int, int]] = {}
    if not top.has("pools"):
        raise r.error(root, "config: missing the pools: section")
    pools_node = top.raw("pools")[1]  # type: ignore[index]
    if isinstance(pools_node, ScalarNode) and pools_node.value in ("", "~", "null"):
        # Most likely a file cut short while being written: "no pools" must be said explicitly.
        raise r.error(pools_node, "pools: is empty; write pools: {} to run no pools")
    for name, (name_node, pool_node) in r.mapping(pools_node, "pools").items():
        problem = pool_name_problem(name)
        if problem:
            raise r.error(name_node, f"pools: invalid pool name {name!r}: {problem}")
        psec = _Section(r, pool_node, f"pools.{name}")
        repo_item = psec.items.get("repo_url")
        if repo_item is None:
            raise r.error(name_node, f"pools.{name}: repo_url is required")
        repo_url = r.scalar(repo_item[1], f"pools.{name}.repo_url")
        problem = _is_str(repo_url)
        if problem:
            raise r.error(repo_item[1], f"pools.{name}.repo_url {problem}")
        mark = repo_item[1].start_mark
        marks[f"pools.{name}.repo_url"] = (mark.line + 1, mark.column + 1)
        options, nodes = _read_pool_options(r, psec, allow_repo=True)
        pools[name] = _resolve_pool(
            r, name, options, nodes, defaults, repo_url, repo_item[1], daemon, name_node
        )
    runners: dict[str, RunnerProfile] = {}
    if top.has("runners"):
        for name, (name_node, node) in r.mapping(top.raw("runners")[1], "runners").items():  # type: ignore[index]
            problem = pool_name_problem(name)
            if problem:
                raise r.error(
                    name_node, f"runners: invalid profile name {name!r}: {problem.replace('pool', 'profile')}"
                )
            runners[name] = _read_runner(r, name, node, pools)
    dispatcher = DispatcherConfig()
    if top.has("dispatcher"):
        dispatcher = _read_dispatcher(r, top.raw("dispatcher")[1])  # type: ignore[index]
    hosts: dict[str, HostConfig] = {}
    if top.has("hosts"):
        for name, (name_node, node) in r.mapping(top.raw("hosts")[1], "hosts").items():  # type: ignore[index]
            problem = pool_name_problem(name)
            if problem or name == "local":
                why = problem.replace("pool", "host") if problem else "'local' is this daemon's own name"
                raise r.error(name_node, f"hosts: invalid host name {name!r}: {why}")
            hosts[name] = _read_host(r, name, node)
    known_pools = set(pools) | {p for h in hosts.values() for p in h.pools}
    for runner in runners.values():
        unknown = [p for p in runner.pools if p not in known_pools]
        if unknown:
            raise r.error(top.node_of("runners"), f"runners.{runner.name}.pools: no pool named {', '.join(unknown)} "
                          "here or on any host")  # fmt: skip
    top.finish(["daemon", "defaults", "pools", "runners", "dispatcher", "hosts"])
    return Config(daemon=daemon, pools=pools, runners=runners, dispatcher=dispatcher, hosts=hosts, source=file,
                  notes=tuple(r.notes), marks=marks)  # fmt: skip


def resolve_relative(config: Config, base_dir: str) -> Config:
    """Make relative local repo paths and the workspaces dir absolute against ``base_dir``."""
    pools = {}
    for name, pool in config.pools.items():
        path = local_repo_path(pool.repo_url)
        if path is not None and not path.startswith("/"):
            pool = replace(pool, repo_url=posixpath.normpath(posixpath.join(base_dir, path)))
        pools[name] = pool
    daemon = config.daemon
    if daemon.workspaces and not daemon.workspaces.startswith("/"):
        daemon = replace(daemon, workspaces=posixpath.normpath(posixpath.join(base_dir, daemon.workspaces)))
    dispatcher = config.dispatcher
    if dispatcher.logs and not dispatcher.logs.startswith("/"):
        dispatcher = replace(dispatcher, logs=posixpath.normpath(posixpath.join(base_dir, dispatcher.logs)))
    return replace(config, daemon=daemon, pools=pools, dispatcher=dispatcher)


def embedded_config(repo_path: str, pool_name: str) -> Config:
    """The config used when none is given: one pool of the repository necrod was started in."""
    return Config(pools={pool_name: PoolConfig(name=pool_name, repo_url=repo_path)})


def pool_name_for(directory: str) -> str:
    """A valid pool name derived from a directory's name."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", PurePosixPath(directory).name).lstrip("-.")[:64]
    return name or "repo"
