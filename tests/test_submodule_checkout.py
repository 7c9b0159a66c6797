"""``submodules: true | recursive``: slots have their submodules checked out at the commits the
base records, from the host's submodule mirrors only; a bump arriving by fetch reaches the
slots; an edit in a submodule is salvaged, then reset; a hostile ``.gitmodules`` is refused.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from necrod.core.config import ConfigError, parse_config
from necrod.core.submodules import Submodule, listing, resolve_url
from tests import helpers
from tests.helpers import GIT_ENV, Necrod, cleanup_dir, commit_file, git, pool_config, short_tmpdir, wait_for
from tests.k8sfake import Cluster, fake_cluster

ALLOW_FILE = ("-c", "protocol.file.allow=always")


@pytest.fixture(params=["worktree", "shared-clone"])
def git_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The two slot kinds that check submodules out (overlay pools refuse ``submodules:``)."""
    monkeypatch.setattr(helpers, "POOL_DEFAULTS", {**helpers.POOL_DEFAULTS, "isolation": request.param})
    return str(request.param)


def repo(path: Path, files: dict[str, str]) -> Path:
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    for name, text in files.items():
        (path / name).write_text(text)
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", f"{path.name}: first")
    return path


def add_submodule(top: Path, url: str, path: str) -> None:
    git(top, *ALLOW_FILE, "submodule", "add", "-q", url, path)
    git(top, "commit", "-q", "-m", f"add {path}")


def nested(workdir: Path) -> tuple[Path, Path, Path]:
    """``top`` with ``vendor/lib`` (a relative URL), which has ``deps/inner`` of its own."""
    inner = repo(workdir / "inner", {"inner.h": "#define INNER 1\n"})
    lib = repo(workdir / "lib", {"lib.c": "int lib(void) { return 1; }\n"})
    add_submodule(lib, str(inner), "deps/inner")
    top = repo(workdir / "top", {"main.c": "int main(void) { return 0; }\n"})
    add_submodule(top, "../lib", "vendor/lib")
    return top, lib, inner


def head_of(path: Path) -> str:
    return git(path, "rev-parse", "HEAD")


def agent_git(path: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=path, env=GIT_ENV, capture_output=True, text=True, check=True)
    return result.stdout.strip()


def pool_view(d: Necrod, pool: str = "top") -> dict[str, Any]:
    return d.call("pools.get", {"pool": pool})  # type: ignore[no-any-return]


def fetched(d: Necrod, pool: str = "top") -> int:
    return int(pool_view(d, pool)["fetch"]["fetches"])


