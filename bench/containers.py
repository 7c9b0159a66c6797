"""A container engine for item 8: podman's Docker-API service on a socket in the scratch directory.

Set up as ``tests/containers.py`` does (runc, ulimits within the sandbox's, no registry: a root
file system of busybox-static imported as an image), but owned by the bench run: the service is
a child of ``Scratch``, the image has a name of this run's own (a test suite running at the same
time keeps its image and containers), and ``close``, registered with ``Scratch.at_close``,
removes every container of that image (left running by a daemon that stopped), the image and
the service, also on Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from bench.scratch import Scratch

CONTAINERS_CONF = """\
[engine]
runtime = "runc"
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
"""
APPLETS = ("sh", "cat", "echo", "sleep", "true", "adjtimex")


def why_not() -> str | None:
    """Why no engine can run here, or None."""
    for tool in ("podman", "runc", "busybox"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (podman, runc and busybox-static are needed)"
    return None


class Engine:
    def __init__(self, scratch: Scratch) -> None:
        self.scratch = scratch
        self.work = scratch.path("engine")
        self.work.mkdir(exist_ok=True)
        self.socket = self.work / "podman.sock"
        self.docker_host = f"unix://{self.socket}"
        self.image = f"localhost/necrod-bench/busybox:{scratch.root.name.lower()}"
        self.env = {**os.environ, "CONTAINERS_CONF": str(self.work / "containers.conf")}
        self.service: subprocess.Popen[bytes] | None = None
        self.imported = False

    def podman(self, *args: str, check: bool = True, input: bytes | None = None) -> str:
        result = subprocess.run(
            ["podman", *args], env=self.env, input=input, capture_output=True, timeout=120
        )
        if check and result.returncode != 0:
            error = result.stderr.decode(errors="replace").strip().splitlines()
            raise RuntimeError(f"podman {args[0]} failed: {error[-1] if error else result.returncode}")
        return result.stdout.decode().strip()

    def start(self) -> Engine:
        self.scratch.at_close(self.close)
        (self.work / "containers.conf").write_text(CONTAINERS_CONF)
        tar = subprocess.run(
            ["tar", "-C", str(_rootfs(self.work / "rootfs")), "-c", "."], capture_output=True, check=True
        ).stdout
        self.imported = True
        self.podman("import", "-", self.image, input=tar)
        # In the scratch directory: conmon drops an ``oom`` file in its working directory.
        self.service = self.scratch.spawn(
            ["podman", "system", "service", "--time=0", self.docker_host],
            log=self.work / "service.log", env=self.env, cwd=self.work,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.service.poll() is not None or time.monotonic() > deadline:
                tail = (self.work / "service.log").read_text(errors="replace").strip().splitlines()
                raise RuntimeError(f"podman system service did not start: {tail[-1] if tail else '?'}")
            time.sleep(0.05)
        return self

    def close(self) -> None:
        if self.imported:
            ours = self.podman("ps", "-aq", "--filter", f"ancestor={self.image}", check=False).split()
            if ours:
                self.podman("rm", "-f", "-t", "0", *ours, check=False)
            self.podman("rmi", "-f", self.image, check=False)
            self.imported = False
        if self.service is not None:
            self.scratch.stop(self.service)
            self.service = None


def _rootfs(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    shutil.copy(shutil.which("busybox") or "", root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    for d in ("tmp", "proc", "sys", "dev", "etc", "run/necrod"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "etc" / "passwd").write_text("root:x:0:0::/:/bin/sh\nagent:x:1000:100::/tmp:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\nusers:x:100:\n")
    return root
