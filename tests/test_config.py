"""pools.yaml: both spellings load; every invalid file is refused whole, naming its line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from necrod.core.config import ConfigError, parse_config, parse_size, repo_transport, repo_url_problem
from necrod.io.config_files import load_config

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_native_form_with_defaults() -> None:
    c = parse_config(
        """
daemon:
  workspaces: /srv/necro
  git_concurrency: 6
  min_free_disk: 5GiB
  metrics_listen: 127.0.0.1:9464
defaults:
  slots: 3
  lease_ttl_s: 600
  cleanup: keep-ignored
pools:
  a:
    repo_url: https://example.com/a.git
    base: main
  b:
    repo_url: git@example.com:b.git
    slots: 10
    salvage: false
""",
        "pools.yaml",
    )
    assert c.daemon.git_concurrency == 6 and c.daemon.min_free_disk == 5 << 30
    assert c.daemon.metrics_listen == ("127.0.0.1", 9464)
    a, b = c.pools["a"], c.pools["b"]
    assert (a.slots, a.lease_ttl_s, a.cleanup, a.base, a.max_slots) == (3, 600, "keep-ignored", "main", 8)
    assert (b.slots, b.salvage, b.max_slots) == (10, False, 10)
    assert a.clean_flags == "-ffd"


def test_necrocode_example_loads_unchanged() -> None:
    c = load_config(EXAMPLES / "necrocode-pools.yaml")
    pool = c.pools["my-project"]
    assert pool.slots == 3 and pool.cleanup_timeout_s == 60.0 and pool.metrics is True
    assert pool.lock_timeout_s == 30.0
    assert c.pools["another-project"].slots == 2
    assert any("cleanup_options" in note for note in c.notes)


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("pools:\n  a:\n    repo_url: /x\n    slotz: 3\n", 4, "unknown key 'slotz' (did you mean 'slots'?)"),
        ("pools:\n  a:\n    repo_url: /x\n    slots: many\n", 4, "whole number"),
        ("pools:\n  a:\n    repo_url: /x\n    slots: 0\n", 4, "between 1 and"),
        ("pools:\n  a:\n    repo_url: /x\n  a:\n    repo_url: /y\n", 4, "duplicate key 'a'"),
        ("pools:\n  -bad:\n    repo_url: /x\n", 2, "invalid pool name"),
        ("pools:\n  a:\n    slots: 2\n", 2, "repo_url is required"),
        ("pools:\n  a:\n    repo_url: ext::sh -c touch% /tmp/pwned\n", 3, "transport 'ext'"),
        ("pools:\n  a:\n    repo_url: --upload-pack=evil\n", 3, "starts with '-'"),
        ("pools:\n  a:\n    repo_url: ssh://-oProxyCommand=evil/x\n", 3, "invalid host"),
        ("pools:\n  a:\n    repo_url: /x\n    num_slots: 2\n    slots: 3\n", 5, "both"),
        ("pools:\n  a:\n    repo_url: /x\n    slots: 9\n    max_slots: 4\n", 5, "below slots"),
        ("pools:\n  a:\n    repo_url: /x\n    base: 'a..b'\n", 4, "not a valid ref"),
        ("pools:\n  a:\n    repo_url: /x\n    cleanup: sometimes\n", 4, "one of full, keep-ignored"),
        ("daemon:\n  git_concurrency: 0\npools: {}\n", 2, "between 1 and"),
        ("daemon:\n  min_free_disk: lots\npools: {}\n", 2, "not a size"),
        ("daemon:\n  allowed_protocols: [file, ext]\npools: {}\n", 2, "unknown transport"),
        ("defaults:\n  repo_url: /x\npools: {}\n", 2, "belongs to a pool"),
        ("pools:\n  a: [1, 2]\n", 2, "must be a mapping"),
        ("pools:\n  a:\n    repo_url: /x\n   bad_indent: 1\n", 4, "not valid YAML"),
        ("daemon: {}\n", 1, "missing the pools"),
        ("surprise: 1\npools: {}\n", 1, "unknown key 'surprise'"),
        ("pools: {}\nrunners:\n  k:\n    launcher: kubernetes\n", 4, "needs a kubernetes: section"),
        ("pools: {}\nrunners:\n  k:\n    kubernetes: {namespace: ci}\n", 4, "kubernetes.image is required"),
        (
            "pools: {}\nrunners:\n  k:\n    kubernetes:\n      image: x\n      namespace: Prod_1\n",
            6,
            "must be a Kubernetes name",
        ),
        (
            "pools: {}\nrunners:\n  k:\n    kubernetes:\n      image: x\n      image_pull_policy: sometimes\n",
            6,
            "one of Always, IfNotPresent, Never",
        ),
        (
            "pools: {}\nrunners:\n  k:\n    kubernetes:\n      image: x\n      labels: {team: 'a b'}\n",
            6,
            "label value",
        ),
        ("pools: {}\nrunners:\n  k:\n    kubernetes:\n      image: x\n      user: root\n", 6, "uid:gid"),
        (
            "pools:\n  a:\n    repo_url: /x\n    isolation: layers\n",
            4,
            "one of worktree, shared-clone, overlay",
        ),
        ("pools:\n  a:\n    repo_url: /x\n    prepare:\n      key_files: [a]\n", 5, "needs a command"),
        ("pools:\n  a:\n    repo_url: /x\n    prepare:\n      command: []\n", 5, "may not be empty"),
        (
            "defaults:\n  prepare:\n    command: make\n    keyfiles: [a]\npools: {}\n",
            4,
            "did you mean 'key_files'",
        ),
        (
            "pools:\n  a:\n    repo_url: /x\n    prepare:\n      command: make\n      key_files: [/etc/passwd]\n",
            6,
            "name paths in the repository",
        ),
        (
            "pools:\n  a:\n    repo_url: /x\n    prepare:\n      command: make\n      timeout_s: 0\n",
            6,
            "at least 1",
        ),
        (
            "pools:\n  a:\n    repo_url: /x\n    files:\n      ../../etc/cron.d/x: /tmp/x\n",
            5,
            "inside the slot",
        ),
        ("pools:\n  a:\n    repo_url: /x\n    files:\n      .git/config: /tmp/x\n", 5, ".git directory"),
        ("pools:\n  a:\n    repo_url: /x\n    files:\n      .env: ''\n", 5, "non-empty string"),
    ],
)
def test_invalid_configs_name_their_line(text: str, line: int, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "pools.yaml")
    assert info.value.line == line, str(info.value)
    assert fragment in str(info.value)
    assert str(info.value).startswith(f"pools.yaml:{line}:")


def test_empty_file_is_an_error_not_an_empty_config() -> None:
    with pytest.raises(ConfigError, match="empty"):
        parse_config("", "pools.yaml")


def test_local_repo_paths_are_checked_and_resolved(tmp_path: Path) -> None:
    (tmp_path / "cfg").mkdir()
    cfg = tmp_path / "cfg" / "pools.yaml"
    cfg.write_text("pools:\n  a:\n    repo_url: ../nowhere\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert info.value.line == 3 and "not a directory" in str(info.value)
    (tmp_path / "plain").mkdir()
    cfg.write_text("pools:\n  a:\n    repo_url: ../plain\n")
    with pytest.raises(ConfigError, match="not a git repository"):
        load_config(cfg)
    (tmp_path / "plain" / ".git").mkdir()
    assert load_config(cfg).pools["a"].repo_url == str(tmp_path / "plain")


def test_sizes_and_transports() -> None:
    assert parse_size("5GiB") == 5 << 30
    assert parse_size("500MB") == 500_000_000
    assert parse_size("2G") == 2 << 30
    assert parse_size(1024) == 1024
    assert repo_transport("https://x/y.git") == "https"
    assert repo_transport("git@github.com:u/r.git") == "ssh"
    assert repo_transport("file:///srv/r") == "file"
    assert repo_transport("/srv/r") == "file"
    assert repo_transport("ext::sh -c x") == "ext"
    assert repo_url_problem("http://x/y", ("file", "https", "ssh")) is not None
    assert repo_url_problem("https://x/y", ("file", "https", "ssh")) is None


def test_relative_paths_resolve_where_the_file_is_named_not_where_its_symlink_leads(tmp_path: Path) -> None:
    # A mounted ConfigMap: pools.yaml -> ..data/pools.yaml -> ..2026_11_23_10_00_00.1/pools.yaml
    mount = tmp_path / "etc-necrod"
    stamped = mount / "..2026_11_23_10_00_00.1"
    stamped.mkdir(parents=True)
    (stamped / "pools.yaml").write_text("daemon:\n  workspaces: work\npools: {}\n")
    (mount / "..data").symlink_to(stamped.name)
    (mount / "pools.yaml").symlink_to("..data/pools.yaml")
    assert load_config(mount / "pools.yaml").daemon.workspaces == str(mount / "work")


def test_prepare_and_files_load_and_host_files_must_exist(tmp_path: Path) -> None:
    origin = tmp_path / "repo"
    (origin / ".git").mkdir(parents=True)
    cfg = tmp_path / "pools.yaml"
    cfg.write_text(
        "defaults:\n  prepare:\n    command: [npm, ci]\n    key_files: [package-lock.json]\n"
        "    env: {CI: 1}\npools:\n  web:\n    repo_url: ./repo\n    isolation: overlay\n"
        "    files:\n      .env: secrets/web.env\n      config/local.json: /nowhere/local.json\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert info.value.line == 11 and "secrets/web.env" in str(info.value)
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "web.env").write_text("TOKEN=1\n")
    (tmp_path / "local.json").write_text("{}\n")
    cfg.write_text(cfg.read_text().replace("/nowhere/local.json", str(tmp_path / "local.json")))
    web = load_config(cfg).pools["web"]
    assert (
        web.prepare is not None and web.prepare.command == ("npm", "ci") and web.prepare.env == (("CI", "1"),)
    )
    assert web.files == (
        (".env", str(tmp_path / "secrets" / "web.env")),
        ("config/local.json", str(tmp_path / "local.json")),
    )
    # A pool that prepares keeps ignored files when it cleans: the step's output is ignored files.
    assert web.clean_flags == "-ffd" and load_config(cfg).pools["web"].isolation == "overlay"


# --- every problem at once (issue 20) ---------------------------------------------------------------

THREE_PROBLEMS = """\
daemon:
  git_concurrency: many
