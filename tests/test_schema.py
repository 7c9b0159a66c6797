"""The JSON Schema of pools.yaml (``necrod --print-schema``): it takes what necrod takes, and
flags what editors should flag — unknown keys and wrong types."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from necrod.core.config import parse_config
from necrod.core.config.schemadoc import pools_yaml_schema
from tests.helpers import pool_config

ROOT = Path(__file__).parent.parent

#: A config that touches every section and most kinds of value.
EVERYTHING = """\
daemon:
  workspaces: /srv/necro
  git_concurrency: 6
  min_free_disk: 5GiB
  metrics_listen: 127.0.0.1:9464
  allowed_protocols: [file, https, ssh]
  socket_group: necro
defaults:
  slots: 3
  lease_ttl_s: 600
  max_lease_s: null
  fetch_interval_s: 0
  cleanup: keep-ignored
  salvage_max_bytes: 100MiB
pools:
  web:
    repo_url: https://example.com/web.git
    base: main
    isolation: overlay
    prepare:
      command: npm ci
      key_files: [package-lock.json]
      env: {NODE_ENV: production, JOBS: 4}
      timeout_s: 900
    files: {.env: secrets/web.env}
  legacy:
    repo_url: git@example.com:legacy.git
    num_slots: 2
    cleanup_options: {fetch_on_allocate: true}
runners:
  claude:
    launcher: process
    command: ["claude", "-p", "{payload.prompt}"]
    max_concurrency: 4
    memory_limit: 2GiB
    timeout_s: null
    env: {MODE: agent}
    pools: [web]
  boxed:
    launcher: container
    command: make test
    container: {image: "debian:stable", user: "1000:1000", mounts: [/cache], pids_limit: 512}
  pod:
    launcher: kubernetes
    command: make test
    kubernetes: {image: "debian:stable", namespace: ci, labels: {team: infra}}
dispatcher:
  policy: fair-share
  max_running: 8
  label_priority: {urgent: 100}
  fair_share: {half_life_s: 3600, key: label, weights: {infra: 2}}
hosts:
  far:
    address: ssh://ops@build-2
    pools: [web]
    max_concurrency: 2
"""


def configs() -> list[tuple[str, str]]:
    out = [(str(p.relative_to(ROOT)), p.read_text()) for p in sorted((ROOT / "examples").glob("*.yaml"))]
    configmap = yaml.safe_load((ROOT / "deploy/kubernetes/configmap.yaml").read_text())
    out.append(("deploy configmap", configmap["data"]["pools.yaml"]))
    out.append(
        ("tests: pool_config", pool_config({"repo": "/srv/repo.git", "b": "/srv/b"}, slots=2, min_idle=0))
    )
    out.append(("tests: every section", EVERYTHING))
    return out


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema = pools_yaml_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize(("name", "text"), configs(), ids=[n for n, _ in configs()])
def test_what_necrod_loads_the_schema_accepts(
    validator: jsonschema.Draft7Validator, name: str, text: str
) -> None:
    parse_config(text, name)  # necrod takes it...
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(yaml.safe_load(text))
    ]
    assert errors == []  # ...and so does the schema


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (lambda c: c.update(extra=1), ""),
        (lambda c: c["pools"]["web"].update(slot=3), "pools/web"),
        (lambda c: c["defaults"].update(slotz=3), "defaults"),
        (lambda c: c["runners"]["claude"].update(lanucher="process"), "runners/claude"),
        (lambda c: c["runners"]["boxed"]["container"].update(mount=["/x"]), "runners/boxed/container"),
        (lambda c: c["pools"]["web"]["prepare"].update(cmd="x"), "pools/web/prepare"),
        (lambda c: c["daemon"].update(git_concurency=2), "daemon"),
        (lambda c: c["hosts"]["far"].update(adress="ssh://x"), "hosts/far"),
    ],
)  # fmt: skip
def test_an_unknown_key_is_refused(validator: jsonschema.Draft7Validator, change: Any, where: str) -> None:
    config = yaml.safe_load(EVERYTHING)
    change(config)
    errors = list(validator.iter_errors(config))
    assert errors and "Additional properties are not allowed" in errors[0].message
    assert "/".join(map(str, errors[0].absolute_path)) == where


@pytest.mark.parametrize(
    ("path", "value"),
    [(("pools", "web", "slots"), "three"), (("defaults", "salvage"), "yes"), (("daemon", "min_free_disk"), "lots"),
     (("pools", "web", "cleanup"), "sometimes"), (("runners", "claude", "command"), 42),
     (("pools", "web", "slots"), 0), (("hosts", "far", "address"), "build-2")],
)  # fmt: skip
def test_a_wrong_type_or_value_is_refused(
    validator: jsonschema.Draft7Validator, path: tuple[str, ...], value: Any
) -> None:
    config = yaml.safe_load(EVERYTHING)
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert not validator.is_valid(config)


def test_necrod_prints_it() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "necrod", "--print-schema"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and json.loads(r.stdout) == pools_yaml_schema()