def test_nested_submodules_are_checked_out_from_local_mirrors_only(
    git_kind: str, necrod_factory: Callable[..., Necrod], workdir: Path
) -> None:
    top, lib, inner = nested(workdir)
    d = necrod_factory(pool_config({"top": top}, slots=1, min_idle=0, max_slots=1, submodules="recursive",
                                   fetch_interval_s=1))  # fmt: skip
    lease = d.call("slots.allocate", {"pool": "top"})
    slot = Path(lease["path"])
    assert (slot / "vendor/lib/lib.c").read_text() == "int lib(void) { return 1; }\n"
    assert (slot / "vendor/lib/deps/inner/inner.h").read_text() == "#define INNER 1\n"
    assert head_of(slot / "vendor/lib") == head_of(lib)
    assert head_of(slot / "vendor/lib/deps/inner") == head_of(inner)
    assert agent_git(slot, "status", "--porcelain", "--ignore-submodules=none") == ""
    # The submodules' only remote is a mirror of this host's, never the origin.
    mirrors = workdir / "d" / "state" / "workspaces" / ".submodules"
    for sub in (slot / "vendor/lib", slot / "vendor/lib/deps/inner"):
        url = agent_git(sub, "config", "remote.origin.url")
        assert Path(url).parent == mirrors, url
        assert agent_git(sub, "remote") == "origin"
    assert len(os.listdir(mirrors)) == 2

    # The origins go away after a fetch: cleaning and handing the slot out again needs none.
    seen = fetched(d)
    wait_for(lambda: fetched(d) > seen + 1, 30, what="two more fetches")
    for origin in (top, lib, inner):
        origin.rename(origin.with_name(origin.name + "-gone"))
    (slot / "vendor/lib/lib.c").write_text("edited\n")
    d.call("slots.release", {"lease_id": lease["lease_id"]})
    d.wait_slots("top", "available", 1)
    again = Path(d.call("slots.allocate", {"pool": "top"})["path"])
    assert again == slot
    assert (slot / "vendor/lib/lib.c").read_text() == "int lib(void) { return 1; }\n"
    assert (slot / "vendor/lib/deps/inner/inner.h").read_text() == "#define INNER 1\n"
    assert pool_view(d)["submodules"] == {"mode": "recursive", "problems": []}
    # An agent's habit, with its origins gone and no transport allowed: nothing to fetch.
    agent_git(slot, "-c", "protocol.allow=never", "submodule", "update", "--init", "--recursive", "--quiet")
    status = agent_git(slot, "submodule", "status", "--recursive").splitlines()
    assert len(status) == 2 and not any(line.startswith(("-", "+", "U")) for line in status), status
    assert head_of(slot / "vendor/lib/deps/inner") == head_of(inner.with_name("inner-gone"))


def bump(top: Path, lib: Path) -> str:
    new = commit_file(lib, "lib.c", "int lib(void) { return 2; }\n")
    git(top / "vendor/lib", *ALLOW_FILE, "fetch", "-q", "origin")
    git(top / "vendor/lib", "checkout", "-q", new)
    git(top, "add", "vendor/lib")
    git(top, "commit", "-q", "-m", "bump lib")
    return new


def test_a_submodule_bump_arriving_by_fetch_reaches_the_slots(
    git_kind: str, necrod_factory: Callable[..., Necrod], workdir: Path
) -> None:
    top, lib, _inner = nested(workdir)
    d = necrod_factory(pool_config({"top": top}, slots=2, min_idle=0, max_slots=2, submodules=True,
                                   fetch_interval_s=1))  # fmt: skip
    d.wait_slots("top", "available", 2)
    held = d.call("slots.allocate", {"pool": "top"})
    # ``true`` is one level: the nested submodule stays empty.
    assert list((Path(held["path"]) / "vendor/lib/deps/inner").iterdir()) == []
    new = bump(top, lib)
    base = head_of(top)

    def idle_moved() -> bool:
        slots = d.call("slots.list", {"pool": "top", "state": "available"})["slots"]
        return len(slots) == 1 and slots[0]["commit"] == base

    wait_for(idle_moved, 30, what="the idle slot to move to the bump")
    [idle] = d.call("slots.list", {"pool": "top", "state": "available"})["slots"]
    assert head_of(Path(idle["path"]) / "vendor/lib") == new
    assert (Path(idle["path"]) / "vendor/lib/lib.c").read_text() == "int lib(void) { return 2; }\n"
    # The held slot gets it when it comes back.
    d.call("slots.release", {"lease_id": held["lease_id"]})
    wait_for(lambda: all(s["commit"] == base for s in d.call("slots.list", {"pool": "top", "state": "available"})
                         ["slots"]) and len(d.wait_slots("top", "available", 2)) == 2, 30, what="both at the bump")  # fmt: skip
    assert head_of(Path(held["path"]) / "vendor/lib") == new