pools:
  web:
    repo_url: https://example.com/web.git
    slot: 3
    base: main
  api:
    repo_url: https://example.com/api.git
    lease_ttl_s: -5
    slots: 2
"""


def test_every_problem_is_reported_with_its_line() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(THREE_PROBLEMS, "pools.yaml")
    problems = caught.value.problems
    assert [(p.line, p.column) for p in problems] == [(2, 20), (6, 5), (10, 18)]
    assert "git_concurrency must be a whole number" in problems[0].message
    assert "unknown key 'slot' (did you mean 'slots'?)" in problems[1].message
    assert "lease_ttl_s must be at least 1" in problems[2].message
    # Still one ConfigError for callers (the reload path): the first's place, every message.
    assert caught.value.line == 2 and all(p.message in caught.value.message for p in problems)
    assert str(caught.value).startswith("pools.yaml:2:20: ")


def test_an_error_in_one_key_or_pool_does_not_hide_the_next() -> None:
    text = """\
pools:
  a:
    repo_url: https://example.com/a.git
    slots: zero
    max_slots: -1
    prepare:
      command: make
      timeout_s: never
  b:
    slots: 2
  c:
    repo_url: https://example.com/c.git
    cleanup: sometimes
runners:
  r:
    launcher: rocket
    pools: [a, b, c]
