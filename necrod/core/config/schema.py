"""Reading YAML nodes with their positions, key by key, and the value checks shared by every section.

A check takes a value and returns what is wrong with it (``"must be ..."``) or None; a
``Section`` takes its keys one by one and refuses, with a near-miss hint, any it was not asked
for. Every error names the file, line and column.

Errors are collected, not raised at the first: a key whose value is wrong is reported and left
out (``Section.value`` returns ``MISSING``), a key nobody asked for is reported, and a section
reader that raises (a pool, a runner) is reported by ``Reader.attempt`` while the others are
still read. ``parse_config`` raises them together at the end (``ConfigError.combined``).

``${NAME}`` is refused in every value but a shell command: necrod expands no variables, and a
value taken literally (a password, a path) would fail far from where it was written.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import Any, TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from necrod.core.config.model import ConfigError

# --- reading YAML nodes with their positions -------------------------------------------------

_constructor = yaml.constructor.SafeConstructor()

T = TypeVar("T")

#: ``${NAME}``, ``${NAME:-default}``...: what a reader expects expanded from the environment.
_VARIABLE = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?:[:?+=-][^}]*)?\}")


class Reader:
    """Walks the YAML node tree, converting values and raising errors that name the line."""

    def __init__(self, file: str | None) -> None:
        self.file = file
        self.notes: list[str] = []
        #: Every problem found so far, in the order found.
        self.errors: list[ConfigError] = []

    def error(self, node: Node | None, message: str) -> ConfigError:
        if node is None:
            return ConfigError(message, file=self.file)
        mark = node.start_mark
        return ConfigError(message, file=self.file, line=mark.line + 1, column=mark.column + 1)

    def report(self, node: Node | None, message: str) -> None:
        """Record a problem and go on reading."""
        self.errors.append(self.error(node, message))

    def attempt(self, read: Callable[[], T]) -> T | None:
        """``read()``, or None when it raised a ``ConfigError`` (recorded) or ``Reported``: one
        broken pool or runner does not keep the others from being checked."""
        try:
            return read()
        except ConfigError as exc:
            self.errors.append(exc)
            return None
        except Reported:
            return None

    def raise_errors(self) -> None:
        if self.errors:
            raise ConfigError.combined(self.errors)

    def mapping(self, node: Node, path: str) -> dict[str, tuple[Node, Node]]:
        if not isinstance(node, MappingNode):
            raise self.error(node, f"{path} must be a mapping")
        items: dict[str, tuple[Node, Node]] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                self.report(key_node, f"{path}: keys must be plain names (no merge keys)")
                continue
            key = str(self._construct(key_node, path))
            if key in items:
                first = items[key][0].start_mark.line + 1
                self.report(key_node, f"{path}: duplicate key {key!r} (first on line {first})")
                continue
            items[key] = (key_node, value_node)
        return items

    def scalar(self, node: Node, path: str, *, shell: bool = False) -> Any:
        """One value. ``shell``: it is a command for ``sh -c``, where ``${NAME}`` is the shell's
        to expand when the command runs."""
        if not isinstance(node, ScalarNode):
            raise self.error(
                node,
                f"{path} must be a single value, not a {'list' if isinstance(node, SequenceNode) else 'mapping'}",
            )
        value = self._construct(node, path)
        if not shell and isinstance(value, str) and (m := _VARIABLE.search(value)):
            raise self.error(
                node,
                f"{path}: {m.group(0)} is not expanded: pools.yaml takes no variables, and necrod would use "
                "it as written. Write the value itself (to fill it from the environment, render the file "
                "before necrod reads it, e.g. envsubst < pools.yaml.in > pools.yaml)",
            )
        return value

    def _construct(self, node: Node, path: str) -> Any:
        # A tag the safe constructor refuses (!!python/...) or a value its tag cannot read
        # (!!int abc, a 13th month) raises ConstructorError or ValueError, not a ConfigError.
        try:
            return _constructor.construct_object(node)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
            problem = getattr(exc, "problem", None) or str(exc)
            raise self.error(node, f"{path}: cannot read this value: {problem}") from None

    def strings(self, node: Node, path: str) -> list[str]:
        if not isinstance(node, SequenceNode):
            raise self.error(node, f"{path} must be a list")
        out = []
        for item in node.value:
            value = self.scalar(item, path)
            if not isinstance(value, str):
                raise self.error(item, f"{path}: every item must be a string")
            out.append(value)
        return out


class Reported(Exception):
    """A reader cannot build its object, for a reason already reported (a refused value)."""


class Section:
    """One mapping being validated: take keys one by one, then ``finish`` refuses the rest."""

    def __init__(self, reader: Reader, node: Node, path: str) -> None:
        self.r = reader
        self.node = node
        self.path = path
        self.items = reader.mapping(node, path)
        self.taken: set[str] = set()
        #: Keys present whose value was refused (reported): not "missing" to a later check.
        self.bad: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.items

    def node_of(self, key: str) -> Node | None:
        item = self.items.get(key)
        return item[1] if item else None

    def raw(self, key: str) -> tuple[Node, Node] | None:
        self.taken.add(key)
        return self.items.get(key)

    def value(self, key: str, check: Callable[[Any], str | None] | None = None) -> Any:
        """The key's value, checked; ``MISSING`` when absent, or when wrong (then reported)."""
        item = self.raw(key)
        if item is None:
            return MISSING
        try:
            value = self.r.scalar(item[1], f"{self.path}.{key}")
        except ConfigError as exc:
            self.r.errors.append(exc)
            self.bad.add(key)
            return MISSING
        if check is not None:
            problem = check(value)
            if problem:
                self.r.report(item[1], f"{self.path}.{key} {problem}")
                self.bad.add(key)
                return MISSING
        return value

    def values(self, checks: dict[str, Callable[[Any], str | None]]) -> dict[str, Any]:
        """Each of ``checks``' keys that is present, checked."""
        found = {}
        for key, check in checks.items():
            v = self.value(key, check)
            if v is not MISSING:
                found[key] = v
        return found

    def finish(self, allowed: list[str]) -> None:
        for key, (key_node, _) in self.items.items():
            if key not in self.taken:
                near = difflib.get_close_matches(key, allowed, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                self.r.report(key_node, f"{self.path}: unknown key {key!r}{hint}")


MISSING: Any = object()


# --- value checks ------------------------------------------------------------------------------

Check = Callable[[Any], str | None]

#: What each check accepts, as JSON Schema: ``necrod --print-schema`` is built from the same
#: tables of checks the reader uses (``core.config.jsonschema``), so the two cannot disagree on
#: which keys exist. A check with no entry accepts any value as far as the schema says.
SCHEMAS: dict[Check, dict[str, Any]] = {}


def described(check: Check, schema: dict[str, Any]) -> Check:
    """``check``, with the JSON Schema of what it accepts."""
    SCHEMAS[check] = schema
    return check


def schema_of(check: Check) -> dict[str, Any]:
    return dict(SCHEMAS.get(check, {}))


def nullable(check: Check) -> Check:
    """``check``, or null (``~``) for "none"."""
    return described(
        lambda v: None if v is None else check(v), {"anyOf": [{"type": "null"}, schema_of(check)]}
    )


def int_in(lo: int, hi: int) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int):
            return "must be a whole number"
        if not lo <= v <= hi:
            return f"must be between {lo} and {hi} (got {v})"
        return None

    return described(check, {"type": "integer", "minimum": lo, "maximum": hi})


