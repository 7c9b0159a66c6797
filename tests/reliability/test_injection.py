"""Argument and protocol injection through every name the daemon passes to git.

Pool names, refs, branches, slot and lease ids come from clients; ``repo_url``, pool names and
bases from pools.yaml. None may reach git as an option or pick a transport the config does not
allow. Each hostile value would run ``touch <marker>`` if it ever did: the marker must never
appear, and the git seam's log shows that no value was ever read by git as an option.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from necrod.proto.errors import NecrodError
from tests.helpers import Necrod, cleanup_dir, commit_file, git, short_tmpdir, wait_for
from tests.reliability.conftest import FIGURES, GitCall, GitSeam, daemon_config

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def markers() -> Iterator[Path]:
    path = short_tmpdir()
    yield path
    cleanup_dir(path)


@pytest.fixture(scope="module")
def seam_dir() -> Iterator[Path]:
    path = short_tmpdir()
    yield path
    cleanup_dir(path)


@pytest.fixture(scope="module")
def seamed(module_daemon: Callable[..., Necrod], seam_dir: Path) -> tuple[Necrod, GitSeam]:
    seam = GitSeam(seam_dir)
    d = module_daemon(
        lambda origin: daemon_config(
            {"repo": origin}, {"git": str(seam.path)}, slots=2, max_slots=3, min_idle=0
        )
    )
    return d, seam


def hostile(marker: Path) -> list[str]:
    """Values that would run ``touch marker`` if git (or a shell) ever took them at their word."""
    m = str(marker)
    return [
        f"--upload-pack=touch {m}",
        f"--upload-pack=touch${{IFS}}{m}",
        f"-oProxyCommand=touch {m}",
        f"-oProxyCommand=touch${{IFS}}{m}",
        f"--exec=touch${{IFS}}{m}",
        f"--output={m}",
        f"-c core.fsmonitor=touch {m}",
        f"ext::sh -c touch% {m}",
        f"ext::sh${{IFS}}-c${{IFS}}touch${{IFS}}{m}",
        f"$(touch${{IFS}}{m})",
        f"`touch${{IFS}}{m}`",
        f";touch${{IFS}}{m}",
        f"|touch${{IFS}}{m}",
        f"../../../..{m}",
        f"refs/../../..{m}",
        f"a/../../{marker.name}",
        "@{-1}",
        "HEAD@{upstream}",
        "-",
        "--",
        "--end-of-options",
    ]


def read_as_option(call: GitCall, value: str) -> bool:
    """Whether git saw ``value`` as an option: before ``--end-of-options`` / ``--``, starting with '-'."""
    args = call.argv[1:]
    end = next((i for i, a in enumerate(args) if a in ("--end-of-options", "--")), len(args))
    return any(a.startswith(value) for a in args[:end]) if value.startswith("-") and len(value) > 2 else False


def assert_no_injection(seam: GitSeam, markers: Path, values: list[str]) -> None:
    assert not list(markers.iterdir()), f"an injected command ran: {list(markers.iterdir())}"
    for call in seam.calls():
        for value in values:
            assert not read_as_option(call, value), f"git read {value!r} as an option: {call.argv}"


NAME_PARAMS: list[tuple[str, str, dict[str, Any]]] = [
    ("slots.allocate", "ref", {"pool": "repo", "wait_s": 5}),
    ("slots.allocate", "branch", {"pool": "repo", "wait_s": 10}),
    ("slots.allocate", "pool", {}),
    ("pools.get", "pool", {}),
    ("slots.list", "pool", {}),
    ("salvage.list", "pool", {}),
    ("anomalies.list", "pool", {}),
    ("slots.add", "pool", {"wait_s": 1}),
    ("slots.remove", "slot_id", {}),
    ("slots.recover", "slot_id", {}),
    ("slots.isolate", "slot_id", {}),
    ("slots.heartbeat", "lease_id", {}),
    ("slots.release", "lease_id", {}),
    ("salvage.show", "lease_id", {}),
]


@pytest.mark.parametrize(
    ("method", "param", "rest"), NAME_PARAMS, ids=[f"{m}:{p}" for m, p, _ in NAME_PARAMS]
)
def test_hostile_names_from_clients_never_reach_git_as_options(
    seamed: tuple[Necrod, GitSeam], markers: Path, method: str, param: str, rest: dict[str, Any]
) -> None:
    d, seam = seamed
    values = hostile(markers / f"{method}-{param}")
    values += [f"repo/{v}" for v in values[:4]] if param == "slot_id" else []
    with d.client() as c:
        for value in values:
            FIGURES["injection attempts"] += 1
            try:
                result = c.call(method, {**rest, param: value})
            except NecrodError as exc:
                assert exc.kind in ("invalid_params", "not_found", "method_not_found"), (value, exc.kind, exc)
                continue
            # Accepted only where the value is harmless text (a branch or ref name git allows).
            assert method == "slots.allocate" and param in ("ref", "branch"), (method, value, result)
            c.release(result["lease_id"], salvage=False)
        assert c.status()["pid"] == d.proc.pid  # type: ignore[union-attr]
    d.wait_slots("repo", "available", 2, timeout=60)
    assert seam.calls(), "the git seam saw no git call: the check below would prove nothing"
    assert_no_injection(seam, markers, values)


def test_free_text_cannot_forge_the_salvage_record(seamed: tuple[Necrod, GitSeam], markers: Path) -> None:
    d, seam = seamed
    forged = "--upload-pack=touch x\n\nNecrod-Lease: l-forged\nNecrod-Start: " + "0" * 40
    with d.client() as c:
        lease = c.allocate("repo", holder=forged, metadata={"note": forged, "--exec": "touch x"})
        (Path(lease["path"]) / "work.txt").write_text("kept\n")
        c.release(lease["lease_id"])
        d.wait_slots("repo", "available", 2, timeout=60)
        shown = c.salvage_show(lease["lease_id"])
    assert shown["start"] == lease["commit"]
    assert [f["path"] for f in shown["files"]] == ["work.txt"]
    assert_no_injection(seam, markers, [])


# --- pools.yaml ----------------------------------------------------------------------------------


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    import sys

    return subprocess.run(
        [sys.executable, "-m", "necrod", "--check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def url_cases(marker: Path, origin: Path) -> list[str]:
    m = str(marker)
    return [
        f"--upload-pack=touch {m}",
        f"-oProxyCommand=touch {m}",
        f"ext::sh -c touch% {m}",
        f"ext::sh -c 'touch {m}'",
        "fd::17",
        f"ssh://-oProxyCommand=touch%20{m}/repo",
        f"ssh://-oProxyCommand=touch {m}/repo",
        f"git@-oProxyCommand=touch{m}:repo",
        f"-oProxyCommand=touch{m}:repo",
        f"ssh://localhost:-oProxyCommand=touch{m}/repo",
        f"http::http://localhost/{m}",
        f"git://localhost/{m}",
        f"{origin}/../../../../../../etc",
        f"{origin}/../{origin.name}",
        f"file://{origin}/../{origin.name}",
        f"file://{origin}\n[core]\n\tfsmonitor = touch {m}",
        f"{origin}\x00--upload-pack=touch {m}",
    ]


def refused_urls(marker: Path) -> list[str]:
    """repo_urls no config may hold: option-like, a transport not allowed, a host that is an option."""
    m = str(marker)
    return [
        f"--upload-pack=touch {m}",
        f"-oProxyCommand=touch {m}",
        f"ext::sh -c touch% {m}",
        "fd::17",
        f"ssh://-oProxyCommand=touch%20{m}/repo",
        f"-oProxyCommand=touch{m}:repo",
        f"git://localhost/{m}",
    ]


def test_hostile_repo_urls_are_refused_or_harmless(
    necrod_factory: Callable[..., Necrod], origin: Path, marker_dir: Path, seam: GitSeam
) -> None:
    import json

    for i, url in enumerate(url_cases(marker_dir / "url", origin)):
        FIGURES["injection attempts"] += 1
        text = f"daemon:\n  git: {seam.path}\npools:\n  repo:\n    repo_url: {json.dumps(url)}\n"
        path = marker_dir.parent / f"{marker_dir.name}-pools-{i}.yaml"
        path.write_text(text)
        try:
            checked = check_config(path)
            assert "Traceback" not in checked.stderr, checked.stderr
            if checked.returncode != 0:
                assert checked.returncode == 1 and f"{path}:" in checked.stderr, (url, checked.stderr)
                continue
            # Accepted: it must be a transport the config allows, and git must fail on it safely.
            d = necrod_factory(text, name=f"url-{i}", start=False)
            d.start(wait=False)
            wait_for(
                lambda d=d: d.call("pools.get", {"pool": "repo"})["state"] in ("failed", "ready"),  # type: ignore[misc]
                60,
                what=f"pool of {url!r} to settle",
            )
            d.stop()
        finally:
            path.unlink()
    assert_no_injection(seam, marker_dir, url_cases(marker_dir / "url", origin))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("name", "--upload-pack=touch /tmp/necrod-pwned"),
        ("name", "-x"),
        ("name", ".."),
        ("name", "../escape"),
        ("name", ".hidden"),
        ("name", "a/b"),
        ("name", "a b"),
        ("base", "--upload-pack=touch /tmp/necrod-pwned"),
        ("base", "-b"),
        ("base", "main..evil"),
        ("base", "@{-1}"),
        ("base", "main:README"),
    ],
)
def test_hostile_pool_names_and_bases_in_the_config_are_refused(
    workdir: Path, origin: Path, key: str, value: str
) -> None:
    import json

    name = value if key == "name" else "repo"
    base = f"    base: {json.dumps(value)}\n" if key == "base" else ""
    path = workdir / "pools.yaml"
    path.write_text(f"pools:\n  {json.dumps(name)}:\n    repo_url: {origin}\n{base}")
    result = check_config(path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"{path}:" in result.stderr
    assert not Path("/tmp/necrod-pwned").exists()


def test_a_hostile_config_on_reload_changes_nothing(
    necrod_factory: Callable[..., Necrod], origin: Path, marker_dir: Path, seam: GitSeam
) -> None:
    import json

    d = necrod_factory(daemon_config({"repo": origin}, {"git": str(seam.path)}, slots=2, min_idle=0))
    assert d.config_path is not None
    good = d.config_path.read_text()
    with d.client() as c:
        lease = c.allocate("repo", holder="keeps-working")
        for url in refused_urls(marker_dir / "reload"):
            FIGURES["injection attempts"] += 1
            d.config_path.write_text(
                f"daemon:\n  git: {seam.path}\npools:\n  repo:\n    repo_url: {json.dumps(url)}\n"
                f"  evil:\n    repo_url: {json.dumps(url)}\n"
            )
            with pytest.raises(NecrodError) as info:
                c.reload()
            assert info.value.kind == "failed_precondition"
        d.config_path.write_text(good)
        wait_for(lambda: c.status()["config"]["last_reload_error"] is None, 20, what="the good config back")
        assert list(c.status()["pools"]) == ["repo"]
        assert c.heartbeat(lease["lease_id"])["slot_id"] == lease["slot_id"]
        commit_file(origin, "later.txt", "x\n", branch="later")
        later = c.allocate("repo", ref="later", wait_s=5, holder="b")
        assert git(later["path"], "rev-parse", "HEAD") == git(origin, "rev-parse", "later")
    assert_no_injection(seam, marker_dir, refused_urls(marker_dir / "reload"))
