"""Runner command templates: ``{task_id}``, ``{slot_path}``, ``{payload.prompt}``, ...

A list template is an argv: each placeholder becomes its value, and no shell ever sees it. A
string template is run with ``sh -c``: each value is shell-quoted, so nothing in a payload can
become shell syntax. ``{{`` and ``}}`` stand for literal braces.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from typing import Any

FIELDS = (
    "task_id",
    "attempt",
    "pool",
    "slot_id",
    "slot_path",
    "lease_id",
    "commit",
    "ref",
    "branch",
    "payload",
)
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_]+(?:\.[A-Za-z0-9_-]+)*)\}")


class TemplateError(ValueError):
    """A placeholder names nothing the runner context has."""


def _value(name: str, context: Mapping[str, Any]) -> str:
    head, _, rest = name.partition(".")
    if head not in FIELDS:
        raise TemplateError(f"unknown placeholder {{{name}}} (known: {', '.join(FIELDS)}, payload.KEY)")
    value = context.get(head)
    for part in rest.split(".") if rest else ():
        if not isinstance(value, Mapping) or part not in value:
            raise TemplateError(f"{{{name}}}: the payload has no {part!r}")
        value = value[part]
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def _fill(text: str, context: Mapping[str, Any], quote: bool) -> str:
    def sub(m: re.Match[str]) -> str:
        if m.group(0) in ("{{", "}}"):
            return m.group(0)[0]
        value = _value(m.group(1), context)
        return shlex.quote(value) if quote else value

    return _PLACEHOLDER.sub(sub, text)


def render(template: list[str] | tuple[str, ...] | str, context: Mapping[str, Any]) -> list[str]:
    """The argv to run."""
    if isinstance(template, str):
        return ["/bin/sh", "-c", _fill(template, context, quote=True)]
    return [_fill(arg, context, quote=False) for arg in template]


def check(template: list[str] | tuple[str, ...] | str, payload: Any) -> None:
    """Raise TemplateError now, at submit, rather than when the task starts."""
    render(template, dict.fromkeys(FIELDS, "x") | {"payload": payload})