def num_in(lo: float, hi: float, *, above: bool = False) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int | float) or v != v:
            return "must be a number"
        if (v <= lo if above else v < lo) or v > hi:
            low = f"above {lo:g}" if above else f"at least {lo:g}"
            return f"must be {low} and at most {hi:g} (got {v})"
        return None

    return described(check, {"type": "number", "exclusiveMinimum" if above else "minimum": lo, "maximum": hi})


def is_size(v: Any) -> str | None:
    try:
        parse_size(v)
    except ValueError as exc:
        return f"must be a size: {exc}"
    return None


SIZE_SCHEMA = {"anyOf": [{"type": "integer", "minimum": 0},
                         {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*[kmgtKMGT]?[iI]?[bB]?\s*$"}]}  # fmt: skip
described(is_size, SIZE_SCHEMA)


def size_at_least(low: int, shown: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        problem = is_size(v)
        if problem is None and parse_size(v) < low:
            return f"must be at least {low} ({shown})"
        return problem

    SIZE_CHECKS.add(check)
    return described(check, SIZE_SCHEMA)


#: Checks whose value is a size: the value is converted to bytes once checked.
SIZE_CHECKS: set[Callable[[Any], str | None]] = {is_size}


def is_bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def is_str(v: Any) -> str | None:
    if not isinstance(v, str) or not v:
        return "must be a non-empty string"
    if any(ord(c) < 0x20 for c in v):
        return "must not contain control characters"
    return None


described(is_bool, {"type": "boolean"})
described(is_str, {"type": "string", "minLength": 1})


def one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)} (got {v!r})"

    return described(check, {"enum": list(choices)})


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)\s*", re.IGNORECASE)


def parse_size(value: Any) -> int:
    """Bytes from ``5GiB``, ``500MB``, ``2G`` (binary) or a plain number of bytes."""
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string such as 5GiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size may not be negative")
        return value
    if not isinstance(value, str):
        raise ValueError("a size must be a number of bytes or a string such as 5GiB")
    m = _SIZE.fullmatch(value)
    if not m:
        raise ValueError(f"{value!r} is not a size (examples: 5GiB, 500MB, 1048576)")
    number, unit, binary, _ = m.groups()
    power = " kmgt".index(unit.lower()) if unit else 0
    base = 1024 if (binary or (unit and not m.group(4))) else 1000
    return int(float(number) * base**power)


def mapping_of(r: Reader, sec: Section, key: str, value_check: Callable[[Any], str | None]) -> dict[str, Any]:
    item = sec.raw(key)
    if item is None:
        return {}
    out = {}
    for name, (_, node) in r.mapping(item[1], f"{sec.path}.{key}").items():
        value = r.scalar(node, f"{sec.path}.{key}.{name}")
        problem = value_check(value)
        if problem:
            raise r.error(node, f"{sec.path}.{key}.{name} {problem}")
        out[name] = value
    return out


def read_command(r: Reader, node: Node, path: str) -> str | tuple[str, ...]:
    """A command: a list of arguments (run as is) or one string (run by ``sh -c``)."""
    if isinstance(node, SequenceNode):
        argv = r.strings(node, path)
        if not argv:
            raise r.error(node, f"{path} may not be empty")
        return tuple(argv)
    text = r.scalar(node, path, shell=True)
    if not isinstance(text, str) or not text.strip():
        raise r.error(node, f"{path} must be a list of arguments or a shell command")
    return text


def env_value(v: Any) -> str | None:
    return None if isinstance(v, str | int | float) and not isinstance(v, bool) else "must be a string"


described(env_value, {"type": ["string", "number"]})
STRINGS_SCHEMA: dict[str, Any] = {"type": "array", "items": {"type": "string"}}
COMMAND_SCHEMA: dict[str, Any] = {"anyOf": [{"type": "string", "minLength": 1},
                                            {"type": "array", "items": {"type": "string"}, "minItems": 1}]}  # fmt: skip


def mapping_schema(values: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": values}


def optional_num(lo: float, hi: float) -> Callable[[Any], str | None]:
    return nullable(num_in(lo, hi, above=True))