def test_an_edit_in_a_checked_out_submodule_is_salvaged_then_reset(
    git_kind: str, necrod_factory: Callable[..., Necrod], workdir: Path
) -> None:
    top, lib, _inner = nested(workdir)
    d = necrod_factory(pool_config({"top": top}, slots=1, min_idle=0, max_slots=1, submodules=True))
    first = d.call("slots.allocate", {"pool": "top"})
    slot = Path(first["path"])
    (slot / "vendor/lib/lib.c").write_text("int lib(void) { return 42; }  /* agent */\n")
    (slot / "vendor/lib/notes.txt").write_text("the agent's notes\n")
    d.call("slots.release", {"lease_id": first["lease_id"]})
    d.wait_slots("top", "available", 1)

    second = d.call("slots.allocate", {"pool": "top"})
    assert second["path"] == first["path"]
    assert (slot / "vendor/lib/lib.c").read_text() == "int lib(void) { return 1; }\n"
    assert not (slot / "vendor/lib/notes.txt").exists()
    assert head_of(slot / "vendor/lib") == head_of(lib)
    assert agent_git(slot / "vendor/lib", "status", "--porcelain") == ""

    shown = d.call("salvage.show", {"lease_id": first["lease_id"]})
    [kept] = shown["submodules"]
    assert kept["path"] == "vendor/lib"
    assert sorted(f["path"] for f in kept["files"]) == ["lib.c", "notes.txt"]
    mirror = Path(shown["fetch"].split()[2])
    assert git(mirror, "show", f"{kept['commit']}:lib.c") == "int lib(void) { return 42; }  /* agent */"


def hostile(workdir: Path, pwned: Path) -> tuple[Path, Path]:
    """A superproject whose .gitmodules lists one good submodule and several an attacker wrote,
    each with a gitlink in the tree so that only the checks stop them."""
    good = repo(workdir / "good", {"good.txt": "good\n"})
    top = repo(workdir / "top", {"main.c": "int main(void) { return 0; }\n"})
    add_submodule(top, str(good), "vendor/good")
    sha = head_of(good)
    bad = {
        "escape": ("../escape", str(good)),
        "dash-u": ("vendor/u", "-uhelp"),
        "upload-pack": ("vendor/pack", f"--upload-pack=touch {pwned}"),
        "http": ("vendor/http", "http://example.invalid/x.git"),
        "../../../evil": ("vendor/name", str(good)),
    }
    gitmodules = (top / ".gitmodules").read_text()
    for name, (path, url) in bad.items():
        gitmodules += f'[submodule "{name}"]\n\tpath = {path}\n\turl = {url}\n'
        if not path.startswith(".."):
            git(top, "update-index", "--add", "--cacheinfo", f"160000,{sha},{path}")
    (top / ".gitmodules").write_text(gitmodules)
    git(top, "add", ".gitmodules")
    git(top, "commit", "-q", "-m", "hostile submodules")
    return top, good


def test_a_hostile_gitmodules_is_refused_and_the_rest_checked_out(
    git_kind: str, necrod_factory: Callable[..., Necrod], workdir: Path
) -> None:
    pwned = workdir / "pwned"
    top, _good = hostile(workdir, pwned)
    d = necrod_factory(pool_config({"top": top}, slots=1, min_idle=0, max_slots=1, submodules="recursive"))
    slot = Path(d.call("slots.allocate", {"pool": "top"})["path"])
    assert (slot / "vendor/good/good.txt").read_text() == "good\n"
    for path in ("vendor/u", "vendor/pack", "vendor/http", "vendor/name"):
        assert list((slot / path).iterdir()) == [], path
    assert not (slot.parent / "escape").exists() and not (workdir / "escape").exists()
    assert not pwned.exists()
    problems = pool_view(d)["submodules"]["problems"]
    text = "\n".join(problems)
    assert "'escape': its path '../escape'" in text
    assert "'dash-u': its url '-uhelp' starts with '-'" in text
    assert "'upload-pack': its url '--upload-pack=" in text
    assert "'http': its url 'http://example.invalid/x.git' uses transport 'http'" in text
    assert "'../../../evil': its name" in text
    assert len(problems) == 5
    with d.client() as c:
        c.subscribe(["pools"], since=0)
        events = [e for e in c.events(timeout=1) if e["type"] == "pool.submodules"]
    assert events and events[-1]["problems"] == problems
    assert pool_view(d)["state"] == "ready"
    [reason] = [r for r in d.call("daemon.status")["degraded"] if "submodules" in r]
    assert reason.startswith("pool top submodules: submodule 'escape'") and reason.endswith("(and 4 more)")
    # Only the good submodule has a mirror.
    assert len(os.listdir(workdir / "d" / "state" / "workspaces" / ".submodules")) == 1


