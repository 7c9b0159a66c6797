"""A real container engine for the tests: podman's Docker-compatible service on a private socket.

podman runs here once it uses runc and keeps ulimits within the sandbox's (crun fails on these
kernels' hybrid cgroups), so a ``containers.conf`` of our own says so. No registry is reachable:
the test image is a root file system of busybox-static, imported.

Where git must run inside the container, a second image: a ``debootstrap --variant=minbase
--include=git`` root file system of this machine's Debian release, from the mirror apt already
uses (about 40 s to build). The built file system is kept as a tar in a cache keyed by what went
into it (``$NECROD_TEST_CACHE``, else ``$XDG_CACHE_HOME/necrod-tests``, else
``~/.cache/necrod-tests``), so later runs on the same machine only import it (a few seconds).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
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

    def ours(self, image: str | None = None) -> list[str]:
        """Containers a necrod made (of ``image`` only, if given). The engine's store is the
        machine's: without ``image`` this also counts those of any other run going on."""
        only = ["--filter", f"ancestor={image}"] if image else []
        return self.podman(
            "ps", "-a", "--filter", "label=necrod.daemon", *only, "--format", "{{.Names}}"
        ).split()


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


# --- An image with git: debootstrap --variant=minbase --include=git --------------------------------

#: Tagged per use (``git_image``): the engine's store is the machine's, and another run of the
#: suite may be using its own copy at the same time.
GIT_IMAGE = "localhost/necrod-test/git"
GIT_PACKAGES = ("git",)
#: Part of the cache key: bump it when the recipe below changes what goes into the image.
GIT_RECIPE = 2
#: debootstrap takes about 40 s on these machines; a slow mirror gets this long.
BUILD_TIMEOUT_S = 900
#: What a container never needs, dropped before the file system is tarred (about half of it).
_TRIM = ("var/cache/apt", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/locale")
_SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class DebianSource:
    suite: str
    mirror: str
    arch: str
    keyring: str | None

    def key(self) -> str:
        recipe = {"suite": self.suite, "mirror": self.mirror, "arch": self.arch, "variant": "minbase",
                  "packages": sorted(GIT_PACKAGES), "recipe": GIT_RECIPE}  # fmt: skip
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _os_release() -> dict[str, str]:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return {}
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line)
    return {k: v.strip().strip('"') for k, v in pairs}


def _apt_sources() -> list[dict[str, str]]:
    """apt's ``deb`` entries (both formats), each with ``uri``, ``suites``, ``components`` and
    ``signed-by`` (possibly empty)."""
    entries = []
    one_line = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]
    for path in one_line:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            words = line.split("#", 1)[0].split()
            if not words or words[0] != "deb":
                continue
            words = words[1:]
            options = {}
            if words and words[0].startswith("["):
                while words:
                    word = words.pop(0)
                    for opt in word.strip("[]").split():
                        if "=" in opt:
                            options.update([opt.split("=", 1)])
                    if word.endswith("]"):
                        break
            if len(words) >= 2:
                entries.append({"uri": words[0], "suites": words[1], "components": " ".join(words[2:]),
                                "signed-by": options.get("signed-by", "")})  # fmt: skip
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        try:
            text = path.read_text()
        except OSError:
            continue
        for stanza in text.split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                name, value = line.split(":", 1)
                fields[name.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes") == "no":
                continue
            for uri in fields.get("uris", "").split():
                entries.append({"uri": uri, "suites": fields.get("suites", ""),
                                "components": fields.get("components", ""),
                                "signed-by": fields.get("signed-by", "")})  # fmt: skip
    return entries


def debian_source() -> DebianSource | str:
    """This machine's Debian release and the mirror apt fetches it from; or why there is none."""
    release = _os_release()
    suite = release.get("VERSION_CODENAME", "")
    if release.get("ID") != "debian" or not suite:
        return f"not a Debian machine (/etc/os-release: ID={release.get('ID')!r}, codename={suite!r})"
    for entry in _apt_sources():
        if suite in entry["suites"].split() and "main" in entry["components"].split():
            keyring = entry["signed-by"] if entry["signed-by"].startswith("/") else None
            arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                                  check=True).stdout.strip()  # fmt: skip
            return DebianSource(suite, entry["uri"], arch, keyring)
    return f"no apt source for {suite} main in /etc/apt/sources.list(.d)"


def _debootstrap() -> str | None:
    return shutil.which("debootstrap") or shutil.which("debootstrap", path=_SBIN_PATH)


def why_no_git_image() -> str | None:
    """Why the git image cannot be built here (skip outside CI, fail in CI), or None."""
    if _debootstrap() is None:
        return "debootstrap is not installed (.ci/run installs it)"
    if os.geteuid() != 0:
        return "debootstrap needs root"
    found = debian_source()
    return found if isinstance(found, str) else None


