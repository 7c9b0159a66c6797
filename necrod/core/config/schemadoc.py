"""The JSON Schema of pools.yaml (``necrod --print-schema``), for editors and CI linters.

It is assembled from the tables the reader itself uses — each section's checks and the schema
of its other keys, which are also the lists its ``Section.finish`` accepts — so a key the
reader takes is a key the schema knows, and no other. Where a value's rule is more than JSON
Schema can say (a ref name, an ssh:// URL in full, min_idle below max_slots), the schema says
the type and ``necrod --check-config`` says the rest.
"""

from __future__ import annotations

from typing import Any

from necrod.core.config.parse import TOP_KEYS
from necrod.core.config.pools import daemon_schema, pool_schema
from necrod.core.config.runners import dispatcher_schema, host_schema, runner_schema
from necrod.core.names import POOL_NAME_MAX

SCHEMA_ID = "https://necrod.dev/schema/pools.json"
_NAME = {"type": "string", "pattern": "^[A-Za-z0-9_][A-Za-z0-9._-]*$", "maxLength": POOL_NAME_MAX}


def _named(value: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "propertyNames": _NAME, "additionalProperties": value}


def pools_yaml_schema() -> dict[str, Any]:
    sections = {
        "daemon": daemon_schema(),
        "defaults": pool_schema(pool=False),
        "pools": _named(pool_schema(pool=True)),
        "runners": _named(runner_schema()),
        "dispatcher": dispatcher_schema(),
        "hosts": _named(host_schema()),
    }
    assert set(sections) == set(TOP_KEYS)
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$id": SCHEMA_ID,
        "title": "necrod pools.yaml",
        "description": "Pools of clean git worktrees, runner profiles, the dispatcher and other hosts "
        "(docs/configuration.md). necrod --check-config checks what a schema cannot.",
        "type": "object",
        "additionalProperties": False,
        "properties": sections,
        "anyOf": [{"required": ["pools"]}, {"required": ["hosts"]}],
    }
