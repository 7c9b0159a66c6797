"""The git runner: a fixed environment, no option injection, and no process left behind."""

from __future__ import annotations

import hashlib
import os
import stat
import time
from pathlib import Path

import anyio
import pytest

from necrod.io.gitrun import (
    SAFE_FLAGS,
    GitError,
    GitOutputTooLarge,
    GitRunner,
    GitTimeout,
    git_environment,
    parse_git_version,
    version_problem,
)

pytestmark = pytest.mark.anyio


def runner(tmp_path: Path, git: str = "git") -> GitRunner:
    hostile = {
        **os.environ,
        "GIT_DIR": "/nonexistent",
        "GIT_SSH_COMMAND": "touch /tmp/pwned-ssh",
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": "core.pager",
        "GIT_CONFIG_VALUE_0": "evil",
        "GIT_EXEC_PATH": "/nonexistent",
        "HOME": str(tmp_path),
    }
    (tmp_path / ".gitconfig").write_text("[alias]\n\tstatus = !touch /tmp/pwned-alias\n")
    return GitRunner(git, git_environment(("file",), hostile))


def alive(pid: int) -> bool:
    """Running (a killed child that nobody has reaped yet is a zombie, not alive)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_environment_is_fixed(tmp_path: Path) -> None:
    env = runner(tmp_path).env
    assert not {k for k in env if k.startswith("GIT_")} - {
        "GIT_CONFIG_NOSYSTEM",
        "GIT_CONFIG_GLOBAL",
        "GIT_TERMINAL_PROMPT",
        "GIT_OPTIONAL_LOCKS",
        "GIT_ALLOW_PROTOCOL",
        "GIT_PROTOCOL_FROM_USER",
        "GIT_ATTR_NOSYSTEM",
        "GIT_SSH_COMMAND",
        "GIT_ASKPASS",
    }
    assert env["GIT_SSH_COMMAND"] == "ssh -o BatchMode=yes" and env["GIT_ALLOW_PROTOCOL"] == "file"
    assert env["LC_ALL"] == "C"
    assert "core.hooksPath=/dev/null" in SAFE_FLAGS and "core.fsmonitor=false" in SAFE_FLAGS


async def test_hostile_environment_does_not_reach_git(tmp_path: Path) -> None:
    git = runner(tmp_path)
    repo = tmp_path / "r"
    await git.run(["init", "-q", "--", str(repo)], timeout=30)
    result = await git.run(["config", "--show-origin", "--list"], git_dir=repo / ".git", timeout=30)
    assert "pwned" not in result.out and "evil" not in result.out
    await git.run(["status"], git_dir=repo / ".git", work_tree=repo, cwd=repo, timeout=30)
    assert not Path("/tmp/pwned-alias").exists()


async def test_failure_and_option_like_arguments(tmp_path: Path) -> None:
    git = runner(tmp_path)
    with pytest.raises(GitError) as info:
        await git.run(
            ["rev-parse", "--verify", "--end-of-options", "--upload-pack=touch /tmp/pwned"],
            git_dir=tmp_path,
            timeout=30,
        )
    assert info.value.returncode != 0 and "git rev-parse failed" in str(info.value)
    assert not Path("/tmp/pwned").exists()


async def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    # A stand-in for git that leaves a child behind (like ssh under git fetch).
    fake = tmp_path / "slowgit"
    pidfile = tmp_path / "child.pid"
    fake.write_text(f"#!/bin/sh\nsleep 60 &\necho $! > {pidfile}\nwait\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    git = GitRunner(str(fake), git_environment(("file",)))
    started = time.monotonic()
    with pytest.raises(GitTimeout):
        await git.run(["fetch"], timeout=0.5)
    assert time.monotonic() - started < 5
    await anyio.sleep(0.2)
    assert not alive(int(pidfile.read_text()))
    assert git.running == 0


async def test_cancellation_kills_the_whole_process_group(tmp_path: Path) -> None:
    fake = tmp_path / "slowgit"
    pidfile = tmp_path / "child.pid"
    fake.write_text(f"#!/bin/sh\nsleep 60 &\necho $! > {pidfile}\nwait\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    git = GitRunner(str(fake), git_environment(("file",)))
    with anyio.move_on_after(0.5):
        await git.run(["clean"], timeout=60)
    await anyio.sleep(0.2)
    assert not alive(int(pidfile.read_text()))


async def test_a_megabyte_in_and_out_through_the_pipes(tmp_path: Path) -> None:
    """Input larger than a pipe's buffer is written while the output is read, and as much
    comes back: neither side waits on the other."""
    git = runner(tmp_path)
    repo = tmp_path / "repo.git"
    await git.run(["init", "--quiet", "--bare", str(repo)], timeout=30)
    data = os.urandom(1 << 20)
    oid = (await git.run(["hash-object", "-w", "--stdin"], git_dir=repo, timeout=30, input=data)).out.strip()
    assert oid == hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    assert (await git.run(["cat-file", "blob", oid], git_dir=repo, timeout=30)).stdout == data


async def test_a_child_that_reads_no_input_ends_with_its_stderr_lines_and_no_fd_left(tmp_path: Path) -> None:
    fake = tmp_path / "fakegit"
    fake.write_text('#!/bin/sh\nprintf "one\\rtwo\\nthree\\n" >&2\nexit 3\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    git = GitRunner(str(fake), git_environment(("file",)))
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        lines: list[str] = []
        with pytest.raises(GitError) as info:
            await git.run(["fetch"], timeout=10, input=os.urandom(1 << 20), on_stderr_line=lines.append)
        assert info.value.returncode == 3 and lines == ["one", "two", "three"]
        assert info.value.stderr == "one\rtwo\nthree"
    assert git.running == 0 and len(os.listdir("/proc/self/fd")) == fds


def fake_git(tmp_path: Path, script: str) -> GitRunner:
    fake = tmp_path / "fakegit"
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return GitRunner(str(fake), git_environment(("file",)))


async def test_output_past_the_limit_stops_git_or_is_cut(tmp_path: Path) -> None:
    """What git prints is the agent's to decide (``git status`` of a slot it filled): no more
    than the limit is read, and git is stopped there."""
    git = fake_git(tmp_path, f"echo $$ > {tmp_path}/pid\nexec yes")
    with pytest.raises(GitOutputTooLarge) as info:
        await git.run(["status"], timeout=30, max_stdout=1 << 20)
    assert "git status failed" in str(info.value) and "more than 1048576 bytes" in str(info.value)
    assert not alive(int((tmp_path / "pid").read_text()))
    cut = await git.run(["diff"], timeout=30, max_stdout=1 << 20, cut=True)
    assert cut.cut and cut.stdout == b"y\n" * (1 << 19)
    assert not alive(int((tmp_path / "pid").read_text())) and git.running == 0
    # At the limit exactly is not past it.
    whole = await fake_git(tmp_path, "head -c 1048576 /dev/zero").run(
        ["diff"], timeout=30, max_stdout=1 << 20
    )
    assert not whole.cut and len(whole.stdout) == 1 << 20 and whole.returncode == 0


async def test_only_the_end_of_a_flood_of_stderr_is_kept(tmp_path: Path) -> None:
    git = fake_git(tmp_path, "head -c 50000000 /dev/zero | tr '\\0' e >&2\necho ' the end' >&2\nexit 1")
    lines: list[str] = []
    with pytest.raises(GitError) as info:
        await git.run(["fetch"], timeout=60, on_stderr_line=lines.append)
    assert str(info.value).endswith("the end") and len(info.value.stderr) <= 64 << 10
    assert len(lines) == 1 and len(lines[0]) == 8 << 10 and lines[0].endswith("e the end")


async def test_a_stderr_callback_that_raises_fails_the_run_and_stops_git(tmp_path: Path) -> None:
    git = fake_git(tmp_path, f"echo $$ > {tmp_path}/pid\necho progress >&2\nexec sleep 60")

    def refuse(line: str) -> None:
        raise ValueError(f"refused {line}")

    started = time.monotonic()
    with pytest.raises(ValueError, match="refused progress"):
        await git.run(["clone"], timeout=60, on_stderr_line=refuse)
    assert time.monotonic() - started < 10
    assert not alive(int((tmp_path / "pid").read_text())) and git.running == 0


def test_version_gate() -> None:
    assert parse_git_version("git version 2.39.5\n") == (2, 39, 5)
    assert parse_git_version("git version 2.45.1.windows.1") == (2, 45, 1)
    assert version_problem((2, 39, 5)) is None
    assert version_problem((2, 45, 1)) is None and version_problem((2, 47, 0)) is None
    assert version_problem((2, 43, 4)) is None
    for bad in ((2, 39, 3), (2, 45, 0), (2, 30, 9), (1, 8, 0), (2, 44, 0)):
        problem = version_problem(bad)
        assert problem is not None and "CVE-2024-32002" in problem


async def test_necrod_refuses_an_old_git(tmp_path: Path) -> None:
    import subprocess
    import sys

    fake = tmp_path / "oldgit"
    fake.write_text("#!/bin/sh\necho 'git version 2.39.3'\n")
    fake.chmod(0o755)
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    config = tmp_path / "pools.yaml"
    config.write_text(f"daemon:\n  git: {fake}\npools:\n  r:\n    repo_url: {repo}\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "necrod",
            "--config",
            str(config),
            "--state-dir",
            str(tmp_path / "state"),
            "--socket",
            str(tmp_path / "s.sock"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "git 2.39.3" in result.stderr and "2.39.4" in result.stderr and "Traceback" not in result.stderr
