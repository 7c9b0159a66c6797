"""The shape of the code, checked: layers point one way, no module imports itself back, rooms
stay small, and no class inherits another's state.

These are the rules docs/design.md states; a change that breaks one should change the map.
"""

from __future__ import annotations

import ast
from pathlib import Path

import necrod

ROOT = Path(necrod.__file__).parent
#: What each layer may import from necrod (besides itself and the top-level modules).
MAY_IMPORT = {
    # The wire contract (error kinds, framing, method schemas) is the bottom: core raises its errors.
    "proto": {"proto"},
    "core": {"core", "proto"},
    "io": {"io", "core", "proto"},
    "daemon": {"daemon", "io", "core", "proto"},
    "ctl": {"ctl", "io", "core", "proto"},
    # `necrod mcp`: a client of the daemon like necroctl, sharing its ways to reach one.
    "mcpserver": {"mcpserver", "ctl", "io", "core", "proto"},
}
MAX_LINES = 600


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), str(path))
    return found


def imports(tree: ast.Module, known: set[str]) -> set[str]:
    """The necrod modules ``tree`` imports, type-only imports included (a reader follows those too)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if sub in known:
                    out.add(sub)
                elif node.module in known:
                    out.add(node.module)
    return out


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in MAY_IMPORT) else None


def test_layers_point_one_way() -> None:
    mods = modules()
    wrong = []
    for name, tree in mods.items():
        own = layer(name)
        if own is None:
            continue
        for target in imports(tree, set(mods)):
            there = layer(target)
            if there is not None and there not in MAY_IMPORT[own]:
                wrong.append(f"{name} imports {target}")
    assert wrong == []


def test_no_import_circles() -> None:
    mods = modules()
    graph = {name: imports(tree, set(mods)) - {name} for name, tree in mods.items()}
    # A package's __init__ that gathers its modules' names is not a circle with them.
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    circles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert circles == []


def test_rooms_stay_small() -> None:
    big = {
        str(path.relative_to(ROOT.parent)): n
        for path in ROOT.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert big == {}, f"split these, or raise MAX_LINES in a reviewed change: {big}"


def test_no_class_inherits_state() -> None:
    """A necrod class may implement another's interface, not inherit its state: a base defined
    here has no ``__init__`` and none of its methods assigns to ``self``."""
    mods = modules()
    classes: dict[str, ast.ClassDef] = {}
    for tree in mods.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                classes[node.name] = node
    wrong = []
    for tree in mods.values():
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            for base in node.bases:
                name = (
                    base.value.id
                    if isinstance(base, ast.Subscript) and isinstance(base.value, ast.Name)
                    else (base.id if isinstance(base, ast.Name) else None)
                )
                parent = classes.get(name or "")
                if parent is None or parent is node or _is_exception(parent, classes):
                    continue
                if _holds_state(parent):
                    wrong.append(f"{node.name}({parent.name})")
    assert wrong == []


def _is_exception(cls: ast.ClassDef, classes: dict[str, ast.ClassDef]) -> bool:
    for base in cls.bases:
        if isinstance(base, ast.Name):
            if base.id.endswith(("Error", "Exception")) or base.id == "Exception":
                return True
            parent = classes.get(base.id)
            if parent is not None and parent is not cls and _is_exception(parent, classes):
                return True
    return False


def _holds_state(cls: ast.ClassDef) -> bool:
    for item in cls.body:
        if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
            if item.name == "__init__":
                return True
            for node in ast.walk(item):
                targets = (
                    node.targets
                    if isinstance(node, ast.Assign)
                    else [node.target]
                    if isinstance(node, ast.AnnAssign | ast.AugAssign)
                    else []
                )
                if any(
                    isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"
                    for t in targets
                ):
                    return True
    return False
