"""The one way necrod runs git.

Every git process gets a fixed environment and fixed ``-c`` flags (DESIGN.md, trap 7), so nothing
an agent planted in a slot or the mirror, and nothing in the daemon's own environment or
``~/.gitconfig``, runs under it. Every process starts in its own session; when the caller is
cancelled or a timeout fires, the whole process group gets SIGTERM, a short shielded grace, then
SIGKILL (trap 3: killing only git leaves ``ssh`` or ``git-remote-https`` running).

Resource handling: the runner holds no limiter itself; callers take the global and per-pool
``CapacityLimiter`` around a whole job (a cleanup is several git calls), so one job is one git
process at a time.

Error handling: a non-zero exit raises ``GitError`` (unless ``check=False``), a timeout raises
``GitTimeout``; network operations (``network=True``) are tried three times with backoff.

Nothing git prints is read unbounded (an agent decides how much ``git status`` of its slot
prints): stdout past ``max_stdout`` stops git and raises ``GitOutputTooLarge``, or, for a
caller that asked to ``cut``, ends the result there; of stderr only its end is kept.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import anyio
import structlog

from necrod.io.children import Pipes, exited

log = structlog.get_logger("necrod.git")

#: Grace between SIGTERM and SIGKILL for a cancelled git process group.
TERM_GRACE_S = 2.0
#: Attempts for network operations (fetch, clone, ls-remote).
NETWORK_ATTEMPTS = 3
#: The most of a git's stdout read, unless the caller says otherwise: above any listing of a
#: large repository's files or objects that necrod asks for.
MAX_STDOUT = 256 << 20

#: Flags on every git call: they win over anything in repository config.
SAFE_FLAGS = (
    "-c",
    "core.hooksPath=/dev/null",
    "-c",
    "core.fsmonitor=false",
    "-c",
    "core.attributesFile=/dev/null",
    "-c",
    "credential.helper=",
    "-c",
    "gc.auto=0",
    "-c",
    "maintenance.auto=false",
    "-c",
    "advice.detachedHead=false",
    # No signature is made or checked: ``log.showSignature`` in a config an agent wrote (a
    # worktree pool's shared one) would run its ``gpg.program`` from a mere ``git log`` of a
    # commit it signed. The program is named too, for any path that checks one anyway.
    "-c",
    "log.showSignature=false",
    "-c",
    "commit.gpgSign=false",
    "-c",
    "tag.gpgSign=false",
    "-c",
    "gpg.program=false",
    "-c",
    "gpg.ssh.program=false",
    "-c",
    "gpg.x509.program=false",
    "-c",
    "submodule.recurse=false",
    "-c",
    "fetch.recurseSubmodules=false",
    "-c",
    "protocol.version=2",
    "-c",
    "init.defaultBranch=main",
    # Who necrod's own commits (salvage) are by: flags, so that no file says otherwise.
    "-c",
    "user.name=necrod",
    "-c",
    "user.email=necrod@localhost",
)

#: Variables passed through from the daemon's environment: none of them can make git run code.
PASSTHROUGH = (
    "PATH",
    "HOME",
    "TMPDIR",
    "SSH_AUTH_SOCK",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
)

#: Minimum safe release per maintenance line (the 2024 clone CVEs, CVE-2024-32002 and friends).
SAFE_GIT = {
    (2, 39): (2, 39, 4),
    (2, 40): (2, 40, 2),
    (2, 41): (2, 41, 1),
    (2, 42): (2, 42, 2),
    (2, 43): (2, 43, 4),
    (2, 44): (2, 44, 1),
    (2, 45): (2, 45, 1),
}


class GitError(Exception):
    """A git command failed."""

    def __init__(self, args: Sequence[str], returncode: int | None, stderr: str) -> None:
        self.git_args = list(args)
        self.returncode = returncode
        self.stderr = stderr.strip()
        verb = next((a for a in args if not a.startswith("-") and "=" not in a), "git")
        detail = self.stderr.splitlines()[-1] if self.stderr else "no message"
        super().__init__(f"git {verb} failed (exit {returncode}): {detail}")


class GitTimeout(GitError):
    """A git command ran past its timeout and was stopped."""

    def __init__(self, args: Sequence[str], timeout: float) -> None:
        super().__init__(args, None, f"timed out after {timeout:g}s")


class GitOutputTooLarge(GitError):
    """A git command printed more than the caller would read, and was stopped."""

    def __init__(self, args: Sequence[str], limit: int) -> None:
        super().__init__(args, None, f"printed more than {limit} bytes; stopped there")


class GitVersionError(Exception):
    """The git found is missing, or older than the releases that fixed the 2024 clone CVEs."""


@dataclass(frozen=True, slots=True)
class GitResult:
    args: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes
    #: stdout ended at the caller's ``max_stdout`` (``cut=True``): git was stopped there.
    cut: bool = False

    @property
    def out(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def err(self) -> str:
        return self.stderr.decode("utf-8", "replace")

    def lines(self) -> list[str]:
        """stdout's lines, split at newlines only: ``str.splitlines`` also splits at U+2028,
        U+0085, ``\x1c`` and more, which a ref name or a commit subject (an agent's) may hold."""
        return self.out.removesuffix("\n").split("\n") if self.out else []

    def entries(self) -> list[bytes]:
        """stdout's NUL-terminated entries (``-z``); of a ``cut`` stdout, not the last, which
        may be a part of one."""
        entries = self.stdout.split(b"\0")
        entries.pop()  # what follows the last NUL: nothing, or a part of an entry
        return entries


def parse_git_version(text: str) -> tuple[int, int, int]:
    m = re.search(r"git version (\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        raise GitVersionError(f"cannot read a version from {text.strip()!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def version_problem(version: tuple[int, int, int]) -> str | None:
    """Why this git version is unsafe, or None."""
    line = version[:2]
    if line in SAFE_GIT:
        minimum = SAFE_GIT[line]
    elif version < (2, 39, 0):
        minimum = (2, 39, 4)
    else:
        return None
    if version < minimum:
        found = ".".join(map(str, version))
        need = ".".join(map(str, minimum))
        return (
            f"git {found} is affected by the 2024 clone vulnerabilities (CVE-2024-32002 and others); "
            f"necrod needs {need} or newer in that line (2.39.4+, or 2.45.1+)"
        )
    return None


def git_environment(allowed_protocols: Sequence[str], base: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The whole environment of every git necrod runs: nothing else from ``base`` gets through.
    No global config file at all (``/dev/null``): a file of ours would be one more thing an
    agent running as the daemon's user could rewrite; the flags in ``SAFE_FLAGS`` say it all."""
    env = {k: base[k] for k in PASSTHROUGH if k in base}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.update(
        {
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_OPTIONAL_LOCKS": "0",
            "GIT_ALLOW_PROTOCOL": ":".join(allowed_protocols),
            "GIT_PROTOCOL_FROM_USER": "0",
            "GIT_ATTR_NOSYSTEM": "1",
            "GIT_SSH_COMMAND": "ssh -o BatchMode=yes",
            "GIT_ASKPASS": "/bin/false",
            "SSH_ASKPASS": "/bin/false",
            "LC_ALL": "C",
        }
    )
    return env


async def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, wait a short grace, then SIGKILL it. Always shielded."""
    with anyio.CancelScope(shield=True):
        for sig, grace in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                process.poll()  # reaped, if it is a zombie
                return
            with anyio.move_on_after(grace):
                await exited(process)
                # git exited; members of its group (ssh, remote helpers) may linger.
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return


class GitRunner:
    """Runs git with the fixed environment and flags; see the module docstring."""

    def __init__(self, git: str, env: Mapping[str, str]) -> None:
        self.git = git
        self.env = dict(env)
        self.running = 0
        self.started = 0
        #: Count of processes started per verb ("fetch", "worktree", ...), for benchmarks and metrics.
        self.started_by_verb: dict[str, int] = {}

    def argv(
        self,
        args: Sequence[str],
        *,
        git_dir: str | os.PathLike[str] | None = None,
        work_tree: str | os.PathLike[str] | None = None,
    ) -> list[str]:
        argv = [self.git, *SAFE_FLAGS]
        if git_dir is not None:
            argv.append(f"--git-dir={os.fspath(git_dir)}")
        if work_tree is not None:
            argv.append(f"--work-tree={os.fspath(work_tree)}")
        return [*argv, *args]

    async def version(self) -> tuple[int, int, int]:
        try:
            result = await self.run(["--version"], timeout=30)
        except (OSError, GitError) as exc:
            raise GitVersionError(f"cannot run {self.git!r}: {exc}") from None
        return parse_git_version(result.out)

    async def run(
        self,
        args: Sequence[str],
        *,
        timeout: float,
        cwd: str | os.PathLike[str] | None = None,
        git_dir: str | os.PathLike[str] | None = None,
        work_tree: str | os.PathLike[str] | None = None,
        check: bool = True,
        network: bool = False,
        env: Mapping[str, str] | None = None,
        input: bytes | None = None,
        on_stderr_line: Callable[[str], None] | None = None,
        max_stdout: int = MAX_STDOUT,
        cut: bool = False,
    ) -> GitResult:
        """git ``args``; see the module docstring. With ``cut``, stdout past ``max_stdout`` bytes
        is no error: git is stopped there, its exit status is not looked at, and the result
        says ``cut``."""
        argv = self.argv(args, git_dir=git_dir, work_tree=work_tree)
        attempts = NETWORK_ATTEMPTS if network else 1
        for attempt in range(1, attempts + 1):
            try:
                return await self._run_once(
                    argv,
                    args,
                    timeout=timeout,
                    cwd=cwd,
                    check=check,
                    env=env,
                    input=input,
                    on_stderr_line=on_stderr_line,
                    max_stdout=max_stdout,
                    cut=cut,
                )
            except GitError as exc:
                if attempt == attempts:
                    raise
                delay = min(30.0, 2.0 ** (attempt - 1)) * (0.5 + random.random())
                log.warning(
                    "git_retry", args=list(args[:2]), attempt=attempt, error=str(exc), delay_s=round(delay, 2)
                )
                await anyio.sleep(delay)
        raise AssertionError("unreachable")

    async def _run_once(
        self,
        argv: list[str],
        args: Sequence[str],
        *,
        timeout: float,
        cwd: str | os.PathLike[str] | None,
        check: bool,
        env: Mapping[str, str] | None,
        input: bytes | None,
        on_stderr_line: Callable[[str], None] | None,
        max_stdout: int,
        cut: bool,
    ) -> GitResult:
        full_env = self.env if env is None else {**self.env, **env}
        verb = next((a for a in args if not a.startswith("-")), "git")
        started = time.perf_counter()
        # Popen, its pipes watched by the loop (``children``): no asyncio transports per git.
        process = subprocess.Popen(  # noqa: ASYNC220 (a fork and exec, as open_process does)
            argv, cwd=cwd, env=full_env, start_new_session=True, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        )  # fmt: skip
        self.running += 1
        self.started += 1
        self.started_by_verb[verb] = self.started_by_verb.get(verb, 0) + 1
        try:
            with Pipes(process, input, on_stderr_line, stdout_limit=max_stdout) as pipes:
                with anyio.fail_after(timeout):
                    await pipes.read_all()
                    if pipes.cut:
                        await _stop_group(process)
                    returncode = await exited(process)
        except TimeoutError:
            await _stop_group(process)
            raise GitTimeout(args, timeout) from None
        except BaseException:
            await _stop_group(process)
            raise
        finally:
            self.running -= 1
        log.debug("git", verb=verb, rc=returncode, ms=round((time.perf_counter() - started) * 1000, 2))
        result = GitResult(tuple(args), returncode, bytes(pipes.stdout), bytes(pipes.stderr), pipes.cut)
        if pipes.cut and not cut:
            raise GitOutputTooLarge(args, max_stdout)
        if check and returncode != 0 and not pipes.cut:
            raise GitError(args, returncode, result.err)
        return result