def test_submodules_false_leaves_them_empty_and_overlay_is_refused(
    necrod_factory: Callable[..., Necrod], workdir: Path
) -> None:
    top, _lib, _inner = nested(workdir)
    d = necrod_factory(pool_config({"top": top}, slots=1, min_idle=0, max_slots=1))
    slot = Path(d.call("slots.allocate", {"pool": "top"})["path"])
    assert list((slot / "vendor/lib").iterdir()) == []
    assert pool_view(d)["submodules"] is None
    assert not (workdir / "d" / "state" / "workspaces" / ".submodules").exists()
    with pytest.raises(ConfigError, match="submodules are not checked out in overlay slots"):
        parse_config(pool_config({"top": top}, isolation="overlay", submodules=True))
    with pytest.raises(ConfigError, match="must be true, false or recursive"):
        parse_config(pool_config({"top": top}, submodules="all"))
    assert (
        parse_config(pool_config({"top": top}, submodules="recursive")).pools["top"].submodules == "recursive"
    )


@pytest.mark.parametrize(
    ("url", "superproject", "resolved"),
    [
        ("../lib.git", "https://example.com/org/top.git", "https://example.com/org/lib.git"),
        ("./sub", "https://example.com/org/top.git/", "https://example.com/org/top.git/sub"),
        ("../../other/lib", "ssh://git@host:22/org/top", "ssh://git@host:22/other/lib"),
        ("../lib", "git@host:org/top.git", "git@host:org/lib"),
        ("../lib", "/srv/git/top", "/srv/git/lib"),
        ("../lib", "file:///srv/git/top", "file:///srv/git/lib"),
        ("https://example.com/x.git", "/srv/top", "https://example.com/x.git"),
    ],
)
def test_relative_urls_resolve_against_the_superprojects(url: str, superproject: str, resolved: str) -> None:
    assert resolve_url(url, superproject) == resolved


def test_a_relative_url_may_not_climb_above_the_superprojects() -> None:
    assert resolve_url("../../../x", "https://example.com/top") == (
        None,
        "climbs above the superproject's URL",
    )
    gitlinks = {"a": "1" * 40}
    found = listing({"a": {"path": "a", "url": "../../x"}}, gitlinks, "/top", ("file",))
    assert found.submodules == () and "climbs above" in found.problems[0]


def test_a_listing_keeps_good_entries_and_says_why_the_others_are_refused() -> None:
    sha = "1" * 40
    gitlinks = {"lib": sha, "x": sha, "lib/inner": sha, ".git/x": sha}
    entries = {
        "lib": {"path": "lib", "url": "../lib"},
        "not-a-gitlink": {"path": "docs", "url": "../docs"},
        "-name": {"path": "x", "url": "../x"},
        "inner": {"path": "lib/inner", "url": "../inner"},
        "dotgit": {"path": ".git/x", "url": "../y"},
    }
    found = listing(entries, gitlinks, "https://example.com/org/top", ("https",))
    assert found.submodules == (Submodule("lib", "lib", "https://example.com/org/lib", sha),)
    assert len(found.problems) == 3
    assert "'-name': its name starts with '-'" in found.problems[0]
    assert "inside it" in found.problems[1]
    assert "names a .git directory" in found.problems[2]


