"""necrod started in a hostile environment, or with a git it must not trust.

Whatever the daemon's own environment holds (``GIT_DIR``, ``GIT_SSH_COMMAND``,
``GIT_CONFIG_COUNT``/``KEY``/``VALUE``, ``GIT_CONFIG_PARAMETERS``, ``GIT_EXEC_PATH``, a poisoned
``~/.gitconfig``, ...), the git it runs sees only its fixed environment: the git seam records the
environment of every git call. A git older than the releases that fixed the 2024 clone CVEs, or
one that is missing or broken, stops necrod at start with a one-line reason (the basic case,
2.39.3, is ``tests/test_gitrun.py::test_necrod_refuses_an_old_git``).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import Necrod, commit_file, git
from tests.reliability.conftest import FIGURES, GitSeam, daemon_config

pytestmark = pytest.mark.reliability

#: The only GIT_* variables a git run by necrod may see (necrod.io.gitrun.git_environment).
FIXED_GIT_VARS = {
    "GIT_CONFIG_NOSYSTEM",
    "GIT_CONFIG_GLOBAL",
    "GIT_TERMINAL_PROMPT",
    "GIT_OPTIONAL_LOCKS",
    "GIT_ALLOW_PROTOCOL",
    "GIT_PROTOCOL_FROM_USER",
    "GIT_ATTR_NOSYSTEM",
    "GIT_SSH_COMMAND",
    "GIT_ASKPASS",
    # Set by necrod for one call: the scratch index of a salvage.
    "GIT_INDEX_FILE",
}
#: Config necrod itself gives one git call through the environment (``GIT_CONFIG_COUNT``): a
#: salvage's sparse-aware index, a partial mirror's backfill, the LFS fetch's fixed endpoint.
NECROD_CONFIG_KEYS = {
    "core.sparseCheckout",
    "core.sparseCheckoutCone",
    "fetch.negotiationAlgorithm",
    "lfs.url",
    "lfs.fetchinclude",
    "lfs.fetchexclude",
}


def necrod_config_vars(env: dict[str, str]) -> set[str]:
    """The ``GIT_CONFIG_COUNT``/``KEY``/``VALUE`` variables of ``env``, if they are all necrod's
    own (its keys, as many as it says), else none: the hostile environment sets them too."""
    count = int(env.get("GIT_CONFIG_COUNT", "0"))
    keys = [env.get(f"GIT_CONFIG_KEY_{i}") for i in range(count)]
    if not count or not all(k in NECROD_CONFIG_KEYS for k in keys):
        return set()
    return {"GIT_CONFIG_COUNT"} | {
        f"GIT_CONFIG_{kind}_{i}" for i in range(count) for kind in ("KEY", "VALUE")
    }


def hostile_environment(home: Path, marker: Path) -> dict[str, str]:
    m = str(marker)
    evil = home / "evil"
    (evil / "hooks").mkdir(parents=True)
    for hook in ("post-checkout", "reference-transaction", "post-index-change"):
        (evil / "hooks" / hook).write_text(f"#!/bin/sh\ntouch {m}-hook\n")
        (evil / "hooks" / hook).chmod(0o755)
    poison = (
        f"[core]\n\tfsmonitor = touch {m}-fsmonitor\n\thooksPath = {evil / 'hooks'}\n"
        f"\tsshCommand = touch {m}-ssh\n\tpager = touch {m}-pager\n"
        f'[remote "origin"]\n\tuploadpack = touch {m}-uploadpack; git-upload-pack\n'
        f'[filter "evil"]\n\tclean = touch {m}-clean; cat\n\tsmudge = touch {m}-smudge; cat\n'
        f"[include]\n\tpath = {evil / 'more.gitconfig'}\n"
        f"[alias]\n\tcheckout = !touch {m}-alias\n"
        f"[init]\n\ttemplateDir = {evil}\n"
        f"[protocol]\n\tallow = always\n"
    )
    (home / ".gitconfig").write_text(poison)
    (home / ".config" / "git").mkdir(parents=True)
    (home / ".config" / "git" / "config").write_text(poison)
    (home / ".config" / "git" / "attributes").write_text("* filter=evil\n")
    (evil / "more.gitconfig").write_text(f"[diff]\n\texternal = touch {m}-diff\n")
    (evil / "system.gitconfig").write_text(poison)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "NECROD_"))}
    env.update(
        {
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / ".config"),
            "GIT_DIR": "/nonexistent",
            "GIT_WORK_TREE": "/",
            "GIT_COMMON_DIR": "/nonexistent",
            "GIT_OBJECT_DIRECTORY": "/nonexistent",
            "GIT_ALTERNATE_OBJECT_DIRECTORIES": str(evil),
            "GIT_INDEX_FILE": str(evil / "index"),
            "GIT_NAMESPACE": "evil",
            "GIT_SSH_COMMAND": f"touch {m}-ssh-command",
            "GIT_SSH": f"{evil}/ssh",
            "GIT_ASKPASS": f"{evil}/askpass",
            "GIT_EDITOR": f"touch {m}-editor",
            "GIT_PAGER": f"touch {m}-pager",
            "GIT_EXTERNAL_DIFF": f"touch {m}-external-diff",
            "GIT_EXEC_PATH": "/nonexistent",
            "GIT_TEMPLATE_DIR": str(evil),
            "GIT_CONFIG": str(evil / "system.gitconfig"),
            "GIT_CONFIG_GLOBAL": str(home / ".gitconfig"),
            "GIT_CONFIG_SYSTEM": str(evil / "system.gitconfig"),
            "GIT_CONFIG_NOSYSTEM": "0",
            "GIT_CONFIG_COUNT": "3",
            "GIT_CONFIG_KEY_0": "remote.origin.uploadpack",
            "GIT_CONFIG_VALUE_0": f"touch {m}-count; git-upload-pack",
            "GIT_CONFIG_KEY_1": "core.fsmonitor",
            "GIT_CONFIG_VALUE_1": f"touch {m}-count-fsmonitor",
            "GIT_CONFIG_KEY_2": "include.path",
            "GIT_CONFIG_VALUE_2": str(evil / "system.gitconfig"),
            "GIT_CONFIG_PARAMETERS": f"'remote.origin.uploadpack'='touch {m}-parameters; git-upload-pack'",
            "GIT_ALLOW_PROTOCOL": "ext:file:fd",
            "GIT_PROTOCOL_FROM_USER": "1",
            "GIT_TRACE": f"{m}-trace",
            "GIT_TRACE2_EVENT": f"{m}-trace2",
            "GIT_TRACE_PACKET": f"{m}-trace-packet",
            "GIT_REPLACE_REF_BASE": "refs/evil/",
            "GIT_ATTR_SOURCE": "HEAD",
            "GIT_QUARANTINE_PATH": str(evil),
            "GIT_SHALLOW_FILE": str(evil / "shallow"),
            "GIT_TERMINAL_PROMPT": "1",
        }
    )
    return env


def test_a_hostile_environment_does_not_reach_the_git_necrod_runs(
    necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path, marker_dir: Path, seam: GitSeam
) -> None:
    home = workdir / "home"
    home.mkdir()
    env = hostile_environment(home, marker_dir / "m")
    (seam.dir / "dump-env").touch()
    d = necrod_factory(daemon_config({"repo": origin}, {"git": str(seam.path)}, slots=2, min_idle=0), env=env)
    FIGURES["hostile environment variables"] += sum(1 for k in env if k.startswith("GIT_")) + 3
    # Everything the daemon does with git: clone, worktrees, salvage, clean, fetch, checkout.
    with d.client() as c:
        lease = c.allocate("repo", holder="agent")
        (Path(lease["path"]) / "work.txt").write_text("work\n")
        (Path(lease["path"]) / "README").write_text("changed\n")
        c.release(lease["lease_id"])
        d.wait_slots("repo", "available", 2)
        assert [f["path"] for f in c.salvage_show(lease["lease_id"])["files"]] == ["README", "work.txt"]
        commit_file(origin, "later.txt", "later\n", branch="later")
        later = c.allocate("repo", ref="later", branch="topic", wait_s=30)
        assert git(later["path"], "rev-parse", "HEAD") == git(origin, "rev-parse", "later")
        c.call("anomalies.list", {"deep": True})
    assert not list(marker_dir.iterdir()), f"the environment reached git: {sorted(marker_dir.iterdir())}"
    envs = seam.environments()
    assert len(envs) >= 10, "the seam recorded too few git calls to prove anything"
    for env_seen in envs:
        leaked = {k for k in env_seen if k.startswith("GIT_")} - FIXED_GIT_VARS - necrod_config_vars(env_seen)
        assert not leaked, f"git saw {sorted(leaked)}"
        assert env_seen["GIT_CONFIG_NOSYSTEM"] == "1" and env_seen["GIT_PROTOCOL_FROM_USER"] == "0"
        assert env_seen["GIT_CONFIG_GLOBAL"] == "/dev/null"  # no file of ours to rewrite (#12)
        # The config's transports, or only "file" (salvage fetching from its scratch repository).
        assert env_seen["GIT_ALLOW_PROTOCOL"] in ("file:https:ssh", "file")
        assert env_seen["GIT_TERMINAL_PROMPT"] == "0"
        assert env_seen["GIT_SSH_COMMAND"] == "ssh -o BatchMode=yes"
        assert "XDG_CONFIG_HOME" not in env_seen
        index = env_seen.get("GIT_INDEX_FILE", "/salvage-tmp/x/index")
        assert "/salvage-tmp/" in index and index.endswith("/index"), index


def fake_git(directory: Path, script: str) -> Path:
    path = directory / "fakegit"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return path


@pytest.mark.parametrize(
    ("version_output", "expected"),
    [
        ("git version 2.45.0", ["git 2.45.0", "2.45.1"]),
        ("git version 2.44.0", ["git 2.44.0", "2.44.1"]),
        ("git version 2.43.3", ["git 2.43.3", "2.43.4"]),
        ("git version 2.40.1", ["git 2.40.1", "2.40.2"]),
        ("git version 2.30.9", ["git 2.30.9", "2.39.4"]),
        ("git version 1.8.3.1", ["git 1.8.3", "2.39.4"]),
        ("git version 2.39.3.windows.1", ["git 2.39.3", "2.39.4"]),
    ],
)
def test_a_git_older_than_the_cve_fixes_is_refused_at_start(
    necrod_factory: Callable[..., Necrod],
    origin: Path,
    workdir: Path,
    version_output: str,
    expected: list[str],
) -> None:
    fake = fake_git(workdir, f"echo '{version_output}'\n")
    d = necrod_factory(daemon_config({"repo": origin}, {"git": str(fake)}), start=False)
    result = subprocess.run(d.command(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    for word in [*expected, "CVE-2024-32002"]:
        assert word in result.stderr, result.stderr
    assert not d.socket.exists()


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        (None, "/nonexistent/git"),
        ("echo 'this is not git'\n", "this is not git"),
        ("exit 3\n", "fakegit"),
        ("kill -KILL $$\n", "fakegit"),
        ("echo 'git version'\n", "git version"),
    ],
    ids=["missing", "not-git", "fails", "killed", "no-number"],
)
def test_a_missing_or_broken_git_is_a_clear_error_at_start(
    necrod_factory: Callable[..., Necrod], origin: Path, workdir: Path, script: str | None, expected: str
) -> None:
    git_path = "/nonexistent/git" if script is None else str(fake_git(workdir, script))
    d = necrod_factory(daemon_config({"repo": origin}, {"git": git_path}), start=False)
    result = subprocess.run(d.command(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    said = [line for line in result.stderr.splitlines() if line.startswith("necrod: ")]
    assert said and expected in said[-1], result.stderr
    assert not d.socket.exists()
