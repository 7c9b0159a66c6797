"""``necrod``: the command line of the daemon."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import anyio

from necrod import __version__, paths
from necrod.core.config import Config, ConfigError, embedded_config, pool_name_for
from necrod.daemon.app import Daemon, Settings, StartupError
from necrod.io import logs, overlay
from necrod.io.config_files import load_config
from necrod.io.instance import AlreadyRunning


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="necrod",
        allow_abbrev=False,
        description="Serve pools of clean git worktrees over a Unix socket. With no config, serves the "
        "git repository it is started in (2 slots). `necrod mcp` is the MCP server for agents "
        "(`necrod mcp --help`).",
    )
    p.add_argument(
        "--config",
        type=Path,
        help="pools.yaml (default: $NECROD_CONFIG, "
        "$CONFIGURATION_DIRECTORY/pools.yaml, ~/.config/necrod/pools.yaml, else the embedded default)",
    )
    p.add_argument(
        "--socket",
        type=Path,
        help="socket path (default: $NECROD_SOCKET, $RUNTIME_DIRECTORY/necrod.sock, "
        "$XDG_RUNTIME_DIR/necrod/necrod.sock, else /tmp/necrod-<uid>/necrod.sock)",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        help="state directory (default: $NECROD_STATE_DIR, $STATE_DIRECTORY, "
        "$XDG_STATE_HOME/necrod, else ~/.local/state/necrod)",
    )
    p.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        help="default: journal (native entries, with fields) when stderr is systemd's journal, "
        "console on a terminal ($NO_COLOR turns its colours off), json otherwise",
    )
    p.add_argument(
        "--log-level",
        default=os.environ.get("NECROD_LOG_LEVEL", "info"),
        choices=("debug", "info", "warning", "error"),
    )
    p.add_argument(
        "--check-config",
        type=Path,
        metavar="PATH",
        help="validate PATH, print every problem (FILE:LINE:COLUMN: MESSAGE, one a line) and exit 0 (valid) or 1",
    )
    p.add_argument(
        "--print-schema",
        action="store_true",
        help="print the JSON Schema of pools.yaml (for editors: see docs/configuration.md) and exit",
    )
    p.add_argument("--version", action="version", version=f"necrod {__version__}")
    return p


def find_repository(start: Path) -> Path | None:
    """The top of the git repository containing ``start`` (read from disk, git is not run)."""
    for d in (start, *start.parents):
        if (d / ".git").exists():
            return d
        if (d / "HEAD").is_file() and (d / "objects").is_dir() and (d / "refs").is_dir():
            return d
    return None


def _config(args: argparse.Namespace) -> tuple[Config, Path | None]:
    path = args.config or paths.config_path()
    if path is not None:
        return load_config(path), path
    repo = find_repository(Path.cwd())
    if repo is None:
        raise StartupError(
            "no config given and not inside a git repository: pass --config pools.yaml, "
            "or start necrod inside the repository to serve"
        )
    return embedded_config(str(repo), pool_name_for(str(repo))), None


def _watch_children_with_pidfds() -> None:
    """On Python 3.11 asyncio watches each child (every git) with a thread of its own; a pidfd
    watcher is about half the cost per process start (3.12 does this by itself)."""
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return  # the kernel has no pidfds
    asyncio.set_child_watcher(asyncio.PidfdChildWatcher())


def main(argv: list[str] | None = None) -> int:
    # First, before any thread: what necrod starts gets none of its capabilities.
    overlay.keep_capabilities_to_ourselves()
    args = _parser().parse_args(argv)
    if args.print_schema:
        import json

        from necrod.core.config.schemadoc import pools_yaml_schema

        print(json.dumps(pools_yaml_schema(), indent=2))
        return 0
    if args.check_config is not None:
        try:
            config = load_config(args.check_config)
        except ConfigError as exc:
            # One line per problem, as compilers print them: editors and CI jump to each.
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            count = len(exc.problems)
            print(f"necrod: {args.check_config}: {count} problem{'s' if count > 1 else ''}; nothing was loaded",
                  file=sys.stderr)  # fmt: skip
            return 1
        print(
            f"{args.check_config}: ok ({len(config.pools)} pool(s): {', '.join(sorted(config.pools)) or 'none'})"
        )
        for note in config.notes:
            print(f"note: {note}")
        return 0

    logs.configure(args.log_format, args.log_level)
    try:
        config, config_path = _config(args)
    except (ConfigError, StartupError) as exc:
        print(f"necrod: {exc}", file=sys.stderr)
        return 1
    settings = Settings(
        socket=(args.socket or paths.socket_path()).absolute(),
        state_dir=(args.state_dir or paths.state_dir()).absolute(),
        config_path=config_path.absolute() if config_path else None,
    )
    if config_path is None:
        ((name, pool),) = config.pools.items()
        env_hint = "" if settings.socket == paths.socket_path() else f"NECROD_SOCKET={settings.socket} "
        print(
            f"necrod: no config given; serving pool {name!r} ({pool.slots} slots) of {pool.repo_url}\n"
            f"necrod: socket {settings.socket}, state in {settings.state_dir}\n"
            f"necrod: reach it with: {env_hint}necroctl status   (then: necroctl allocate {name})",
            file=sys.stderr,
            flush=True,
        )
    daemon = Daemon(settings, config)
    _watch_children_with_pidfds()
    try:
        return anyio.run(daemon.run)
    except AlreadyRunning as exc:
        print(f"necrod: {exc}; not starting a second one", file=sys.stderr)
        return 1
    except StartupError as exc:
        print(f"necrod: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
