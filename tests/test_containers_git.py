"""git inside the container: a Debian image with git (``tests/containers.py``, ``git_image``) on a
shared-clone pool, through the real daemon and dispatcher.

The slot is the agent's repository (handed to its uid), its objects borrowed through
``alternates`` from the mirror, which is mounted read-only. A task whose attempt succeeds is
released without salvage (docs/dispatcher.md), so the first attempt here commits, checks what it
cannot do, and exits 7: the dispatcher salvages that attempt and retries; the second attempt
finds a clean slot at the base commit, commits again and succeeds, and its commit is dropped.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.containers import Engine, git_image, start_engine, why_no_engine, why_no_git_image
from tests.helpers import Necrod, cleanup_dir, git, short_tmpdir, wait_for

FINISHED = ("succeeded", "failed", "cancelled")
USER = "1000:100"
#: The first attempt's "every check passed, salvage my work" status.
SALVAGE_ME = 7


def _unavailable(problem: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the container tests: {problem}")
    pytest.skip(problem)


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    problem = why_no_engine()
    if problem is not None:
        _unavailable(problem)
    work = short_tmpdir()
    try:
        yield from start_engine(work)
    finally:
        cleanup_dir(work)


@pytest.fixture(scope="module")
def image(engine: Engine) -> Iterator[str]:
    """Built once per machine (cached), imported for this module, removed after it. The build
    has its own budget (``BUILD_TIMEOUT_S``); the tests' timeouts cover their bodies only."""
    problem = why_no_git_image()
    if problem is not None:
        _unavailable(f"cannot build the git image: {problem}")
    yield from git_image(engine)


def config(origin: Path, engine: Engine, image: str) -> str:
    container = {"image": image, "user": USER, "docker_host": engine.docker_host, "pids_limit": 256}
    profile = {"launcher": "container", "max_concurrency": 1, "grace_s": 2, "lease_ttl_s": 120,
               "timeout_s": 60, "container": container}  # fmt: skip
    # One slot: the retry (and the next task) gets the slot the first attempt left.
    pool = {"repo_url": str(origin), "slots": 1, "max_slots": 1, "min_idle": 0, "isolation": "shared-clone"}
    return (
        'daemon: {"socket_group": "users"}\n'
        f"pools:\n  repo: {json.dumps(pool)}\n"
        f"runners:\n  gitbox: {json.dumps(profile)}\n"
        'dispatcher: {"max_running": 1, "retry_backoff_s": 0}\n'
    )


@pytest.fixture
def daemon(
    necrod_factory: Callable[..., Necrod], origin: Path, engine: Engine, image: str
) -> Iterator[Necrod]:
    d = necrod_factory(config(origin, engine, image))
    yield d
    d.stop()
    # Of this image only: another run on the machine may have containers of its own.
    assert engine.ours(image) == [], "a container outlived its daemon's tasks"