"""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "pools.yaml")
    lines = [p.line for p in caught.value.problems]
    # a's three keys, b's missing repo_url, c's cleanup and the runner's launcher; naming the
    # pools a and b that failed to read is not a problem of its own.
    assert lines == [4, 5, 8, 9, 13, 16], caught.value.problems


def test_check_config_prints_one_problem_a_line(tmp_path: Path) -> None:
    path = tmp_path / "pools.yaml"
    path.write_text(THREE_PROBLEMS)
    r = subprocess.run([sys.executable, "-m", "necrod", "--check-config", str(path)], capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    lines = r.stderr.splitlines()
    assert r.returncode == 1
    assert [line.split(": ", 1)[0] for line in lines[:3]] == [f"{path}:2:20", f"{path}:6:5", f"{path}:10:18"]
    assert "3 problems" in lines[3]


# --- ${VAR} ---------------------------------------------------------------------------------------


def test_variables_are_refused_naming_the_key_and_line() -> None:
    text = "pools:\n  web:\n    repo_url: https://${GIT_HOST}/web.git\n    base: ${BRANCH:-main}\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "pools.yaml")
    first, second = caught.value.problems
    assert (first.line, second.line) == (3, 4)
    assert "pools.web.repo_url: ${GIT_HOST} is not expanded" in first.message and "envsubst" in first.message
    assert "pools.web.base: ${BRANCH:-main} is not expanded" in second.message


def test_a_shell_command_keeps_its_variables() -> None:
    text = """\
pools:
  web:
    repo_url: https://example.com/web.git
    prepare:
      command: "npm ci --cache ${HOME}/.npm"
      env: {NPM_TOKEN: "${NPM_TOKEN}"}
"""
    with pytest.raises(ConfigError, match=r"prepare.env.NPM_TOKEN: \$\{NPM_TOKEN\} is not expanded"):
        parse_config(text, "pools.yaml")
    config = parse_config(text.replace('      env: {NPM_TOKEN: "${NPM_TOKEN}"}\n', ""), "pools.yaml")
    prepare = config.pools["web"].prepare
    assert prepare is not None and prepare.command == "npm ci --cache ${HOME}/.npm"
    with pytest.raises(ConfigError, match="is not expanded"):
        parse_config(
            text.replace('"npm ci --cache ${HOME}/.npm"', '["npm", "--cache", "${HOME}"]'), "pools.yaml"
        )
