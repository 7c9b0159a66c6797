"""The method table: every RPC method, the parameters it takes, and their checks.

Checking happens here, once, before a handler runs: a handler receives a dict whose keys are
known, whose required keys are present and whose values have the declared type and range.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from necrod.proto.errors import InvalidParams, MethodNotFound

#: Upper bound on any free-form object a client may store with a lease or task, serialized.
MAX_OBJECT_BYTES = 16 * 1024

#: Upper bound on a free-form string (holder, client name, ...).
MAX_STRING = 1024

WEEK_S = 7 * 24 * 3600.0

#: The bound of a number parameter that declares none (2**53 - 1, the largest integer every JSON
#: client represents exactly): past it a value overflows SQLite's INTEGER, or seek(), and a call
#: would fail with ``internal`` instead of being refused here.
MAX_SAFE_INTEGER = (1 << 53) - 1


@dataclass(frozen=True, slots=True)
class Param:
    """One parameter: its JSON type, whether it is required, and its range."""

    type: str  # "string", "integer", "number", "boolean", "object", "strings", "list"
    required: bool = False
    min: float | None = None
    max: float | None = None
    max_len: int = MAX_STRING
    choices: tuple[str, ...] = ()


def _s(*, required: bool = False, max_len: int = MAX_STRING, choices: tuple[str, ...] = ()) -> Param:
    return Param("string", required, max_len=max_len, choices=choices)


def _n(*, min: float | None = None, max: float | None = None, integer: bool = False) -> Param:
    return Param("integer" if integer else "number", False, min, max)


SLOT_STATES = ("creating", "available", "allocated", "cleaning", "error", "removing")
EVENT_TOPICS = ("slots", "leases", "pools", "config", "daemon", "tasks", "hosts")

METHODS: dict[str, dict[str, Param]] = {
    "hello": {"protocol": _n(min=0, max=1 << 30, integer=True), "client": _s()},
    "daemon.status": {},
    "daemon.reload": {},
    "pools.list": {},
    "pools.get": {"pool": _s(required=True)},
    "pools.prepare_log": {
        "pool": _s(required=True),
        "offset": _n(min=0, max=MAX_SAFE_INTEGER, integer=True),
        "limit": _n(min=1, max=4 << 20, integer=True),
    },
    "slots.list": {"pool": _s(), "state": _s(choices=SLOT_STATES)},
    "slots.allocate": {
        "pool": _s(required=True),
        "holder": _s(),
        "ttl_s": _n(min=1, max=WEEK_S),
        "ref": _s(max_len=4096),
        "branch": _s(max_len=4096),
        "wait_s": _n(min=0, max=3600),
        "metadata": Param("object"),
        "affinity": _s(max_len=256),
        "ports": _n(min=0, max=64, integer=True),
        "sparse": Param("strings"),
        "from_salvage": _s(max_len=64),
    },
    "slots.heartbeat": {"lease_id": _s(required=True), "ttl_s": _n(min=1, max=WEEK_S)},
    "slots.release": {"lease_id": _s(required=True), "salvage": Param("boolean")},
    "slots.add": {"pool": _s(required=True), "wait_s": _n(min=0, max=3600)},
    "slots.remove": {"slot_id": _s(required=True), "force": Param("boolean")},
    "events.subscribe": {
        "topics": Param("strings"),
        "snapshot": Param("boolean"),
        "since": _n(min=0, max=MAX_SAFE_INTEGER, integer=True),
    },
    "salvage.list": {"pool": _s()},
    "salvage.show": {"lease_id": _s(required=True)},
    "salvage.diff": {"lease_id": _s(required=True), "binary": Param("boolean")},
    "salvage.branch": {
        "lease_id": _s(required=True),
        "branch": _s(required=True, max_len=255),
        "message": _s(max_len=4096),
        "push": Param("boolean"),
    },
    "salvage.prune": {"pool": _s(), "dry_run": Param("boolean")},
    "anomalies.list": {"pool": _s(), "heal": Param("boolean"), "deep": Param("boolean")},
    "slots.recover": {"slot_id": _s(required=True)},
    "slots.isolate": {"slot_id": _s(required=True), "reason": _s()},
    "metrics.get": {},
    "tasks.submit": {
        "pool": _s(),
        "runner": _s(max_len=64),
        "command": Param("any"),
        "payload": Param("any"),
        "priority": _n(min=-1_000_000, max=1_000_000, integer=True),
        "labels": Param("strings"),
        "skills": Param("strings"),
        "depends_on": Param("list"),
        "max_retries": _n(min=0, max=1000, integer=True),
        "timeout_s": _n(min=0.001, max=30 * 24 * 3600.0),
        "env": Param("object"),
        "ref": _s(max_len=4096),
        "branch": _s(max_len=4096),
        "sparse": Param("strings"),
        "project": _s(max_len=256),
        "key": _s(max_len=128),
        "body": _s(max_len=65536),
        "failure_strategy": _s(choices=("continue", "stop-all", "retry")),
        "resume": _s(choices=("base", "salvage")),
        "tasks": Param("list"),
    },
    "tasks.get": {"task_id": _s(required=True, max_len=64)},
    "hosts.list": {},
    "tasks.list": {
        "state": _s(choices=("queued", "blocked", "running", "succeeded", "failed", "cancelled")),
        "pool": _s(),
        "label": _s(),
        "batch": _s(max_len=64),
        "graph": Param("boolean"),
    },
    "tasks.cancel": {
        "task_id": _s(max_len=64),
        "batch": _s(max_len=64),
        "reason": _s(),
        "force": Param("boolean"),
    },
    "tasks.update": {
        "task_id": _s(required=True, max_len=64),
        "priority": _n(min=-1_000_000, max=1_000_000, integer=True),
        "labels": Param("strings"),
    },
    "runners.list": {},
    "runners.pause": {"runner": _s(required=True, max_len=64), "reason": _s()},
    "runners.resume": {"runner": _s(required=True, max_len=64)},
    "pools.refs": {"pool": _s(required=True), "pattern": _s(max_len=256)},
    "tasks.retry": {"task_id": _s(max_len=64), "batch": _s(max_len=64)},
    "tasks.logs": {
        "task_id": _s(required=True, max_len=64),
        "attempt": _n(min=1, max=1_000_000, integer=True),
        "offset": _n(min=0, max=MAX_SAFE_INTEGER, integer=True),
        "limit": _n(min=1, max=4 << 20, integer=True),
    },
}


#: Longest request line of a method not named below: room for every parameter at its largest
#: (a 16 KiB object, a few 4 KiB refs), with space to spare. Decoding a request, and checking it,
#: costs time in proportion to its size, so a bigger line than a method can use is refused
#: before anything else looks at it (issue 16, defect 7).
DEFAULT_MAX_REQUEST_BYTES = 64 << 10
#: ``tasks.submit`` takes a 64 Ki-character ``body`` and batches: the whole line (1 MiB).
MAX_REQUEST_BYTES = {"tasks.submit": 1 << 20}


def max_request_bytes(method: str) -> int:
    return MAX_REQUEST_BYTES.get(method, DEFAULT_MAX_REQUEST_BYTES)


#: Operator calls: they change the daemon or another peer's slots, so only an admin may make them.
ADMIN_METHODS = frozenset(
    {
        "daemon.reload",
        "slots.add",
        "slots.remove",
        "slots.recover",
        "slots.isolate",
        "anomalies.list",
        "salvage.prune",
        "runners.pause",
        "runners.resume",
    }
)


def _type_ok(spec: Param, value: Any) -> bool:
    match spec.type:
        case "string":
            return isinstance(value, str)
        case "integer":
            return isinstance(value, int) and not isinstance(value, bool)
        case "number":
            return isinstance(value, int | float) and not isinstance(value, bool)
        case "boolean":
            return isinstance(value, bool)
        case "object":
            return isinstance(value, dict)
        case "strings":
            return isinstance(value, list) and all(isinstance(v, str) for v in value)
        case "list":
            return isinstance(value, list)
        case "any":
            return True
    raise AssertionError(spec.type)


_TYPE_NAMES = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "object": "an object",
    "strings": "a list of strings",
    "list": "a list",
    "any": "a JSON value",
}


def check_param(method: str, name: str, spec: Param, value: Any) -> None:
    """Raise ``InvalidParams`` unless ``value`` fits ``spec``."""
    if value is None:
        if spec.required:
            raise InvalidParams(f"{method}: {name} is required", param=name)
        return
    where = f"{method}: {name}"
    if not _type_ok(spec, value):
        raise InvalidParams(f"{where} must be {_TYPE_NAMES[spec.type]}", param=name)
    if spec.type == "string":
        if len(value) > spec.max_len:
            raise InvalidParams(f"{where} is longer than {spec.max_len} characters", param=name)
        if spec.choices and value not in spec.choices:
            raise InvalidParams(f"{where} must be one of {', '.join(spec.choices)}", param=name)
    if spec.type in ("integer", "number"):
        low = spec.min if spec.min is not None else -MAX_SAFE_INTEGER
        high = spec.max if spec.max is not None else MAX_SAFE_INTEGER
        if value < low:
            raise InvalidParams(f"{where} must be at least {low:g}", param=name)
        if value > high:
            raise InvalidParams(f"{where} must be at most {high:g}", param=name)
    if spec.type in ("object", "strings", "list", "any"):
        size = _serialized_size(value)
        if size > MAX_OBJECT_BYTES:
            raise InvalidParams(f"{where} is {size} bytes serialized, over {MAX_OBJECT_BYTES}", param=name)


def _serialized_size(value: Any) -> int:
    """``len(json.dumps(value))``, the size the limit is stated in, without building a large
    one: orjson's compact UTF-8 form is never longer, and never less than a third of it."""
    try:
        compact = len(orjson.dumps(value))
    except orjson.JSONEncodeError:  # an integer past 64 bits: not from a decoded request
        return len(json.dumps(value))
    if compact > MAX_OBJECT_BYTES or compact * 3 <= MAX_OBJECT_BYTES:
        return compact
    return len(json.dumps(value))