def test_a_path_through_a_symlink_or_a_name_inside_another_is_refused() -> None:
    sha = "1" * 40
    gitlinks = {"link/lib": sha, "a": sha, "b": sha}
    entries = {
        "through": {"path": "link/lib", "url": "../lib"},
        "a": {"path": "a", "url": "../a"},
        "a/objects": {"path": "b", "url": "../b"},
    }
    found = listing(entries, gitlinks, "/srv/top", ("file",), frozenset({"link"}))
    assert [s.name for s in found.submodules] == ["a"]
    assert "goes through a symbolic link" in found.problems[0]
    assert "'a/objects': its name or path is another submodule's" in found.problems[1]


def test_turning_submodules_on_by_reload_fills_idle_slots_and_off_empties_them(
    necrod_factory: Callable[..., Necrod], workdir: Path
) -> None:
    top, lib, _inner = nested(workdir)
    d = necrod_factory(pool_config({"top": top}, slots=2, min_idle=0, max_slots=2))
    d.wait_slots("top", "available", 2)
    assert d.config_path is not None

    def filled(count: int) -> bool:
        slots = d.call("slots.list", {"pool": "top", "state": "available"})["slots"]
        return (
            len(slots) == 2 and sum((Path(s["path"]) / "vendor/lib/lib.c").exists() for s in slots) == count
        )

    d.config_path.write_text(pool_config({"top": top}, slots=2, min_idle=0, max_slots=2, submodules=True))
    d.call("daemon.reload")
    wait_for(lambda: filled(2), 30, what="both idle slots to have their submodule")
    for s in d.call("slots.list", {"pool": "top"})["slots"]:
        assert head_of(Path(s["path"]) / "vendor/lib") == head_of(lib)
    d.config_path.write_text(pool_config({"top": top}, slots=2, min_idle=0, max_slots=2, submodules=False))
    d.call("daemon.reload")
    wait_for(lambda: filled(0), 30, what="both idle slots to be emptied")
    assert pool_view(d)["submodules"] is None


def test_two_pools_share_one_mirror_per_submodule(
    necrod_factory: Callable[..., Necrod], workdir: Path
) -> None:
    top, lib, _inner = nested(workdir)
    other = workdir / "top-copy"
    git(workdir, "clone", "-q", "--bare", str(top), str(other))
    # The copy sits beside top: its relative URL ../lib names the same repository.
    d = necrod_factory(pool_config({"top": top, "copy": other}, slots=1, min_idle=0, max_slots=1,
                                   submodules=True))  # fmt: skip
    urls = set()
    for pool in ("top", "copy"):
        slot = Path(d.call("slots.allocate", {"pool": pool})["path"])
        assert head_of(slot / "vendor/lib") == head_of(lib)
        urls.add(agent_git(slot / "vendor/lib", "config", "remote.origin.url"))
    assert len(urls) == 1
    assert os.listdir(workdir / "d" / "state" / "workspaces" / ".submodules") == [Path(urls.pop()).name]
    assert d.call("daemon.status")["git"]["submodule_mirrors"] == {"mirrors": 1, "fetches": 1}  # the clone


def test_an_edit_in_a_nested_submodule_is_salvaged_then_reset(
    necrod_factory: Callable[..., Necrod], workdir: Path
) -> None:
    top, _lib, inner = nested(workdir)
    d = necrod_factory(pool_config({"top": top}, slots=1, min_idle=0, max_slots=1, submodules="recursive"))
    first = d.call("slots.allocate", {"pool": "top"})
    slot = Path(first["path"])
    (slot / "vendor/lib/deps/inner/inner.h").write_text("#define INNER 2  /* agent */\n")
    d.call("slots.release", {"lease_id": first["lease_id"]})
    d.wait_slots("top", "available", 1)
    d.call("slots.allocate", {"pool": "top"})
    assert (slot / "vendor/lib/deps/inner/inner.h").read_text() == "#define INNER 1\n"
    assert head_of(slot / "vendor/lib/deps/inner") == head_of(inner)
    [kept] = d.call("salvage.show", {"lease_id": first["lease_id"]})["submodules"]
    assert kept["path"] == "vendor/lib/deps/inner"
    assert [f["path"] for f in kept["files"]] == ["inner.h"]


