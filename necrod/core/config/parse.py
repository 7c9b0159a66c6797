"""A whole pools.yaml, read and validated at once; and the config used when there is none."""

from __future__ import annotations

import posixpath
import re
from dataclasses import replace
from pathlib import PurePosixPath
from typing import Any

import yaml
from yaml.nodes import ScalarNode

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
from necrod.core.config.schema import Reader, Section, is_str
from necrod.core.config.urls import local_repo_path
from necrod.core.names import pool_name_problem


def parse_config(text: str, file: str | None = None) -> Config:
    """Parse and validate a whole pools.yaml; raise ``ConfigError`` at the first problem."""
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

    daemon = DaemonConfig()
    if top.has("daemon"):
        daemon = read_daemon(r, top.raw("daemon")[1])  # type: ignore[index]

    defaults: dict[str, Any] = {}
    if top.has("defaults"):
        dsec = Section(r, top.raw("defaults")[1], "defaults")  # type: ignore[index]
        defaults, _ = read_pool_options(r, dsec, allow_repo=False)

    pools: dict[str, PoolConfig] = {}
    marks: dict[str, tuple[int, int]] = {}
    if not top.has("pools") and not top.has("hosts"):
        raise r.error(root, "config: missing the pools: section")
    # A dispatch-only config (hosts and runners: tasks run on other hosts' pools) needs none.
    pools_item = top.raw("pools")
    pool_items = {}
    if pools_item is not None:
        pools_node = pools_item[1]
        if isinstance(pools_node, ScalarNode) and pools_node.value in ("", "~", "null"):
            # Most likely a file cut short while being written: "no pools" must be said explicitly.
            raise r.error(pools_node, "pools: is empty; write pools: {} to run no pools")
        pool_items = r.mapping(pools_node, "pools")
    for name, (name_node, pool_node) in pool_items.items():
        problem = pool_name_problem(name)
        if problem:
            raise r.error(name_node, f"pools: invalid pool name {name!r}: {problem}")
        psec = Section(r, pool_node, f"pools.{name}")
        repo_item = psec.items.get("repo_url")
        if repo_item is None:
            raise r.error(name_node, f"pools.{name}: repo_url is required")
        repo_url = r.scalar(repo_item[1], f"pools.{name}.repo_url")
        problem = is_str(repo_url)
        if problem:
            raise r.error(repo_item[1], f"pools.{name}.repo_url {problem}")
        mark = repo_item[1].start_mark
        marks[f"pools.{name}.repo_url"] = (mark.line + 1, mark.column + 1)
        options, nodes = read_pool_options(r, psec, allow_repo=True)
        if "files" in nodes:
            mark = nodes["files"].start_mark
            marks[f"pools.{name}.files"] = (mark.line + 1, mark.column + 1)
        pools[name] = resolve_pool(
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
            runners[name] = read_runner(r, name, node, pools)
            marks[f"runners.{name}"] = (name_node.start_mark.line + 1, name_node.start_mark.column + 1)
    dispatcher = DispatcherConfig()
    if top.has("dispatcher"):
        dispatcher = read_dispatcher(r, top.raw("dispatcher")[1])  # type: ignore[index]
    hosts: dict[str, HostConfig] = {}
    if top.has("hosts"):
        for name, (name_node, node) in r.mapping(top.raw("hosts")[1], "hosts").items():  # type: ignore[index]
            problem = pool_name_problem(name)
            if problem or name == "local":
                why = problem.replace("pool", "host") if problem else "'local' is this daemon's own name"
                raise r.error(name_node, f"hosts: invalid host name {name!r}: {why}")
            hosts[name] = read_host(r, name, node)
    known_pools = set(pools) | {p for h in hosts.values() for p in h.pools}
    for runner in runners.values():
        unknown = [p for p in runner.pools or () if p not in known_pools]
        if unknown:
            raise r.error(top.node_of("runners"), f"runners.{runner.name}.pools: no pool named {', '.join(unknown)} "
                          "here or on any host")  # fmt: skip
    if dispatcher.default_runner is not None and dispatcher.default_runner not in runners:
        raise r.error(top.node_of("dispatcher"), f"dispatcher.default_runner: no runner profile named "
                      f"{dispatcher.default_runner!r}")  # fmt: skip
    top.finish(["daemon", "defaults", "pools", "runners", "dispatcher", "hosts"])
    return Config(daemon=daemon, pools=pools, runners=runners, dispatcher=dispatcher, hosts=hosts, source=file,
                  notes=tuple(r.notes), marks=marks)  # fmt: skip


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