#: Names people reach for that no close-match finds, and what they meant.
_MEANT = {"needs": "depends_on", "after": "depends_on", "requires": "depends_on", "deps": "depends_on",
          "dependencies": "depends_on", "depends": "depends_on", "label": "labels", "skill": "skills",
          "profile": "runner", "timeout": "timeout_s", "retries": "max_retries", "cmd": "command"}  # fmt: skip


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for an unknown ``name``, or nothing when nothing is near."""
    known = list(known)
    meant = _MEANT.get(name)
    near = [meant] if meant in known else difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


#: Keys a task of a ``tasks.submit`` batch may have: a task's parameters, with ``issue``.
TASK_KEYS = frozenset(set(METHODS["tasks.submit"]) - {"tasks"} | {"issue"})


def check_params(
    method: str, params: Mapping[str, Any], table: Mapping[str, Mapping[str, Param]] = METHODS
) -> dict[str, Any]:
    """Validate ``params`` against the table; returns a dict with every declared key (None if absent)."""
    specs = table.get(method)
    if specs is None:
        raise MethodNotFound(f"no method {method!r}", method=method)
    if not params.keys() <= specs.keys():
        unknown = sorted(set(params) - set(specs))
        raise InvalidParams(f"{method}: unknown parameter(s): {', '.join(unknown)}"
                            + did_you_mean(unknown[0], specs), param=unknown[0])  # fmt: skip
    checked: dict[str, Any] = {}
    for name, spec in specs.items():
        value = params.get(name)
        check_param(method, name, spec, value)
        checked[name] = value
    return checked
