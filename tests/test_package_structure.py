"""The house rules, checked on the source: imports point down a declared layering with no circle, and no code
reaches into another object's private members (ast, no import of the package needed)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hf_alphaedit"

# Lowest first. A module may import modules of its own layer or of a lower one; imports inside a layer must not
# form a circle. An entry names a module or a subpackage (which covers everything below it).
LAYERS: list[list[str]] = [
    ["_version", "errors", "fields", "updates", "requests", "cards", "memory"],
    ["architectures", "hparams", "registry", "hub", "forward", "distributed"],
    ["fingerprint", "corpus", "artifacts", "state", "telemetry"],
    ["statistics"],
    ["projection", "arguments"],
    ["methods", "metrics"],
    ["evaluation", "engine"],
    ["provider"],
    ["publishing", "checkpointing"],
    ["modeling"],
    ["demo"],
    ["cli", "__main__", "__init__"],
]
# argparse offers no public way to list or change a parser's actions (transformers' HfArgumentParser reads
# `_actions` too); nothing else private is read across objects.
ALLOWED_PRIVATE_ATTRIBUTES = {"_actions"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _package_of(module: str, path: Path) -> list[str]:
    """The package a module's relative imports are resolved against."""
    parts = module.split(".") if module != "__init__" else []
    return parts if path.name == "__init__.py" else parts[:-1]


def _package_files() -> list[Path]:
    """The package's own source files (not the Space and card folders that symlinks put into the wheel)."""
    return [path for path in PACKAGE.rglob("*.py")
            if not any(part.is_symlink() for part in [path, *path.relative_to(PACKAGE).parents]
                       if part != Path(".") and (PACKAGE / part).is_symlink())]


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in _package_files()}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Internal modules `module` imports anywhere (functions included), except under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    base = _package_of(module, path)

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("hf_alphaedit."):
                    found.add(resolve(alias.name.removeprefix("hf_alphaedit.")) or "__init__")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - node.level + 1]
                target = ".".join([*anchor, *(node.module.split(".") if node.module else [])])
            elif node.module and (node.module == "hf_alphaedit" or node.module.startswith("hf_alphaedit.")):
                target = node.module.removeprefix("hf_alphaedit").lstrip(".")
            else:
                target = None
            if target is not None:
                for alias in node.names:  # `from . import x` imports the submodule x when there is one
                    candidate = f"{target}.{alias.name}" if target else alias.name
                    found.add(candidate if candidate in known else (resolve(target) if target else "__init__"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(module)
    return {name for name in found if name}


def _layer(module: str) -> int:
    for index, layer in enumerate(LAYERS):
        for entry in layer:
            if module == entry or module.startswith(entry + "."):
                return index
    raise AssertionError(f"hf_alphaedit.{module} is in no layer of tests/test_package_structure.LAYERS; place it")


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {module: _imports(module, path, known) for module, path in modules.items()}


def test_imports_point_down_the_layers():
    upward = [f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
              for module, targets in _graph().items() for target in sorted(targets)
              if _layer(target) > _layer(module) and not target.startswith(module + ".")]
    assert not upward, "imports from a lower module to a higher one:\n" + "\n".join(upward)


def test_no_import_circle():
    graph = _graph()
    # A package's __init__ importing its own submodules is how a package is built, not a circle.
    edges = {module: {t for t in targets if not (t.startswith(module + ".") and _modules()[module].name ==
                                                   "__init__.py")} for module, targets in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for module in sorted(edges):
        if module not in state and (cycle := visit(module)):
            pytest.fail("import circle: " + " -> ".join(cycle))


def _private_reaches(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
                continue  # the class's own (inherited) member
            if node.attr in ALLOWED_PRIVATE_ATTRIBUTES:
                continue
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module and "hf_alphaedit" in (node.module or "") or (
                isinstance(node, ast.ImportFrom) and node.level):
            found.extend(f"{path.relative_to(ROOT)}:{node.lineno}: imports {alias.name}" for alias in node.names
                         if alias.name.startswith("_") and not alias.name.startswith("__"))
    return found


def test_no_code_reaches_into_private_members():
    files = [*_package_files(), *(ROOT / "scripts").rglob("*.py"), *(ROOT / "spaces").rglob("*.py")]
    found = [line for path in files for line in _private_reaches(path)]
    assert not found, "private members used outside their class or module:\n" + "\n".join(found)


def test_modeling_stays_small():
    lines = (PACKAGE / "modeling.py").read_text(encoding="utf-8").count("\n")
    assert lines <= 300, f"modeling.py has {lines} lines; move work into the engine, provider or publishing"