def cache_dir() -> Path:
    explicit = os.environ.get("NECROD_TEST_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "necrod-tests"


def _unmount_under(root: Path) -> None:
    """debootstrap mounts /proc and /sys (and may bind /dev) in its target while it installs; a
    build that dies leaves them: unmount them before anything is removed under ``root``."""
    prefix = str(root.resolve()) + "/"
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return
    points = [p.replace("\\040", " ") for line in lines if (p := line.split()[4]).startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)


def _apt_proxy_env() -> dict[str, str]:
    """The http proxy apt is configured with, for debootstrap's own downloads."""
    found = subprocess.run(["apt-config", "shell", "P", "Acquire::http::Proxy"], capture_output=True,
                           text=True, timeout=30)  # fmt: skip
    line = found.stdout.strip()
    if found.returncode != 0 or not line.startswith("P="):
        return {}
    proxy = line[2:].strip("'\"")
    return {"http_proxy": proxy} if proxy and proxy != "DIRECT" else {}


def build_git_rootfs(source: DebianSource, out: Path) -> float:
    """debootstrap the git image's file system and write it, trimmed, as the tar ``out``; return
    the seconds it took. Raises AssertionError, with debootstrap's own words, when it fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob("necrod-rootfs-*"):
        # Left by a build that was killed (one still running is younger than its budget).
        if stale.is_dir() and time.time() - stale.stat().st_mtime > BUILD_TIMEOUT_S + 300:
            _unmount_under(stale)
            shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix="necrod-rootfs-", dir=out.parent))
    root = work / "root"
    started = time.monotonic()
    try:
        cmd = [_debootstrap() or "debootstrap", "--variant=minbase", f"--include={','.join(GIT_PACKAGES)}",
               f"--arch={source.arch}"]  # fmt: skip
        if source.keyring:
            cmd.append(f"--keyring={source.keyring}")
        cmd += [source.suite, str(root), source.mirror]
        env = {**os.environ, **_apt_proxy_env(), "PATH": _SBIN_PATH, "LC_ALL": "C"}
        env.pop("DEBOOTSTRAP_DIR", None)
        try:
            built = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"debootstrap ran past {BUILD_TIMEOUT_S}s: {' '.join(cmd)}") from None
        if built.returncode != 0:
            debootstrap_log = root / "debootstrap" / "debootstrap.log"
            detail = debootstrap_log.read_text(errors="replace") if debootstrap_log.exists() else ""
            said = "\n".join(text[-3000:] for text in (built.stdout, built.stderr, detail))
            raise AssertionError(f"{' '.join(cmd)} failed ({built.returncode}):\n{said}")
        for leftover in _TRIM:
            shutil.rmtree(root / leftover, ignore_errors=True)
            (root / leftover).mkdir()
        partial = work / "rootfs.tar"
        subprocess.run(["tar", "--numeric-owner", "-C", str(root), "-cf", str(partial), "."], check=True,
                       capture_output=True, timeout=300)  # fmt: skip
        partial.replace(out)  # whole or not at all: a build cut short leaves no cache entry
        return time.monotonic() - started
    finally:
        _unmount_under(work)
        shutil.rmtree(work, ignore_errors=True)


def git_rootfs_tar(source: DebianSource) -> Path:
    """The cached tar of the git image's file system, built first if there is none."""
    tar = cache_dir() / f"git-rootfs-{source.suite}-{source.arch}-{source.key()}.tar"
    if not tar.is_file():
        build_git_rootfs(source, tar)
    return tar


def git_image(engine: Engine) -> Iterator[str]:
    """The git image in the engine's store for as long as the generator runs, removed after."""
    found = debian_source()
    assert not isinstance(found, str), found
    image = f"{GIT_IMAGE}:{uuid.uuid4().hex[:12]}"
    tar = git_rootfs_tar(found)
    imported = subprocess.run(["podman", "import", str(tar), image], env=engine.env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
    if imported.returncode != 0:
        # A damaged cache entry: build it again, once.
        tar.unlink(missing_ok=True)
        tar = git_rootfs_tar(found)
        engine.podman("import", str(tar), image)
    try:
        yield image
    finally:
        for name in engine.podman("ps", "-a", "--filter", f"ancestor={image}", "--format", "{{.Names}}",
                                  check=False).split():  # fmt: skip
            engine.podman("rm", "-f", "-t", "0", name, check=False)
        engine.podman("rmi", "-f", image, check=False)


class EngineRelay:
    """A Unix-socket relay in front of the engine's API, for a daemon to talk through:
    ``down()`` is an engine that went away (open connections cut, new ones refused), ``up()``
    brings it back at the same path. Only for fault injection: the engine itself stays up."""

    def __init__(self, upstream: str, path: Path) -> None:
        self.upstream = upstream.removeprefix("unix://")
        self.path = path
        self.url = f"unix://{path}"
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def up(self) -> EngineRelay:
        self.path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(self.path))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            cut, self._open = self._open, set()
        if listener is not None:
            listener.close()
        for s in cut:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self.path.unlink(missing_ok=True)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            server = socket.socket(socket.AF_UNIX)
            try:
                server.connect(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
