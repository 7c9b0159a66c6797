"""pools.yaml: the schema, its defaults, and validation that points at the offending line.

Two spellings load: the native one (``daemon:``, ``defaults:``, ``pools:``) and the NecroCode one
(``num_slots``, ``cleanup_timeout``, ``lock_timeout``, ``cleanup_options``, ...), whose keys are
accepted as aliases of the native keys. A file is validated whole: the first problem found is
raised as a ``ConfigError`` carrying the file, line and column, and nothing is half applied.

Pure: no file system access here (``io.config_files`` reads the file and checks paths exist).
The rooms: ``model`` (the frozen objects), ``schema`` (reading nodes and checking values),
``urls`` (which repository URLs git may use), ``pools`` and ``runners`` (the section readers),
``parse`` (a whole file). Everything the rest of necrod uses is importable from here.
"""

from necrod.core.config.model import (
    Config,
    ConfigError,
    ContainerSpec,
    DaemonConfig,
    DispatcherConfig,
    HostConfig,
    KubernetesSpec,
    PoolConfig,
    PrepareConfig,
    RunnerProfile,
    SalvageLimits,
    SalvageRetention,
)
from necrod.core.config.parse import embedded_config, parse_config, pool_name_for, resolve_relative
from necrod.core.config.schema import parse_size
from necrod.core.config.urls import local_repo_path, repo_transport, repo_url_problem

__all__ = [
    "Config",
    "ConfigError",
    "ContainerSpec",
    "DaemonConfig",
    "DispatcherConfig",
    "HostConfig",
    "KubernetesSpec",
    "PoolConfig",
    "PrepareConfig",
    "RunnerProfile",
    "SalvageLimits",
    "SalvageRetention",
    "embedded_config",
    "local_repo_path",
    "parse_config",
    "parse_size",
    "pool_name_for",
    "repo_transport",
    "repo_url_problem",
    "resolve_relative",
]
