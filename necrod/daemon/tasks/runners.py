"""The launchers local runners are started with, behind ``necrod.io.launchers.Run``: process
and tmux, the container and Kubernetes launchers (loaded on first use), and the cgroups
runners are put in. Owns those objects and closing them; calls only their constructors and
``aclose``, and hands the Kubernetes launcher the dispatcher's ``spawn``."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from necrod.core.config import RunnerProfile
from necrod.daemon.tasks.runs import Spawn
from necrod.io.cgroups import runner_cgroups
from necrod.io.contained import MissingExtra, missing_extra
from necrod.io.launchers import ProcessLauncher, TmuxLauncher

if TYPE_CHECKING:
    from necrod.io.containers import ContainerLauncher
    from necrod.io.kubernetes import KubeLauncher


class Runners:
    def __init__(self, origin: str, state_dir: Path, spawn: Spawn) -> None:
        #: This daemon's id (``fleet.origin_id``): it names what its launchers leave behind.
        self.origin = origin
        self._spawn = spawn
        self.cgroup_parents = runner_cgroups(origin)
        self.cgroups = self.cgroup_parents.memory[1] if self.cgroup_parents.memory else None
        self.tmux = TmuxLauncher(state_dir / "tmux.sock", self.cgroup_parents)
        self.process = ProcessLauncher(self.cgroup_parents)
        self.launchers: dict[str, ProcessLauncher | TmuxLauncher] = {
            "process": self.process,
            "tmux": self.tmux,
        }

    def refusal(self, profile: RunnerProfile) -> str | None:
        """Why this host cannot start a runner of ``profile`` (its ``memory_limit`` or
        ``cpu_limit`` could not be enforced: ``LimitUnenforceable``'s words), or None.
        Containers and pods have theirs enforced by their runtime."""
        if profile.launcher not in self.launchers:
            return None
        why = self.cgroup_parents.unenforceable(profile.memory_limit, profile.cpu_limit)
        return f"runners.{profile.name}: {why}" if why is not None else None

    # The contained launchers load on first use: their HTTP client stacks (aiohttp, aiodocker,
    # kubernetes_asyncio) cost ~70 MB of memory and 0.5 s of start that a daemon without such
    # runners need not pay.
    # A config naming a launcher whose packages are missing is refused at load; this is for
    # runners found again after a restart whose profile is gone.
    @cached_property
    def containers(self) -> ContainerLauncher:
        if (problem := missing_extra("container")) is not None:
            raise MissingExtra(problem)
        from necrod.io.containers import ContainerLauncher

        return ContainerLauncher(self.origin)

    @cached_property
    def kube(self) -> KubeLauncher:
        if (problem := missing_extra("kubernetes")) is not None:
            raise MissingExtra(problem)
        from necrod.io.kubernetes import KubeLauncher

        return KubeLauncher(self.origin, self._spawn)

    async def aclose(self) -> None:
        """Close the contained launchers' clients."""
        for launcher in ("containers", "kube"):
            if launcher in self.__dict__:  # only if ever used
                await self.__dict__[launcher].aclose()