@pytest.fixture
def k8s() -> Iterator[Cluster]:
    root = short_tmpdir()
    try:
        yield from fake_cluster(root)
    finally:
        cleanup_dir(root)


def test_a_contained_runner_gets_the_submodule_mirrors_read_only(
    necrod_factory: Callable[..., Necrod], workdir: Path, k8s: Cluster
) -> None:
    top, lib, _inner = nested(workdir)
    assert k8s.fake is not None
    uid = f"{os.getuid()}:{os.getgid()}" if os.getuid() else "1000:100"
    spec = {"image": k8s.image, "namespace": k8s.namespace, "node": k8s.node, "kubeconfig": str(k8s.kubeconfig),
            "user": uid}  # fmt: skip
    profile = {"launcher": "kubernetes", "grace_s": 2, "lease_ttl_s": 60, "kubernetes": spec}
    d = necrod_factory(
        "pools:\n"
        f'  top: {{"repo_url": "{top}", "slots": 1, "max_slots": 1, "min_idle": 0, "isolation": "shared-clone",'
        ' "submodules": true}\n'
        f"runners:\n  k8s: {json.dumps(profile)}\n"
        'dispatcher: {"max_running": 1, "retry_backoff_s": 0}\n'
    )
    # The fake runs pods as the test's user, not as the slot's owner: git must be told to trust it.
    script = "git -c safe.directory='*' -C $NECROD_SLOT_PATH/vendor/lib rev-parse HEAD"
    task_id = d.call("tasks.submit", {"pool": "top", "runner": "k8s", "command": ["sh", "-c", script]})[
        "task_id"
    ]
    done = wait_for(lambda: (t := d.call("tasks.get", {"task_id": task_id}))["state"] in ("succeeded", "failed")
                    and t, 60, what="the task to end")  # fmt: skip
    assert done["state"] == "succeeded", (done, Path(done["attempts"][-1]["log"]).read_text())
    assert Path(done["attempts"][-1]["log"]).read_text().strip() == head_of(lib)
    job = k8s.fake.job(f"necro-{task_id}-1")
    assert job is not None
    pod = job["spec"]["template"]["spec"]
    mirrors = str(workdir / "d" / "state" / "workspaces" / ".submodules")
    assert {"name": "submodule-mirrors", "mountPath": mirrors, "readOnly": True} in pod["containers"][0][
        "volumeMounts"
    ]
    assert {"name": "submodule-mirrors", "hostPath": {"path": mirrors, "type": "Directory"}} in pod["volumes"]


def module_dir(sub: Path) -> Path:
    """A checked-out submodule's repository, as its ``.git`` file names it."""
    return (sub / (sub / ".git").read_text().removeprefix("gitdir: ").strip()).resolve()


