"""Submodules an agent brings into its slot: salvaged with the slot, never handed to the next lease.

necrod does not check submodules out for agents (yet), but an agent may: ``git submodule update
--init`` fills the submodule's directory and puts its repository under the slot's git directory
(``modules/``). Found on a real repository (jq, ``vendor/oniguruma``): cleanup never looked
there, so the next holder got the edits, and no salvage had them.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import GIT_ENV, Necrod, git, pool_config

pytestmark = pytest.mark.usefixtures("slot_kind")


def superproject(workdir: Path) -> Path:
    """An origin with a submodule ``vendor/lib`` (a local repository) and a file of its own."""
    lib = workdir / "lib"
    lib.mkdir()
    git(lib, "init", "-q", "-b", "main")
    (lib / "lib.c").write_text("int lib(void) { return 1; }\n")
    (lib / "README").write_text("lib\n")
    git(lib, "add", "-A")
    git(lib, "commit", "-q", "-m", "lib")
    top = workdir / "top"
    top.mkdir()
    git(top, "init", "-q", "-b", "main")
    (top / "main.c").write_text("int main(void) { return 0; }\n")
    git(top, "add", "-A")
    git(top, "commit", "-q", "-m", "top")
    git(top, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(lib), "vendor/lib")
    git(top, "commit", "-q", "-m", "vendor lib")
    return top


def agent_git(slot: Path, *args: str) -> str:
    """git as an agent runs it in its slot (its own environment, not necrod's)."""
    result = subprocess.run(["git", "-c", "protocol.file.allow=always", *args], cwd=slot, env=GIT_ENV,
                            capture_output=True, text=True, check=True)  # fmt: skip
    return result.stdout


@pytest.fixture
def top_pool(necrod_factory: Callable[..., Necrod], workdir: Path) -> Necrod:
    # One slot: the one released is the one handed out next.
    return necrod_factory(pool_config({"top": superproject(workdir)}, slots=1, min_idle=0, max_slots=1))


def test_an_edit_in_a_submodule_is_salvaged_then_reset(top_pool: Necrod) -> None:
    d = top_pool
    first = d.call("slots.allocate", {"pool": "top"})
    slot = Path(first["path"])
    assert list((slot / "vendor/lib").iterdir()) == []  # handed out as a fresh clone has it
    agent_git(slot, "submodule", "update", "--init", "--quiet")
    (slot / "vendor/lib/lib.c").write_text("int lib(void) { return 2; }  /* agent */\n")
    (slot / "vendor/lib/notes.txt").write_text("the agent's notes\n")
    (slot / "main.c").write_text("int main(void) { return 3; }\n")
    d.call("slots.release", {"lease_id": first["lease_id"]})
    d.wait_slots("top", "available", 1)

    second = d.call("slots.allocate", {"pool": "top"})
    assert second["path"] == first["path"]
    # The next lease gets the submodule as the first did: empty, not initialised, no repository.
    assert list((slot / "vendor/lib").iterdir()) == []
    assert agent_git(slot, "submodule", "status").startswith("-")
    assert agent_git(slot, "status", "--porcelain", "--ignore-submodules=none") == ""

    shown = d.call("salvage.show", {"lease_id": first["lease_id"]})
    assert {"status": "M", "path": "main.c"} in shown["files"]
    [kept] = shown["submodules"]
    assert kept["path"] == "vendor/lib"
    mirror = Path(shown["fetch"].split()[2])
    assert git(mirror, "show", f"{kept['commit']}:lib.c") == "int lib(void) { return 2; }  /* agent */"
    assert git(mirror, "show", f"{kept['commit']}:notes.txt") == "the agent's notes"
    assert sorted(f["path"] for f in kept["files"]) == ["lib.c", "notes.txt"]


def test_a_submodule_initialised_but_untouched_needs_no_salvage(top_pool: Necrod) -> None:
    d = top_pool
    lease = d.call("slots.allocate", {"pool": "top"})
    slot = Path(lease["path"])
    agent_git(slot, "submodule", "update", "--init", "--quiet")
    assert (slot / "vendor/lib/lib.c").exists()
    d.call("slots.release", {"lease_id": lease["lease_id"]})
    d.wait_slots("top", "available", 1)
    assert d.call("salvage.list", {"pool": "top"})["salvage"] == []
    again = d.call("slots.allocate", {"pool": "top"})
    assert list((Path(again["path"]) / "vendor/lib").iterdir()) == []


def test_a_submodule_directory_an_agent_made_a_symlink_is_not_followed(
    top_pool: Necrod, workdir: Path
) -> None:
    d = top_pool
    outside = workdir / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the slot's\n")
    lease = d.call("slots.allocate", {"pool": "top"})
    slot = Path(lease["path"])
    (slot / "vendor/lib").rmdir()
    (slot / "vendor/lib").symlink_to(outside)
    d.call("slots.release", {"lease_id": lease["lease_id"]})
    d.wait_slots("top", "available", 1)
    assert (outside / "keep.txt").read_text() == "not the slot's\n"
    again = Path(d.call("slots.allocate", {"pool": "top"})["path"])
    assert (again / "vendor/lib").is_dir() and not (again / "vendor/lib").is_symlink()
    assert list((again / "vendor/lib").iterdir()) == []
