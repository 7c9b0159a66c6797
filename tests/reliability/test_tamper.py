"""A hostile slot plants code in the repository configuration it can reach.

Every worktree of a pool shares the mirror's ``config``, ``info/``, ``hooks/`` and object store,
and an agent reaches them from its slot (``git config`` in a worktree writes the shared config).
A shared-clone slot has a ``.git`` of its own, which the agent writes instead. Either way,
whatever it plants must not run under the daemon's git; what it changed goes back to what necrod
wrote, and a ``tamper`` event (topic ``pools``) names the leases held at the time. Every case
runs on both kinds of pool.

Each planted command would create a marker file; the marker must never appear.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from necrod.client import Client
from necrod.core.config.model import ISOLATIONS as KINDS
from necrod.daemon.mirror import canonical_config
from necrod.daemon.slotkinds import clone_config
from tests.helpers import Necrod, cleanup_dir, commit_file, git, short_tmpdir, wait_for
from tests.reliability.conftest import FIGURES, daemon_config, slots_by_id, wait_settled, workspaces_of

pytestmark = pytest.mark.reliability


@dataclass
class Scene:
    d: Necrod
    origin: Path
    mirror: Path
    markers: Path
    kind: str

    def reachable(self, slot: Path) -> Path:
        """The repository directory an agent in ``slot`` can write: the mirror, or its own."""
        return self.mirror if self.kind == "worktree" else slot / ".git"


@pytest.fixture(scope="module", params=KINDS)
def scene(module_daemon: Callable[..., Necrod], request: pytest.FixtureRequest) -> Iterator[Scene]:
    markers = short_tmpdir()
    origins: list[Path] = []

    def config(origin: Path) -> str:
        origins.append(origin)
        return daemon_config({"repo": origin}, {"heal_interval_s": 0}, slots=3, max_slots=3, min_idle=0,
                             isolation=request.param)  # fmt: skip

    d = module_daemon(config)
    yield Scene(d, origins[0], workspaces_of(d) / "repo" / "mirror.git", markers, request.param)
    cleanup_dir(markers)


@pytest.fixture
def marker(scene: Scene, request: pytest.FixtureRequest) -> Iterator[Path]:
    path = scene.markers / request.node.name.replace("[", "-").replace("]", "").replace("/", "-")
    yield path
    restore_by_hand(scene)


def restore_by_hand(scene: Scene) -> None:
    """Put the mirror back as necrod writes it, so one case cannot leak into the next."""
    (scene.mirror / "config").write_text(canonical_config(str(scene.origin)))
    for name in ("hooks", "info"):
        shutil.rmtree(scene.mirror / name, ignore_errors=True)
        (scene.mirror / name).mkdir(exist_ok=True)
    (scene.mirror / "objects" / "info" / "alternates").unlink(missing_ok=True)
    for admin in (scene.mirror / "worktrees").iterdir() if scene.kind == "worktree" else []:
        (admin / "config.worktree").unlink(missing_ok=True)


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


# --- what an agent plants, from the slot it holds ------------------------------------------------------


def plant_fsmonitor(slot: Path, mirror: Path, m: Path) -> None:
    git(slot, "config", "core.fsmonitor", f"touch {m}")


def plant_hooks_path(slot: Path, mirror: Path, m: Path) -> None:
    hooks = slot.parent.parent / "evil-hooks"
    for hook in ("post-checkout", "reference-transaction", "pre-commit", "post-index-change"):
        executable(hooks / hook, f"#!/bin/sh\ntouch {m}\n")
    git(slot, "config", "core.hooksPath", str(hooks))


def plant_hooks(slot: Path, mirror: Path, m: Path) -> None:
    for hook in (
        "post-checkout",
        "reference-transaction",
        "pre-auto-gc",
        "post-index-change",
        "fsmonitor-watchman",
    ):
        executable(mirror / "hooks" / hook, f"#!/bin/sh\ntouch {m}\n")


def plant_include(slot: Path, mirror: Path, m: Path) -> None:
    extra = slot.parent.parent / "evil.gitconfig"
    extra.write_text(
        f"[core]\n\tfsmonitor = touch {m}\n\thooksPath = /nonexistent\n"
        f'[filter "inc"]\n\tclean = touch {m}; cat\n\tsmudge = touch {m}; cat\n'
        f'[remote "origin"]\n\tuploadpack = touch {m}; git-upload-pack\n'
    )
    (mirror / "info").mkdir(exist_ok=True)
    (mirror / "info" / "attributes").write_text("* filter=inc\n")
    git(slot, "config", "include.path", str(extra))


def plant_ssh_command(slot: Path, mirror: Path, m: Path) -> None:
    git(slot, "config", "core.sshCommand", f"touch {m}; ssh")
    git(slot, "config", "core.gitProxy", f"touch {m}")


def plant_upload_pack(slot: Path, mirror: Path, m: Path) -> None:
    git(slot, "config", "remote.origin.uploadpack", f"touch {m}; git-upload-pack")
    git(slot, "config", "uploadpack.packObjectsHook", f"touch {m}; git")
    git(slot, "config", "remote.origin.receivepack", f"touch {m}; git-receive-pack")


def plant_url_rewrite(slot: Path, mirror: Path, m: Path) -> None:
    git(slot, "config", "protocol.ext.allow", "always")
    git(slot, "config", "--add", f"url.ext::sh -c touch% {m}% #.insteadOf", "/")
    git(slot, "config", "remote.origin.url", f"ext::sh -c touch% {m}")


def plant_credential_helper(slot: Path, mirror: Path, m: Path) -> None:
    git(slot, "config", "credential.helper", f"!touch {m}")
    git(slot, "config", "core.askPass", f"touch {m}")


def plant_diff_external(slot: Path, mirror: Path, m: Path) -> None:
    git(slot, "config", "diff.external", f"touch {m}")
    git(slot, "config", "diff.evil.textconv", f"touch {m}; cat")
    (mirror / "info").mkdir(exist_ok=True)
    (mirror / "info" / "attributes").write_text("* diff=evil\n")


def plant_filter_info_attributes(slot: Path, mirror: Path, m: Path) -> None:
    git(slot, "config", "filter.evil.clean", f"touch {m}; cat")
    git(slot, "config", "filter.evil.smudge", f"touch {m}; cat")
    git(slot, "config", "filter.evil.process", f"touch {m}")
    git(slot, "config", "filter.evil.required", "true")
    (mirror / "info").mkdir(exist_ok=True)
    (mirror / "info" / "attributes").write_text("* filter=evil\n")


def plant_filter_gitattributes(slot: Path, mirror: Path, m: Path) -> None:
    git(slot, "config", "filter.evil.clean", f"touch {m}; cat")
    git(slot, "config", "filter.evil.smudge", f"touch {m}; cat")
    (slot / ".gitattributes").write_text("* filter=evil\n")


def plant_alternates(slot: Path, mirror: Path, m: Path) -> None:
    elsewhere = slot.parent.parent / "evil-objects"
    elsewhere.mkdir(exist_ok=True)
    (mirror / "objects" / "info").mkdir(exist_ok=True)
    (mirror / "objects" / "info" / "alternates").write_text(f"{elsewhere}\n")


def plant_signing(slot: Path, mirror: Path, m: Path) -> None:
    git(slot, "config", "commit.gpgSign", "true")
    git(slot, "config", "gpg.program", f"touch {m}")
    git(slot, "config", "log.showSignature", "true")


def plant_worktree_config(slot: Path, mirror: Path, m: Path) -> None:
    git(slot, "config", "extensions.worktreeConfig", "true")
    git(slot, "config", "--worktree", "core.fsmonitor", f"touch {m}")
    git(slot, "config", "--worktree", "filter.wt.clean", f"touch {m}; cat")
    (slot / ".gitattributes").write_text("* filter=wt\n")


def plant_core_worktree(slot: Path, mirror: Path, m: Path) -> None:
    git(slot, "config", "core.bare", "false")
    git(slot, "config", "core.worktree", str(m.parent))


PLANTS: dict[str, Callable[[Path, Path, Path], None]] = {
    f.__name__.removeprefix("plant_").replace("_", "-"): f
    for f in [
        plant_fsmonitor,
        plant_hooks_path,
        plant_hooks,
        plant_include,
        plant_ssh_command,
        plant_upload_pack,
        plant_url_rewrite,
        plant_credential_helper,
        plant_diff_external,
        plant_filter_info_attributes,
        plant_filter_gitattributes,
        plant_alternates,
        plant_signing,
        plant_worktree_config,
        plant_core_worktree,
    ]
}


def assert_canonical(scene: Scene, slot: Path) -> None:
    assert (scene.mirror / "config").read_text() == canonical_config(str(scene.origin))
    assert not list((scene.mirror / "hooks").iterdir())
    assert not list((scene.mirror / "info").iterdir())
    assert not (scene.mirror / "objects" / "info" / "alternates").exists()
    if scene.kind != "worktree":
        own = slot / ".git"
        assert (own / "config").read_text() == clone_config(str(scene.origin))
        assert not list((own / "hooks").iterdir()) and not list((own / "info").iterdir())
        assert (own / "objects" / "info" / "alternates").read_text() == f"{scene.mirror / 'objects'}\n"
        assert not (own / "config.worktree").exists()


def tamper_events(c: Client) -> list[dict[str, Any]]:
    return [e for e in c.events(timeout=0.5) if e["type"] == "tamper"]


@pytest.mark.parametrize("plant", list(PLANTS))
def test_planted_code_never_runs_under_cleanup_or_fetch(scene: Scene, marker: Path, plant: str) -> None:
    d = scene.d
    wait_settled(d)
    with d.client() as watcher, d.client() as c:
        watcher.subscribe(["pools"], snapshot=False)
        bystander = c.allocate("repo", holder="bystander")
        agent = c.allocate("repo", holder="agent")
        slot = Path(agent["path"])
        PLANTS[plant](slot, scene.reachable(slot), marker)
        FIGURES["tamper plants"] += 1
        # The agent leaves work behind and releases: salvage, checkout and clean run in its slot.
        (slot / "README").write_text("the agent's edit\n")
        (slot / "notes.txt").write_text("untracked work\n")
        c.release(agent["lease_id"])
        wait_for(lambda: slots_by_id(d)[agent["slot_id"]]["state"] == "available", 30, what="the cleanup")
        # A fetch and a checkout for a branch pushed meanwhile.
        commit_file(scene.origin, f"{plant}.txt", "x\n", branch=f"after-{plant}")
        fetched = c.allocate("repo", ref=f"after-{plant}", wait_s=30, holder="fetcher")
        assert git(fetched["path"], "rev-parse", "HEAD") == git(scene.origin, "rev-parse", f"after-{plant}")
        shown = c.salvage_show(agent["lease_id"])
        events = tamper_events(watcher)
        c.release(fetched["lease_id"], salvage=False)
        c.release(bystander["lease_id"], salvage=False)
    assert not marker.exists(), f"{plant}: planted code ran under the daemon's git"
    assert_canonical(scene, slot)
    assert {"README", "notes.txt"} <= {f["path"] for f in shown["files"]}, "the agent's work was not salvaged"
    assert events, f"{plant}: no tamper event"
    held = {lease["lease_id"] for e in events for lease in e["leases"]}
    assert bystander["lease_id"] in held, events
    assert all(e["pool"] == "repo" and e["changed"] for e in events)


@pytest.mark.parametrize(
    "plant",
    PLANTS,
)
def test_planted_code_never_runs_under_a_deep_health_scan_or_salvage_queries(
    scene: Scene, marker: Path, plant: str
) -> None:
    d = scene.d
    wait_settled(d)
    with d.client() as c:
        agent = c.allocate("repo", holder="agent")
        slot = Path(agent["path"])
        PLANTS[plant](slot, scene.reachable(slot), marker)
        FIGURES["tamper plants"] += 1
        wait_settled(d)  # an overlay slot touched by the last plant is salvaged and reset first
        # An idle slot whose files look touched (an agent can reach those too): git must re-read them.
        idle = next(s for s in slots_by_id(d).values() if s["state"] == "available")
        os.utime(Path(idle["path"]) / "README", (1_000_000_000, 1_000_000_000))
        c.call("anomalies.list", {"pool": "repo", "deep": True, "heal": True})
        c.salvage_list("repo")
        for item in c.salvage_list("repo")["salvage"][:3]:
            c.salvage_show(item["lease_id"])
        c.release(agent["lease_id"], salvage=False)
        wait_settled(d)
    assert not marker.exists(), f"{plant}: planted code ran under the daemon's git"
