"""``sparse:`` and ``filter:`` in pools.yaml, and the pure pieces behind them: what a sparse set
may name, the pattern file it becomes, git's progress lines read and throttled."""

from __future__ import annotations

import pytest

from necrod.core.config import ConfigError, parse_config
from necrod.core.progress import ProgressThrottle, parse_progress
from necrod.core.sparse import cone_patterns, filter_problem, in_cone, normalize, sparse_set_problem


def test_sparse_and_filter_load_from_pools_and_defaults() -> None:
    cfg = parse_config(
        "defaults:\n  sparse: [docs]\npools:\n"
        "  mono:\n    repo_url: https://example.com/m.git\n    sparse: [services/api/, ./libs, services/api/x]\n"
        "    filter: blob:none\n"
        "  other:\n    repo_url: https://example.com/o.git\n    filter: blob:limit=1m\n"
    )
    assert cfg.pools["mono"].sparse == ("libs", "services/api")
    assert cfg.pools["mono"].filter == "blob:none"
    assert cfg.pools["other"].sparse == ("docs",)
    assert cfg.pools["other"].filter == "blob:limit=1m"


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("[../etc]", "'..' component"),
        ("[/abs]", "relative"),
        ("[-rf]", "may not start with '-'"),
        ("[a/.git]", ".git directory"),
        ("[.GIT]", ".git directory"),
        ("['src/*']", "glob characters"),
        ("src", "must be a list"),
        ("[1]", "every item must be a string"),
        (f"[{'a' * 1100}]", "longer than 1024 bytes"),
        ("[" + ", ".join(f"d{i}" for i in range(300)) + "]", "at most 256"),
    ],
)
def test_bad_sparse_entries_are_refused_with_their_line(value: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(f"pools:\n  p:\n    repo_url: https://example.com/p.git\n    sparse: {value}\n")
    assert fragment in str(err.value)
    assert err.value.line == 4


@pytest.mark.parametrize(
    "value", ["tree:0", "blob:limit=0", "sparse:oid=abc", "combine:blob:none+tree:1", "x"]
)
def test_only_blob_filters_are_accepted(value: str) -> None:
    with pytest.raises(ConfigError, match="filter must be one of blob:none, blob:limit"):
        parse_config(f"pools:\n  p:\n    repo_url: https://example.com/p.git\n    filter: '{value}'\n")


def test_sparse_is_refused_on_overlay_pools() -> None:
    with pytest.raises(ConfigError, match="sparse does not apply to overlay slots"):
        parse_config(
            "pools:\n  p:\n    repo_url: https://example.com/p.git\n    isolation: overlay\n    sparse: [a]\n"
        )


def test_cone_patterns_are_gits_own() -> None:
    assert cone_patterns(("a/b/c", "d")) == "/*\n!/*/\n/a/\n!/a/*/\n/a/b/\n!/a/b/*/\n/a/b/c/\n/d/\n"
    assert cone_patterns(()) == "/*\n"
    assert normalize(["a/b", "a", "c/"]) == ("a", "c")
    assert in_cone("top.txt", ("a/b",)) and in_cone("a/f", ("a/b",)) and in_cone("a/b/x/y", ("a/b",))
    assert not in_cone("a/c/f", ("a/b",)) and not in_cone("z/f", ("a/b",))
    assert sparse_set_problem([]) is None and filter_problem("blob:limit=10k") is None


def test_git_progress_lines_are_read() -> None:
    assert parse_progress("Receiving objects:  45% (450/1000), 1.2 MiB | 3 MiB/s") == (
        "receiving objects", 45, 450, 1000)  # fmt: skip
    assert parse_progress("Resolving deltas: 100% (20/20), done.") == ("resolving deltas", 100, 20, 20)
    assert parse_progress("remote: Counting objects: 12% (1/8)") == ("counting objects", 12, 1, 8)
    assert parse_progress("Enumerating objects: 5, done.") == ("enumerating objects", None, 5, None)
    assert parse_progress("warning: something") is None


def test_progress_is_throttled_but_a_new_phase_or_the_end_gets_through() -> None:
    throttle = ProgressThrottle(interval_s=0.5, phase_interval_s=0.2)
    assert throttle.due(0.0, "receiving objects", 1)
    assert not throttle.due(0.1, "receiving objects", 2)
    assert not throttle.due(0.15, "resolving deltas", 0)  # a new phase, but too soon
    assert throttle.due(0.25, "resolving deltas", 3)
    assert throttle.due(0.3, "resolving deltas", 100)  # the end of a phase always
    assert not throttle.due(0.31, "resolving deltas", 100)  # ... once
    assert throttle.due(0.9, "resolving deltas", 100) is False


def test_necroctl_pools_shows_a_pool_coming_up(capsys: pytest.CaptureFixture[str]) -> None:
    from necrod.ctl import show

    pool = {"name": "mono", "state": "cloning", "base": "main", "base_commit": None, "waiting": 0,
            "slots": {"available": 0, "allocated": 0, "cleaning": 0, "creating": 0, "error": 0},
            "fetch": {"state": "idle", "last_ok_at": None}, "prepare": None,
            "progress": {"stage": "mirror", "phase": "receiving objects", "percent": 45, "done": 9, "total": 20}}  # fmt: skip
    show.pools({"pools": [pool]})
    assert "cloning: receiving objects 45%" in capsys.readouterr().out
    pool.update(state="ready", progress={"stage": "slots", "phase": "creating slots", "percent": 50, "done": 1,
                                         "total": 2})  # fmt: skip
    show.pools({"pools": [pool]})
    assert "ready: creating slots 1/2" in capsys.readouterr().out


def test_a_runner_profile_carries_a_sparse_set_for_its_tasks() -> None:
    cfg = parse_config(
        "pools:\n  p:\n    repo_url: https://example.com/p.git\n"
        "runners:\n  docs-bot:\n    command: ['true']\n    sparse: [docs/, site]\n"
    )
    assert cfg.runners["docs-bot"].sparse == ("docs", "site")
    with pytest.raises(ConfigError, match=r"runners\.bad\.sparse: '\.\./up' has a '\.\.' component"):
        parse_config("pools: {}\nrunners:\n  bad:\n    command: ['true']\n    sparse: [../up]\n")
