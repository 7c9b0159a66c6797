"""Names that reach git: pool names, refs and branches are checked before git ever sees them."""

from __future__ import annotations

import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from necrod.core.names import (
    check_branch,
    check_ref,
    parse_slot_id,
    pool_name_problem,
    ref_name_problem,
    shown_url,
)
from necrod.proto.errors import InvalidParams


def git_accepts(name: str) -> bool:
    result = subprocess.run(["git", "check-ref-format", "--allow-onelevel", name], capture_output=True)
    return result.returncode == 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=st.sampled_from("ab/.-_@{}~^:?*[\\ \t~lock0"), min_size=1, max_size=12))
def test_ref_rules_agree_with_git(name: str) -> None:
    ours = ref_name_problem(name) is None
    if name.startswith("-"):
        assert not ours  # stricter than git on purpose: never an option
    else:
        assert ours == git_accepts(name), name


@pytest.mark.parametrize(
    "name",
    [
        "--upload-pack=touch /tmp/x",
        "-oProxyCommand=x",
        "a..b",
        "a/../b",
        "x.lock",
        ".hidden",
        "a//b",
        "end.",
        "a@{1}",
        "@",
        "sp ace",
        "tab\there",
        "nul\x00",
        "HEAD~1",
        "a^",
        "a:b",
        "a?",
        "a*",
        "a[",
        "back\\slash",
    ],
)
def test_hostile_refs_are_invalid_params(name: str) -> None:
    with pytest.raises(InvalidParams):
        check_ref(name)


def test_branches_are_short_names() -> None:
    assert check_branch("feature/x") == "feature/x"
    for bad in ("HEAD", "refs/heads/x", "-x"):
        with pytest.raises(InvalidParams):
            check_branch(bad)


@pytest.mark.parametrize("name", ["repo", "my-project", "a.b_c-1", "X9"])
def test_good_pool_names(name: str) -> None:
    assert pool_name_problem(name) is None


@pytest.mark.parametrize("name", ["", "-x", ".x", "..", "a/b", "a b", "ä", "x" * 65, "a\nb"])
def test_bad_pool_names(name: str) -> None:
    assert pool_name_problem(name) is not None


def test_slot_ids() -> None:
    assert parse_slot_id("my-pool/12") == ("my-pool", 12)
    for bad in ("12", "pool/", "pool/x", "../1", "-p/1"):
        with pytest.raises(InvalidParams):
            parse_slot_id(bad)


def test_a_url_is_shown_without_its_secret() -> None:
    """pools.get and pools.list answer every peer; a token in ``repo_url`` is the operator's."""
    assert shown_url("https://user:ghp_s3cret@github.com/o/r.git") == "https://user:***@github.com/o/r.git"
    assert shown_url("https://ghp_s3cret@github.com/o/r") == "https://***@github.com/o/r"
    assert shown_url("https://a:b@c@host") == "https://a:***@host"
    for kept in ("https://github.com/o/r.git", "git@github.com:o/r.git", "/srv/git/r.git", "file:///srv/r"):
        assert shown_url(kept) == kept
