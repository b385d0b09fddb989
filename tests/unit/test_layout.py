"""The package's shape is its architecture (issue 19): no import circle inside ``dermray/``, the
core (everything but ``stages/`` and the CLI) imports neither Ray nor a stage module, and a
function-local import is only ever of an optional heavy library.

Imports are read from the source (ast), so the test sees every import a module can run, not only
those one code path happens to take. ``if TYPE_CHECKING:`` blocks are skipped: they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "dermray"
EDGES = ("dermray.stages", "dermray.cli", "dermray.__main__")  # Ray's side of the house
# the optional heavy libraries a module may import inside a function, so that importing dermray
# stays fast and a laptop without them can still run the stages that do not need them
LAZY_OK = ("tensorflow", "keras", "xgboost", "mlflow", "ray", "h5py", "umap", "boto3",
           "matplotlib", "moto", "PIL", "optuna", "tensorboardX", "pyarrow.fs")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path) -> tuple[set[str], list[tuple[int, str]]]:
    """(every dermray/third-party module imported at module level, [(line, module)] imported
    inside a function or class body)."""
    tree = ast.parse(path.read_text())
    top: set[str] = set()
    local: list[tuple[int, str]] = []

    def names(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        assert isinstance(node, ast.ImportFrom)
        if node.level:  # relative imports are not used in dermray
            raise AssertionError(f"{path}:{node.lineno}: use an absolute import")
        base = node.module or ""
        # "from dermray.io import storage" imports the module dermray.io.storage
        return [f"{base}.{a.name}" if base.startswith("dermray") else base for a in node.names]

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for name in names(child):
                    (local.append((child.lineno, name)) if in_function else top.add(name))
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                      ast.ClassDef))
            visit(child, inner)

    visit(tree, False)
    return top, local


def graph() -> dict[str, set[str]]:
    """dermray module -> the dermray modules it imports at module level (or lazily)."""
    mods = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        top, local = imports(path)
        targets = set()
        for imp in top | {m for _, m in local}:
            while imp and imp not in mods:  # "dermray.io.storage.join" -> "dermray.io.storage"
                imp = imp.rpartition(".")[0]
            if imp.startswith("dermray") and imp != name and imp != "dermray":
                targets.add(imp)
        edges[name] = targets
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := dfs(start)):
            return found
    return None


def is_parent_package(a: str, b: str) -> bool:
    """A package's __init__ may import its own members (heads/__init__ registers families)."""
    return b.startswith(a + ".")


def test_no_import_circle() -> None:
    edges = {a: {b for b in bs if not is_parent_package(a, b)} for a, bs in graph().items()}
    cycle = find_cycle(edges)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_core_needs_no_ray_and_no_stage() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        if name.startswith(EDGES):
            continue
        top, local = imports(path)
        for imp in top | {m for _, m in local}:
            if imp == "ray" or imp.startswith(("ray.", "dermray.stages", "dermray.cli")):
                offenders.append(f"{name} imports {imp}")
    assert not offenders, "core modules must not import Ray or a stage:\n" + "\n".join(offenders)


def test_local_imports_only_of_optional_heavy_libraries() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        _, local = imports(path)
        for line, imp in local:
            if not imp.startswith(LAZY_OK):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {imp}")
    assert not offenders, "function-local imports of non-optional modules:\n" + "\n".join(offenders)


def test_the_checker_sees_a_circle(tmp_path: Path) -> None:
    """The cycle finder itself: a -> b -> a is found, a -> b is not."""
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
