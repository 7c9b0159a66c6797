"""Reading pools.yaml from disk: parse, make paths absolute, check local repositories exist."""

from __future__ import annotations

import grp
import os
import stat
from pathlib import Path

from necrod.core.config import Config, ConfigError, local_repo_path, parse_config, resolve_relative
from necrod.io.contained import missing_extra

#: A config file larger than this is refused before parsing (it would be a mistake, or hostile):
#: PyYAML is pure Python here, and 1 MiB of pool or runner entries takes ~9 s of CPU to parse
#: (4 MiB ~40 s). A thousand pools fit in ~100 KiB.
MAX_CONFIG_BYTES = 1 << 20

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def read_config_file(path: Path) -> bytes:
    """The bytes of ``path``, which must be a regular file of at most ``MAX_CONFIG_BYTES``;
    raise ``ConfigError`` otherwise.

    Symlinks are followed: a Kubernetes ConfigMap's pools.yaml is one. What they lead to is
    checked twice: with ``stat`` before opening (opening some devices does something: a tape
    rewinds, a watchdog arms), and with ``fstat`` on what was opened, without blocking
    (``O_NONBLOCK``: a FIFO with no writer would wait for ever), in case it was swapped between.
    The read stops one byte past the cap, so a file growing under us costs no more.
    """
    name = str(path)
    try:
        _check_regular(os.stat(path), name)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            _check_regular(os.fstat(fd), name)
            chunks = []
            left = MAX_CONFIG_BYTES + 1
            while left > 0 and (chunk := os.read(fd, min(left, 1 << 16))):
                chunks.append(chunk)
                left -= len(chunk)
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise ConfigError("no such file", file=name) from None
    except OSError as exc:
        raise ConfigError(f"cannot read it: {exc.strerror}", file=name) from None
    if left <= 0:
        raise ConfigError(
            f"the file is larger than {MAX_CONFIG_BYTES} bytes, the most a config may be", file=name
        )
    return b"".join(chunks)


def _check_regular(st: os.stat_result, name: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise ConfigError(f"it is {kind}, not a regular file: refused", file=name)
    if st.st_size > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"the file is {st.st_size} bytes; a config is at most {MAX_CONFIG_BYTES}", file=name
        )


def load_config(path: Path) -> Config:
    """Read, validate and resolve ``path``; raise ``ConfigError`` naming the file (and line)."""
    name = str(path)
    data = read_config_file(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (byte {exc.start})", file=name) from None
    # Against the directory the file is named in, not where a symlink leads: a ConfigMap's
    # pools.yaml links into a timestamped directory the kubelet deletes at the next update.
    config = resolve_relative(parse_config(text, name), str(path.absolute().parent))
    check_local_repos(config)
    check_slot_files(config)
    check_admin_group(config)
    check_launchers(config)
    return config


def check_launchers(config: Config) -> None:
    """A runner profile's launcher must have its packages installed (the ``containers`` and
    ``kubernetes`` extras): better refused here, naming the extra, than at its first task."""
    for name, runner in config.runners.items():
        problem = missing_extra(runner.launcher)
        if problem is not None:
            raise config.error_at(f"runners.{name}", f"runners.{name}: {problem}")


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


def check_slot_files(config: Config) -> None:
    """Each host file of a pool's ``files:`` must be a regular file necrod can read."""
    for pool in config.pools.values():
        key = f"pools.{pool.name}.files"
        for slot_path, host in pool.files:
            try:
                st = os.stat(host)
            except OSError as exc:
                raise config.error_at(key, f"{key}.{slot_path}: {host}: {exc.strerror}") from None
            if not stat.S_ISREG(st.st_mode):
                raise config.error_at(key, f"{key}.{slot_path}: {host} is not a regular file")
            if not os.access(host, os.R_OK):
                raise config.error_at(key, f"{key}.{slot_path}: {host} is not readable")
