"""A real container engine for the tests: podman's Docker-compatible service on a private socket.

podman runs here once it uses runc and keeps ulimits within the sandbox's (crun fails on these
kernels' hybrid cgroups), so a ``containers.conf`` of our own says so. No registry is reachable:
the test image is a root file system of busybox-static, imported.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

IMAGE = "localhost/necrod-test/busybox:latest"
CONTAINERS_CONF = """\
[engine]
runtime = "runc"
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
"""


@dataclass(frozen=True)
class Engine:
    docker_host: str
    env: dict[str, str]

    def podman(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed: {result.stderr}")
        return result.stdout.strip()

    def ours(self) -> list[str]:
        return self.podman("ps", "-a", "--filter", "label=necrod.daemon", "--format", "{{.Names}}").split()


def why_no_engine() -> str | None:
    for tool in ("podman", "runc", "busybox", "gcc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (.ci/run installs podman, runc and busybox-static)"
    return None


def busybox_rootfs(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    shutil.copy(shutil.which("busybox") or "", root / "bin" / "busybox")
    for applet in (
        "sh",
        "cat",
        "echo",
        "sleep",
        "id",
        "touch",
        "ls",
        "mkdir",
        "rm",
        "head",
        "seq",
        "tr",
        "stat",
    ):
        (root / "bin" / applet).symlink_to("busybox")
    source = Path(__file__).parent / "data" / "rpc.c"
    subprocess.run(
        ["gcc", "-static", "-O2", "-o", str(root / "bin" / "rpc"), str(source)], check=True, timeout=120
    )
    for d in ("tmp", "proc", "sys", "dev", "etc", "run/necrod"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "etc" / "passwd").write_text("root:x:0:0::/:/bin/sh\nagent:x:1000:100::/tmp:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\nusers:x:100:\n")
    return root


def start_engine(work: Path) -> Iterator[Engine]:
    conf = work / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    sock = work / "podman.sock"
    engine = Engine(f"unix://{sock}", env)
    rootfs = busybox_rootfs(work / "rootfs")
    tar = subprocess.run(["tar", "-C", str(rootfs), "-c", "."], capture_output=True, check=True).stdout
    subprocess.run(
        ["podman", "import", "-", IMAGE], input=tar, env=env, capture_output=True, check=True, timeout=120
    )
    # In the scratch directory: conmon drops an ``oom`` file in its working directory when a
    # container runs out of memory.
    service = subprocess.Popen(["podman", "system", "service", "--time=0", engine.docker_host], env=env, cwd=work,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if time.monotonic() > deadline or service.poll() is not None:
                raise AssertionError("podman system service did not start")
            time.sleep(0.05)
        yield engine
    finally:
        for name in engine.ours():
            engine.podman("rm", "-f", name, check=False)
        service.terminate()
        service.wait(timeout=30)