# The agent's script. ``bad`` ends the attempt with status 1, so only a first attempt that passed
# every check exits 7. $BASE and $MIRROR come from the task's env. Commands are templates: the
# braces are doubled before the submit.
SCRIPT = r"""
set -u
bad() { echo "BAD: $*"; exit 1; }
echo "UID $(id -u) HOME ${HOME-}"
# Clean at the pool's base commit; the history comes from the mirror through alternates.
[ -z "$(git status --porcelain --untracked-files=all 2>/tmp/err)" ] || bad "git status not clean"
[ ! -s /tmp/err ] || bad "git status: $(cat /tmp/err)"
head=$(git rev-parse HEAD) || bad "git rev-parse HEAD"
[ "$head" = "$BASE" ] && [ "$head" = "$NECROD_COMMIT" ] || bad "HEAD is $head, the base is $BASE"
git log --format=%s >/tmp/log 2>/tmp/err || bad "git log: $(cat /tmp/err)"
[ "$(cat /tmp/log | tr '\n' ' ')" = "second initial " ] || bad "git log says $(cat /tmp/log)"
grep -qx "$MIRROR/objects" .git/objects/info/alternates || bad "alternates: $(cat .git/objects/info/*)"
# A fresh slot has no objects of its own (checked on the first attempt).
[ "$NECROD_ATTEMPT" != 1 ] || git count-objects -v | grep -qx "count: 0" || bad "objects of its own"
git fsck --connectivity-only --no-dangling HEAD 2>/tmp/err || bad "git fsck: $(cat /tmp/err)"
echo "READ-OK"
# Work of our own: new objects go to the slot.
echo "attempt $NECROD_ATTEMPT" > "agent-$NECROD_ATTEMPT.txt"
git add "agent-$NECROD_ATTEMPT.txt" || bad "git add"
git -c user.name=Agent -c user.email=agent@example.invalid commit -q -m "agent $NECROD_ATTEMPT" \
    || bad "git commit"
[ -z "$(git status --porcelain)" ] || bad "dirty after the commit"
[ "$(git rev-parse HEAD~1)" = "$BASE" ] || bad "the commit is not on the base"
echo "AGENT-COMMIT $(git rev-parse HEAD)"
[ "$NECROD_ATTEMPT" = 1 ] || exit 0
# The mirror is read-only: by path, through git's object writer, through its ref store, by push.
touch "$MIRROR/objects/evil" 2>/dev/null && bad "wrote into the mirror's objects"
echo evil | git --git-dir="$MIRROR" hash-object -w --stdin >/dev/null 2>/tmp/err && bad "wrote an object"
grep -q "Read-only file system" /tmp/err || bad "hash-object failed otherwise: $(cat /tmp/err)"
git push "$MIRROR" HEAD:refs/heads/agent 2>/tmp/err && bad "pushed into the mirror"
echo "PUSH-REFUSED $(grep -m1 fatal: /tmp/err)"
# Past git's ownership check, the read-only mount is what stops it.
printf '[safe]\n\tdirectory = *\n' > /tmp/trusting
export GIT_CONFIG_GLOBAL=/tmp/trusting
git push "$MIRROR" HEAD:refs/heads/agent 2>/tmp/err && bad "pushed into the mirror (safe.directory=*)"
grep -q "unable to create temporary object directory" /tmp/err || bad "push failed otherwise: $(cat /tmp/err)"
git --git-dir="$MIRROR" update-ref refs/heads/agent "$BASE" 2>/tmp/err && bad "moved a ref of the mirror"
grep -q "Read-only file system" /tmp/err || bad "update-ref failed otherwise: $(cat /tmp/err)"
echo "MIRROR-READ-ONLY"
exit 7
"""


def finished(d: Necrod, task_id: str, timeout: float = 90) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        task: dict[str, Any] = d.call("tasks.get", {"task_id": task_id})
        return task if task["state"] in FINISHED else None

    return wait_for(done, timeout, what=f"task {task_id} to finish")  # type: ignore[no-any-return]


def refs(repo: Path) -> dict[str, str]:
    out = git(repo, "for-each-ref", "--format=%(refname) %(objectname)")
    return {ref: sha for ref, _, sha in (line.partition(" ") for line in out.splitlines())}


def submit(d: Necrod, script: str, **kw: Any) -> str:
    command = script.replace("{", "{{").replace("}", "}}")
    return str(d.call("tasks.submit", {"pool": "repo", "runner": "gitbox", "command": ["sh", "-c", command],
                                       **kw})["task_id"])  # fmt: skip


