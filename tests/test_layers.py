"""The package's import direction: libraries below, applications above, commands at the top.

Every module of ``fr_distill`` is parsed (nothing is imported) and given the layer of the
longest entry of :data:`LAYERS` that names it or a package above it. A module may import
from its own layer or any layer below; the top-level units (``fr_distill.<name>``) import
each other without a circle; and only the commands import fr_distill inside a function
(lazily, so that ``--help`` answers without loading models), since an import hidden in a
function is how a circle or an upward import goes unnoticed.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fr_distill"

#: unit (the module path below ``fr_distill``; "" is the package itself) -> layer
LAYERS = {
    # 1 base: no project imports but each other
    "": 1, "errors": 1, "paths": 1, "dist": 1, "precision": 1, "locks": 1, "unpickling": 1,
    "resources": 1, "backbones": 1, "console": 1,
    # 2 the config schema
    "config": 2,
    # 3 libraries
    "checkpoint": 3, "models": 3, "data": 3, "losses": 3,
    # 4 libraries built on them
    "eval": 4, "teacher_cache": 4,
    # 5 training
    "engine": 5,
    # 6 applications
    "synthetic": 6, "study": 6, "deploy": 6,
    # 7 commands
    "cli": 7, "commands": 7,
}
COMMANDS = 7


def module_name(path: Path) -> str:
    """``data.loader`` for ``fr_distill/data/loader.py``, ``data`` for its ``__init__.py``."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(name: str) -> int | None:
    """The layer of module ``name`` (its longest entry in :data:`LAYERS`)."""
    parts = name.split(".") if name else []
    for end in range(len(parts), -1, -1):
        unit = ".".join(parts[:end])
        if unit in LAYERS and (end or not parts):
            return LAYERS[unit]
    return None


def imports(path: Path, name: str) -> list[tuple[str, bool, int]]:
    """``(imported module below fr_distill, inside a function, line)`` of each fr_distill
    import of the module at ``path``; ``from fr_distill.a import b`` counts as ``a.b`` when
    ``b`` is a module, else as ``a``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                       ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name.removeprefix("fr_distill").lstrip("."), in_function,
                              child.lineno) for alias in child.names
                             if alias.name.split(".")[0] == "fr_distill")
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".") if package else []
                    base = base[:len(base) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                elif (child.module or "").split(".")[0] == "fr_distill":
                    target = child.module.removeprefix("fr_distill").lstrip(".")
                else:
                    continue
                for alias in child.names:
                    sub = f"{target}.{alias.name}" if target else alias.name
                    is_module = (PACKAGE / sub.replace(".", "/")).with_suffix(".py").is_file() \
                        or (PACKAGE / sub.replace(".", "/") / "__init__.py").is_file()
                    found.append((sub if is_module else target, in_function, child.lineno))
            visit(child, nested)

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def graph() -> dict[str, tuple[Path, list[tuple[str, bool, int]]]]:
    """Every module of the package with its fr_distill imports."""
    return {module_name(path): (path, imports(path, module_name(path)))
            for path in sorted(PACKAGE.rglob("*.py"))}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one unit (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def connect(unit: str) -> None:
        index[unit] = low[unit] = len(index)
        stack.append(unit)
        for other in edges.get(unit, ()):
            if other not in index:
                connect(other)
                low[unit] = min(low[unit], low[other])
            elif other in stack:
                low[unit] = min(low[unit], index[other])
        if low[unit] == index[unit]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == unit:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for unit in sorted(edges):
        if unit not in index:
            connect(unit)
    return found


def test_every_module_has_a_layer():
    assert [name or "fr_distill" for name in graph() if layer(name) is None] == []


def test_imports_point_down_or_sideways():
    upward = [f"{path.relative_to(PACKAGE.parent)}:{line}: {name or 'fr_distill'} (layer "
              f"{layer(name)}) imports {target} (layer {layer(target)})"
              for name, (path, found) in graph().items() for target, _, line in found
              if layer(name) is not None and layer(target) is not None
              and layer(target) > layer(name)]
    assert upward == []


def test_no_circle_between_top_level_units():
    edges: dict[str, set[str]] = {}
    for name, (_, found) in graph().items():
        unit = name.split(".")[0]
        edges.setdefault(unit, set()).update(
            target.split(".")[0] for target, _, _ in found if target.split(".")[0] != unit)
    assert circles(edges) == []


def test_only_the_commands_import_fr_distill_inside_functions():
    hidden = [f"{path.relative_to(PACKAGE.parent)}:{line}: imports {target or 'fr_distill'} "
              f"inside a function" for name, (path, found) in graph().items()
              for target, in_function, line in found
              if in_function and layer(name) != COMMANDS]
    assert hidden == []
