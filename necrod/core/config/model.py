"""What a loaded pools.yaml is: the frozen config objects, their defaults, and ``ConfigError``.

Pure data: nothing here reads YAML (``schema`` and the section readers do that).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

WEEK_S = 7 * 24 * 3600.0
#: The most ports one lease may take.
MAX_LEASE_PORTS = 64
GIB = 1 << 30
MIB = 1 << 20
#: Room for a few whole 1 MiB request lines per uid (a quarter of the budget each).
MIN_BUFFERED_BYTES = 8 * MIB

#: What a pool's ``lfs:`` may say (``core.lfs`` says what each does).
LfsMode = Literal[False, True, "pointers"]

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
        #: Each problem, when this error stands for several (``combined``); else just itself.
        self.problems: tuple[ConfigError, ...] = (self,)
        super().__init__(str(self))

    @classmethod
    def combined(cls, errors: list[ConfigError]) -> ConfigError:
        """One error for several, in file order: the first's place, every message in its text."""
        ordered = sorted(errors, key=lambda e: (e.line or 0, e.column or 0))
        if len(ordered) == 1:
            return ordered[0]
        first = ordered[0]
        rest = "; ".join(
            (f"line {e.line}:{e.column}: " if e.line is not None else "") + e.message for e in ordered[1:]
        )
        error = cls(f"{first.message} (and {len(ordered) - 1} more: {rest})", file=first.file,
                    line=first.line, column=first.column)  # fmt: skip
        error.problems = tuple(ordered)
        return error

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
            "problems": [{"message": e.message, "line": e.line, "column": e.column} for e in self.problems],
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
    #: Leases one uid that is not an admin may hold and wait for at once, over every pool.
    max_leases_per_uid: int = 64
    #: Unfinished tasks (queued, blocked, running) one uid that is not an admin may have.
    max_tasks_per_uid: int = 10_000
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
    #: TCP ports leases take their blocks from (``ports:``), both ends included.
    port_range: tuple[int, int] = (20000, 29999)


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
class PrepareConfig:
    """A pool's prepare step (``prepare:``): run in a clean checkout at the base, once per key;
    what it writes is in every slot of that key (docs/configuration.md)."""

    #: A list of arguments, or one string for ``sh -c``.
    command: str | tuple[str, ...]
    #: Paths or globs in the repository whose content (with the command and ``env``) is the key.
    key_files: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    timeout_s: float = 1800.0


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
    #: Git LFS: False (pointer files, necrod takes no part), True (real content, smudged from
    #: the mirror's LFS store) or "pointers" (pointer files, kept so); see ``core.lfs``.
    lfs: LfsMode = False
    salvage: bool = True
    #: ``salvage: always``: a task that succeeded is salvaged too (a container with no network
    #: has no other way to hand its work back).
    salvage_succeeded: bool = False
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
    prepare: PrepareConfig | None = None
    #: Consecutive free TCP ports each lease gets from ``daemon.port_range`` (0: none).
    ports: int = 0
    #: Files git does not carry, copied into every slot: (path in the slot, path on the host).
    files: tuple[tuple[str, str], ...] = ()
    #: Submodules checked out in slots from the host's submodule mirrors: False (left empty),
    #: True, or "recursive" (their submodules too).
    submodules: bool | str = False
    #: Directories its slots hold besides the top-level files (cone mode); () is everything.
    sparse: tuple[str, ...] = ()
    #: The mirror's partial-clone filter (``blob:none``, ``blob:limit=N``), or None: every object.
    filter: str | None = None

    @property
    def clean_flags(self) -> str:
        """``git clean``'s: a prepare step's output is ignored files, kept like a build cache."""
        return "-ffdx" if self.cleanup == "full" and self.prepare is None else "-ffd"

    @property
    def salvage_limits(self) -> SalvageLimits:
        return SalvageLimits(self.salvage_max_bytes, self.salvage_max_files, self.salvage_max_file_bytes)

    @property
    def salvage_retention(self) -> SalvageRetention:
        return SalvageRetention(self.salvage_keep_days, self.salvage_keep_count, self.salvage_keep_bytes)


LAUNCHERS = ("process", "tmux", "container", "kubernetes")
#: Slot kinds (``isolation:``): how a pool's slots stand on its mirror (``daemon/slotkinds``).
ISOLATIONS = ("worktree", "shared-clone", "overlay")


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
    #: Pools this profile serves (None, the key left out: all; an empty list: none).
    pools: tuple[str, ...] | None = None
    env: tuple[tuple[str, str], ...] = ()
    memory_limit: int | None = None
    #: CPUs its runners may use at most (1.5: one and a half), enforced with the cgroup CPU controller.
    cpu_limit: float | None = None
    timeout_s: float | None = None
    #: Stop a runner that writes no output for this long (None: never).
    output_timeout_s: float | None = None
    #: TTL of the task's lease: the runner must heartbeat within it.
    lease_ttl_s: float = 300.0
    #: Between SIGTERM and SIGKILL when a runner is stopped.
    grace_s: float = 10.0
    container: ContainerSpec | None = None
    kubernetes: KubernetesSpec | None = None
    #: Ports its tasks' leases get (None: the pool's ``ports``).
    ports: int | None = None
    #: Directories its tasks' slots hold (None: the pool's ``sparse``; a task's own wins).
    sparse: tuple[str, ...] | None = None
    #: ``always``: salvage the slot of a task that succeeded too (else only of one that did not).
    salvage: str = "on-failure"
    #: ``salvage``: a retry starts from the previous attempt's salvage instead of the base.
    resume: str = "base"
    #: Whose tasks it runs: ``anyone`` or ``admins``; None: anyone's where its runners have a
    #: uid of their own (``runs_as_own_uid``), else only admins' (docs/operations.md, Peers).
    submitters: str | None = None

    def runs_as_own_uid(self, daemon_uid: int) -> bool:
        """Whether its runners run as a uid that is not an admin: a container's or pod's
        ``user`` other than root and the daemon's (``process`` and ``tmux`` run as the daemon's)."""
        boundary = self.container or self.kubernetes
        return boundary is not None and int(boundary.user.split(":")[0]) not in (0, daemon_uid)

    def open_to_anyone(self, daemon_uid: int) -> bool:
        """Whether a peer that is not an admin may have tasks run here (``submitters``)."""
        if self.submitters is not None:
            return self.submitters == "anyone"
        return self.runs_as_own_uid(daemon_uid)


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
    #: The profile of tasks that name no profile and no skills (None: their own command, as a process).
    default_runner: str | None = None


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
