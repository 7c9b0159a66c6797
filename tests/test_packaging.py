"""Packaging as someone installing necrod meets it: a license, a build-system floor that really
builds, the dependencies a plain pool needs and no more, and a clear word naming the extra when
a runner profile needs the container or Kubernetes clients."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

from necrod.io.contained import EXTRAS
from tests.helpers import Necrod, pool_config, wait_for

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: The modules only the container and Kubernetes launchers use.
EXTRA_MODULES = ("aiodocker", "kubernetes_asyncio", "aiohttp")
#: Runs necrod as installed without the extras: their modules cannot be imported.
WITHOUT_EXTRAS = (
    "import sys\n"
    f"for name in {EXTRA_MODULES!r}:\n"
    "    sys.modules[name] = None\n"
    "from necrod.daemon.main import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_the_license_is_apache_2_0_as_pyproject_says() -> None:
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_a_plain_pool_requires_neither_launchers_client() -> None:
    required = " ".join(PYPROJECT["project"]["dependencies"]).lower()
    assert "aiodocker" not in required and "kubernetes" not in required
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert any(d.startswith("aiodocker") for d in extras["containers"])
    assert any(d.startswith("kubernetes_asyncio") for d in extras["kubernetes"])
    # The README's test command installs .[test]: that must bring what the tests import.
    assert "necrod[containers,kubernetes]" in extras["test"]
    readme = (ROOT / "README.md").read_text()
    assert "pip install -q -e '.[test]'" in readme
    assert {extra for extra, _ in EXTRAS.values()} == {"containers", "kubernetes"}


@pytest.mark.slow
def test_the_build_system_floor_builds_a_wheel_with_the_license_and_the_extras(tmp_path: Path) -> None:
    (floor,) = PYPROJECT["build-system"]["requires"]
    m = re.fullmatch(r"setuptools>=([0-9.]+)", floor)
    assert m, f"build-system.requires should be one setuptools floor, not {floor!r}"
    env_dir = tmp_path / "floor"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "-q"]
    got = subprocess.run(
        [*pip, "install", f"setuptools=={m.group(1)}"], capture_output=True, text=True, timeout=300
    )
    if got.returncode != 0 and re.search(
        r"Could not fetch|NewConnectionError|Network is unreachable", got.stderr
    ):
        pytest.skip(f"PyPI is not reachable: {got.stderr.strip().splitlines()[-1]}")
    assert got.returncode == 0, got.stderr
    built = subprocess.run([*pip, "wheel", "--no-build-isolation", "--no-deps", "-w", str(tmp_path / "dist"), str(ROOT)],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("necrod-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "necrod/py.typed" in names and "necrod/daemon/tasks/attempts.py" in names
    assert "necrod/io/runshim.pl" in names
    assert "License-Expression: Apache-2.0" in metadata
    assert "Provides-Extra: containers" in metadata and "Provides-Extra: kubernetes" in metadata
    unconditional = [
        line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and ";" not in line
    ]
    assert not any("aiodocker" in line or "kubernetes" in line for line in unconditional), unconditional


class WithoutExtras(Necrod):
    """necrod installed without the ``containers`` and ``kubernetes`` extras."""

    def command(self) -> list[str]:
        return [sys.executable, "-c", WITHOUT_EXTRAS, *super().command()[3:]]


def container_runner(name: str = "boxed") -> str:
    return f'runners:\n  {name}:\n    launcher: container\n    command: ["true"]\n    container:\n      image: busybox\n'


def test_a_plain_pool_and_its_tasks_run_without_the_extras(workdir: Path, origin: Path) -> None:
    (workdir / "plain").mkdir()
    d = WithoutExtras(workdir / "plain", pool_config({"repo": origin}, slots=1, min_idle=0))
    assert d.config_path is not None
    try:
        d.start()
        with d.client() as c:
            lease = c.allocate("repo", ttl_s=60)
            c.release(lease["lease_id"])
            task_id = c.submit("repo", command=["true"])["task_id"]
            wait_for(lambda: c.task(task_id)["state"] == "succeeded", 30, what="the task")
        # A reload naming a container runner is refused, naming the extra; the daemon goes on.
        d.config_path.write_text(pool_config({"repo": origin}, slots=1, min_idle=0) + container_runner())
        status = wait_for(lambda: (s := d.call("daemon.status"))["config"]["last_reload_error"] and s, 20,
                          what="the reload to be refused")  # fmt: skip
        message = status["config"]["last_reload_error"]["message"]
        assert "pip install 'necrod[containers]'" in message and "aiodocker" in message, message
        assert status["config"]["generation"] == 1
    finally:
        d.stop()


@pytest.mark.parametrize(("launcher", "section", "extra"), [
    ("container", "container:\n      image: busybox\n", "containers"),
    ("kubernetes", "kubernetes:\n      image: busybox\n", "kubernetes"),
])  # fmt: skip
def test_a_runner_whose_extra_is_missing_is_refused_at_config_load_naming_it(
    tmp_path: Path, origin: Path, launcher: str, section: str, extra: str
) -> None:
    config = tmp_path / "pools.yaml"
    config.write_text(
        pool_config({"repo": origin}, isolation="shared-clone")
        + f'runners:\n  agent:\n    launcher: {launcher}\n    command: ["true"]\n    {section}'
    )
    checked = subprocess.run([sys.executable, "-c", WITHOUT_EXTRAS, "--check-config", str(config)],
                             capture_output=True, text=True, timeout=60, env={**os.environ})  # fmt: skip
    assert checked.returncode == 1
    line = next(n for n, text in enumerate(config.read_text().splitlines(), 1) if text.strip() == "agent:")
    assert f"{config}:{line}:" in checked.stderr, checked.stderr
    assert f"runners.agent: launcher {launcher} needs" in checked.stderr
    assert f"pip install 'necrod[{extra}]'" in checked.stderr
    # With the extras installed (this test environment), the same file is fine.
    ok = subprocess.run([sys.executable, "-m", "necrod", "--check-config", str(config)],
                        capture_output=True, text=True, timeout=60)  # fmt: skip
    assert ok.returncode == 0, ok.stderr


def test_a_daemon_with_such_a_config_does_not_start_and_says_which_extra(workdir: Path, origin: Path) -> None:
    (workdir / "refused").mkdir()
    d = WithoutExtras(
        workdir / "refused", pool_config({"repo": origin}, isolation="shared-clone") + container_runner()
    )
    d.start(wait=False)
    assert d.proc is not None
    assert d.proc.wait(30) == 1
    assert "pip install 'necrod[containers]'" in d.log()