@pytest.mark.timeout(120, func_only=True)
def test_git_runs_inside_the_container_on_its_slot_and_cannot_touch_the_mirror(
    daemon: Necrod, engine: Engine, origin: Path, image: str
) -> None:
    pool = daemon.call("pools.list")["pools"][0]
    mirror, base = Path(pool["mirror"]), pool["base_commit"]
    assert base == git(origin, "rev-parse", "HEAD")
    before = refs(mirror)
    task = finished(daemon, submit(daemon, SCRIPT, max_retries=1, env={"BASE": base, "MIRROR": str(mirror)}))
    first, second = task["attempts"] if len(task["attempts"]) == 2 else (task["attempts"][0], None)
    out1 = Path(first["log"]).read_text()
    assert first["exit_code"] == SALVAGE_ME, (first, out1)
    assert "BAD" not in out1 and "READ-OK" in out1 and "MIRROR-READ-ONLY" in out1, out1
    assert out1.startswith(f"UID {USER.split(':')[0]} "), out1
    # Without safe.directory, git refuses the mirror before it tries to write: it is not ours.
    assert "PUSH-REFUSED fatal: detected dubious ownership" in out1, out1
    assert second is not None, task
    out2 = Path(second["log"]).read_text()
    assert task["state"] == "succeeded", (task, out2)
    assert second["exit_code"] == 0 and "BAD" not in out2 and "READ-OK" in out2, out2
    agent1 = re.findall(r"^AGENT-COMMIT ([0-9a-f]{40})$", out1, re.M)[0]
    agent2 = re.findall(r"^AGENT-COMMIT ([0-9a-f]{40})$", out2, re.M)[0]

    # The failed attempt was salvaged: its commit is the salvage commit's parent, in the mirror.
    salvage = f"refs/necrod/salvage/{first['lease_id']}"
    shown = daemon.call("salvage.show", {"lease_id": first["lease_id"]})
    assert shown["ref"] == salvage and {f["path"] for f in shown["files"]} == {"agent-1.txt"}, shown
    assert git(mirror, "rev-parse", f"{salvage}^") == agent1
    assert git(mirror, "show", f"{agent1}:agent-1.txt") == "attempt 1"
    assert git(mirror, "log", "--format=%an %s", "-1", agent1) == "Agent agent 1"
    # The succeeded attempt was released without salvage: its commit never reached the mirror.
    assert git(mirror, "rev-parse", "--verify", "--quiet", f"{agent2}^{{commit}}", check=False) == ""
    assert f"refs/necrod/salvage/{second['lease_id']}" not in refs(mirror)

    # The mirror: its refs are what they were, except necrod's own; nothing in it is the agent's.
    after = refs(mirror)

    def theirs(found: dict[str, str]) -> dict[str, str]:
        return {ref: sha for ref, sha in found.items() if not ref.startswith("refs/necrod/")}

    assert theirs(after) == theirs(before)
    assert set(after) - set(before) <= {salvage} | {r for r in after if r.startswith("refs/necrod/slots/")}
    assert not (mirror / "objects" / "evil").exists()
    assert {p.stat().st_uid for p in [mirror, *mirror.rglob("*")]} == {os.getuid()}

    # The slot: available, at the base, clean, the daemon's again.
    slot = daemon.wait_slots("repo", "available", 1)[0]
    path = Path(slot["path"])
    assert slot["commit"] == base and git(path, "rev-parse", "HEAD") == base
    assert git(path, "status", "--porcelain", "--ignored") == ""
    assert not (path / "agent-1.txt").exists() and not (path / "agent-2.txt").exists()
    assert {p.stat().st_uid for p in [path, *path.rglob("*")]} == {os.getuid()}
    assert engine.ours(image) == []


@pytest.mark.timeout(60, func_only=True)
def test_a_later_lease_of_the_slot_inherits_nothing_of_an_earlier_ones_repository(daemon: Necrod) -> None:
    leave = (
        "echo secret > secret.txt && git add secret.txt && "
        "git -c user.name=A -c user.email=a@example.invalid commit -q -m secret && "
        "git tag left-tag && git branch left-branch && git rev-parse HEAD"
    )
    first = finished(daemon, submit(daemon, leave, max_retries=0))
    assert first["state"] == "succeeded", (first, Path(first["attempts"][-1]["log"]).read_text())
    secret = Path(first["attempts"][-1]["log"]).read_text().split()[-1]
    look = f"""
echo "REFS $(git for-each-ref --format='%(refname)' | tr '\\n' ' ')"
echo "LOOSE $(git count-objects -v | sed -n 's/^count: //p')"
git cat-file -e {secret} 2>/dev/null && echo SECRET-READABLE
true
"""
    second = finished(daemon, submit(daemon, look, max_retries=0))
    out = Path(second["attempts"][-1]["log"]).read_text()
    assert second["state"] == "succeeded" and "REFS" in out and "LOOSE" in out, (second, out)
    assert second["attempts"][-1]["slot_id"] == first["attempts"][-1]["slot_id"]
    # Cleanup dropped the slot's own refs, reflogs and objects (CloneSlots.forget).
    assert "SECRET-READABLE" not in out and "refs/" not in out and "LOOSE 0" in out, out