def test_a_reset_keeps_a_submodule_in_place_and_drops_what_the_agent_left_in_its_repository(
    git_kind: str, necrod_factory: Callable[..., Necrod], workdir: Path
) -> None:
    top, lib, _inner = nested(workdir)
    d = necrod_factory(pool_config({"top": top}, slots=1, min_idle=0, max_slots=1, submodules=True))
    first = d.call("slots.allocate", {"pool": "top"})
    sub = Path(first["path"]) / "vendor/lib"
    untouched = (sub / ".gitmodules").stat().st_ino
    repo = module_dir(sub)
    marker = workdir / "smudged"
    # The agent commits and branches in the submodule, initialises its nested submodule, and
    # plants a filter driver, a hook and an attribute for the daemon's next git there.
    (sub / "lib.c").write_text("agent\n")
    agent_git(sub, "commit", "-q", "-am", "agent's commit")
    agent_git(sub, "branch", "agents-branch")
    agent_git(sub, "-c", "protocol.file.allow=always", "submodule", "update", "--init", "-q")
    assert (sub / "deps/inner/inner.h").exists()
    agent_git(sub, "config", "filter.evil.smudge", f"touch {marker}; cat")
    (repo / "info").mkdir(exist_ok=True)
    (repo / "info/attributes").write_text("* filter=evil\n")
    (repo / "hooks").mkdir(exist_ok=True)
    (repo / "hooks/post-checkout").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (repo / "hooks/post-checkout").chmod(0o755)
    (sub / "junk.o").write_text("build output\n")
    d.call("slots.release", {"lease_id": first["lease_id"]})
    d.wait_slots("top", "available", 1)

    d.call("slots.allocate", {"pool": "top"})
    assert not marker.exists()
    assert (sub / "lib.c").read_text() == "int lib(void) { return 1; }\n" and not (sub / "junk.o").exists()
    assert head_of(sub) == head_of(lib)
    assert agent_git(sub, "for-each-ref") == ""  # no branch, no reflog, no stash of the agent's
    assert "evil" not in (repo / "config").read_text()
    assert list((repo / "hooks").iterdir()) == [] and list((repo / "info").iterdir()) == []
    # The nested submodule (``true`` is one level) is emptied, its repository dropped.
    assert list((sub / "deps/inner").iterdir()) == [] and list((repo / "modules").iterdir()) == []
    # Kept in place: a file nobody touched was not written again.
    assert (sub / ".gitmodules").stat().st_ino == untouched


def test_a_submodule_origin_that_goes_away_is_reported_and_slots_still_get_it(
    necrod_factory: Callable[..., Necrod], workdir: Path
) -> None:
    top, lib, _inner = nested(workdir)
    d = necrod_factory(pool_config({"top": top}, slots=1, min_idle=0, max_slots=1, submodules=True,
                                   fetch_interval_s=1))  # fmt: skip
    lib.rename(workdir / "lib-gone")
    commit_file(top, "main.c", "int main(void) { return 1; }\n")

    def reported() -> list[str] | None:
        problems = pool_view(d)["submodules"]["problems"]
        return problems if problems else None

    [problem] = wait_for(reported, 60, what="the failing submodule fetch to be reported")
    assert "fetching" in problem and "slots still get it" in problem
    wait_for(lambda: d.call("slots.list", {"pool": "top"})["slots"][0]["commit"] == head_of(top), 30,
             what="the slot to move to the new base")  # fmt: skip
    slot = Path(d.call("slots.allocate", {"pool": "top"})["path"])
    assert (slot / "main.c").read_text() == "int main(void) { return 1; }\n"
    assert (slot / "vendor/lib/lib.c").read_text() == "int lib(void) { return 1; }\n"
    assert pool_view(d)["state"] == "ready"


def test_a_lease_at_another_ref_gets_the_submodules_that_ref_records(
    git_kind: str, necrod_factory: Callable[..., Necrod], workdir: Path
) -> None:
    top, lib, _inner = nested(workdir)
    d = necrod_factory(pool_config({"top": top}, slots=1, min_idle=0, max_slots=1, submodules=True,
                                   fetch_interval_s=1))  # fmt: skip
    base_lib = head_of(lib)
    git(top, "checkout", "-q", "-b", "pr")
    new = bump(top, lib)
    git(top, "checkout", "-q", "main")
    git(top, "submodule", "update", "-q")
    seen = fetched(d)
    wait_for(lambda: fetched(d) > seen + 1, 30, what="two more fetches")
    lease = d.call("slots.allocate", {"pool": "top", "ref": "pr"})
    slot = Path(lease["path"])
    assert head_of(slot / "vendor/lib") == new
    assert agent_git(slot, "status", "--porcelain", "--ignore-submodules=none") == ""
    d.call("slots.release", {"lease_id": lease["lease_id"]})
    d.wait_slots("top", "available", 1)
    again = Path(d.call("slots.allocate", {"pool": "top"})["path"])
    assert head_of(again / "vendor/lib") == base_lib
