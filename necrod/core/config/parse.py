"""A whole pools.yaml, read and validated at once; and the config used when there is none."""

from __future__ import annotations

import posixpath
import re
from dataclasses import replace
from pathlib import PurePosixPath
from typing import Any

import yaml
from yaml.nodes import Node, ScalarNode

from necrod.core.config.model import (
    Config,
    ConfigError,
    DaemonConfig,
    DispatcherConfig,
    HostConfig,
    PoolConfig,
    RunnerProfile,
)
from necrod.core.config.pools import read_daemon, read_pool_options, resolve_pool
from necrod.core.config.runners import read_dispatcher, read_host, read_runner
from necrod.core.config.schema import Reader, Reported, Section, is_str
from necrod.core.config.urls import local_repo_path
from necrod.core.names import pool_name_problem


def parse_config(text: str, file: str | None = None) -> Config:
    """Parse and validate a whole pools.yaml; raise one ``ConfigError`` for every problem found
    (``problems`` lists them; its line is the first's). A YAML syntax error stops at once."""
    r = Reader(file)
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
    top = Section(r, root, "config")

    def section(key: str) -> Node:
        return top.raw(key)[1]  # type: ignore[index]

    daemon = DaemonConfig()
    if top.has("daemon"):
        daemon = r.attempt(lambda: read_daemon(r, section("daemon"))) or daemon

    defaults: dict[str, Any] = {}
    if top.has("defaults"):
        read = r.attempt(
            lambda: read_pool_options(r, Section(r, section("defaults"), "defaults"), allow_repo=False)
        )
        defaults = read[0] if read else {}

    pools: dict[str, PoolConfig] = {}
    marks: dict[str, tuple[int, int]] = {}
    if not top.has("pools") and not top.has("hosts"):
        raise r.error(root, "config: missing the pools: section")
    # A dispatch-only config (hosts and runners: tasks run on other hosts' pools) needs none.
    pool_items: dict[str, tuple[Node, Node]] = {}
    if top.has("pools"):
        pools_node = section("pools")
        if isinstance(pools_node, ScalarNode) and pools_node.value in ("", "~", "null"):
            # Most likely a file cut short while being written: "no pools" must be said explicitly.
            raise r.error(pools_node, "pools: is empty; write pools: {} to run no pools")
        pool_items = r.attempt(lambda: r.mapping(pools_node, "pools")) or {}
    for name, (name_node, pool_node) in pool_items.items():
        pool = r.attempt(lambda: _read_pool(r, name, name_node, pool_node, defaults, daemon, marks))  # noqa: B023 (called at once)
        if pool is not None:
            pools[name] = pool
    runners: dict[str, RunnerProfile] = {}
    runner_names: set[str] = set()
    if top.has("runners"):
        for name, (name_node, node) in (
            r.attempt(lambda: r.mapping(section("runners"), "runners")) or {}
        ).items():
            runner_names.add(name)
            problem = pool_name_problem(name)
            if problem:
                r.report(
                    name_node, f"runners: invalid profile name {name!r}: {problem.replace('pool', 'profile')}"
                )
                continue
            runner = r.attempt(lambda: read_runner(r, name, node, pools))  # noqa: B023 (called at once)
            if runner is not None:
                runners[name] = runner
                marks[f"runners.{name}"] = (name_node.start_mark.line + 1, name_node.start_mark.column + 1)
    dispatcher = DispatcherConfig()
    if top.has("dispatcher"):
        dispatcher = r.attempt(lambda: read_dispatcher(r, section("dispatcher"))) or dispatcher
    hosts: dict[str, HostConfig] = {}
    if top.has("hosts"):
        for name, (name_node, node) in (
            r.attempt(lambda: r.mapping(section("hosts"), "hosts")) or {}
        ).items():
            problem = pool_name_problem(name)
            if problem or name == "local":
                why = problem.replace("pool", "host") if problem else "'local' is this daemon's own name"
                r.report(name_node, f"hosts: invalid host name {name!r}: {why}")
                continue
            host = r.attempt(lambda: read_host(r, name, node))  # noqa: B023 (called at once)
            if host is not None:
                hosts[name] = host
    # Pools that failed to read still exist as names: a runner naming one is not wrong too.
    known_pools = set(pool_items) | {p for h in hosts.values() for p in h.pools}
    for runner in runners.values():
        unknown = [p for p in runner.pools or () if p not in known_pools]
        if unknown:
            r.report(top.node_of("runners"), f"runners.{runner.name}.pools: no pool named {', '.join(unknown)} "
                     "here or on any host")  # fmt: skip
    if dispatcher.default_runner is not None and dispatcher.default_runner not in runner_names:
        r.report(top.node_of("dispatcher"), f"dispatcher.default_runner: no runner profile named "
                 f"{dispatcher.default_runner!r}")  # fmt: skip
    top.finish(list(TOP_KEYS))
    r.raise_errors()
    return Config(daemon=daemon, pools=pools, runners=runners, dispatcher=dispatcher, hosts=hosts, source=file,
                  notes=tuple(r.notes), marks=marks)  # fmt: skip


#: The top-level sections of pools.yaml.
TOP_KEYS = ("daemon", "defaults", "pools", "runners", "dispatcher", "hosts")


def _read_pool(r: Reader, name: str, name_node: Node, pool_node: Node, defaults: dict[str, Any],
               daemon: DaemonConfig, marks: dict[str, tuple[int, int]]) -> PoolConfig:  # fmt: skip
    problem = pool_name_problem(name)
    if problem:
        raise r.error(name_node, f"pools: invalid pool name {name!r}: {problem}")
    psec = Section(r, pool_node, f"pools.{name}")
    repo_item = psec.items.get("repo_url")

    def repo() -> str:
        if repo_item is None:
            raise r.error(name_node, f"pools.{name}: repo_url is required")
        url = r.scalar(repo_item[1], f"pools.{name}.repo_url")
        problem = is_str(url)
        if problem:
            raise r.error(repo_item[1], f"pools.{name}.repo_url {problem}")
        return str(url)

    # The other keys are checked even when repo_url is wrong: their problems are worth knowing too.
    repo_url = r.attempt(repo)
    options, nodes = read_pool_options(r, psec, allow_repo=True)
    if repo_url is None or repo_item is None:
        raise Reported
    mark = repo_item[1].start_mark
    marks[f"pools.{name}.repo_url"] = (mark.line + 1, mark.column + 1)
    if "files" in nodes:
        mark = nodes["files"].start_mark
        marks[f"pools.{name}.files"] = (mark.line + 1, mark.column + 1)
    return resolve_pool(r, name, options, nodes, defaults, repo_url, repo_item[1], daemon, name_node)


def resolve_relative(config: Config, base_dir: str) -> Config:
    """Make relative local repo paths, ``files:`` and the workspaces dir absolute against ``base_dir``."""
    pools = {}
    for name, pool in config.pools.items():
        path = local_repo_path(pool.repo_url)
        if path is not None and not path.startswith("/"):
            pool = replace(pool, repo_url=posixpath.normpath(posixpath.join(base_dir, path)))
        if pool.files:
            files = tuple(
                (slot, posixpath.normpath(posixpath.join(base_dir, host))) for slot, host in pool.files
            )
            pool = replace(pool, files=files)
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
