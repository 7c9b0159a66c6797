"""Reading pools.yaml from disk: parse, make paths absolute, check local repositories exist."""

from __future__ import annotations

import grp
import os
from pathlib import Path

from necrod.core.config import Config, ConfigError, local_repo_path, parse_config, resolve_relative

#: A config file larger than this is refused before parsing (it would be a mistake, or hostile).
MAX_CONFIG_BYTES = 4 << 20


def load_config(path: Path) -> Config:
    """Read, validate and resolve ``path``; raise ``ConfigError`` naming the file (and line)."""
    name = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"the file is {size} bytes; a config is at most {MAX_CONFIG_BYTES}", file=name)
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("no such file", file=name) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (byte {exc.start})", file=name) from None
    except OSError as exc:
        raise ConfigError(f"cannot read it: {exc.strerror}", file=name) from None
    # Against the directory the file is named in, not where a symlink leads: a ConfigMap's
    # pools.yaml links into a timestamped directory the kubelet deletes at the next update.
    config = resolve_relative(parse_config(text, name), str(path.absolute().parent))
    check_local_repos(config)
    check_admin_group(config)
    return config


def check_admin_group(config: Config) -> None:
    """``daemon.admin_group`` must name a group that exists: a typo would leave no admin but root."""
    group = config.daemon.admin_group
    if group is None:
        return
    try:
        grp.getgrnam(group)
    except KeyError:
        raise config.error_at("daemon.admin_group", f"daemon.admin_group: no group named {group!r}") from None


def check_local_repos(config: Config) -> None:
    """A local ``repo_url`` must be an existing git repository (bare or not)."""
    for pool in config.pools.values():
        local = local_repo_path(pool.repo_url)
        if local is None:
            continue
        p = Path(local)
        key = f"pools.{pool.name}.repo_url"
        if not p.is_dir():
            raise config.error_at(key, f"{key}: {local} is not a directory")
        if not ((p / ".git").exists() or ((p / "HEAD").is_file() and (p / "objects").is_dir())):
            raise config.error_at(key, f"{key}: {local} is not a git repository")
        if not os.access(p, os.R_OK | os.X_OK):
            raise config.error_at(key, f"{key}: {local} is not readable")
