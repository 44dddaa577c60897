"""The package's source read as a whole (ast, nothing imported): the import graph of qmse's
modules has no cycle, no function imports anything except optional extras (and the command
line, which imports a command's module only when it runs), and every torch.load passes
weights_only=True."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "qmse"
# Optional extras, imported where they are used so that qmse works without them.
OPTIONAL = ("ray", "tensorboard", "torch.utils.tensorboard")
# The command line: `qmse --help` lists the commands from a table; a command's module (and
# torch) is imported when that command runs. The only package whose functions may import.
LAZY = "qmse.cli"


def lazy(name: str) -> bool:
    return name == LAZY or name.startswith(LAZY + ".")


def module_name(path: Path) -> str:
    """src/qmse/a/b.py -> "qmse.a.b"; src/qmse/a/__init__.py -> "qmse.a"."""
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module of the package (packages by their __init__.py), by dotted name."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _absolute(node: ast.ImportFrom, name: str, path: Path) -> str:
    """The module an ImportFrom names, with relative imports resolved against `name`."""
    if not node.level:
        return node.module or ""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imported(node: ast.Import | ast.ImportFrom, name: str, path: Path) -> list[str]:
    """The dotted modules an import statement loads: `from a import b` loads a.b when a.b is
    a module of the package, else the module a (b is a name defined in it)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    source = _absolute(node, name, path)
    known = modules()
    return [
        f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
        for alias in node.names
    ]


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports executed when the module is imported: outside functions and classes' methods,
    including those under module-level if/try, except `if TYPE_CHECKING:` blocks."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        elif not _type_checking(node):
            todo.extend(ast.iter_child_nodes(node))
    return found


def function_imports(tree: ast.Module) -> list[tuple[str, ast.Import | ast.ImportFrom]]:
    """(innermost enclosing function, import) for every import inside a function body."""
    found = []

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)) and function is not None:
                found.append((function, child))
            is_function = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            visit(child, child.name if is_function else function)

    visit(tree, None)
    return found


def import_graph() -> dict[str, set[str]]:
    """qmse module -> the qmse modules it imports at module level."""
    known = modules()
    graph = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        targets = set()
        for node in module_level_imports(tree):
            for target in imported(node, name, path):
                # `import qmse.a.b` loads qmse.a.b; a name from a package is in its __init__
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target.startswith("qmse") and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_on_small_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "d"}, "b": set(), "d": {"d"}}) == ["d", "d"]


def test_the_graph_sees_packages_and_relative_imports(tmp_path, monkeypatch):
    """A package whose __init__ re-exports a submodule by a relative import, as qmse.escape
    may: a name taken from the package is an edge to its __init__."""
    root = tmp_path / "src"
    (root / "qmse" / "pkg").mkdir(parents=True)
    (root / "qmse" / "__init__.py").write_text("")
    (root / "qmse" / "a.py").write_text("from qmse.pkg import thing\n")
    (root / "qmse" / "pkg" / "__init__.py").write_text("from .inner import thing\n")
    (root / "qmse" / "pkg" / "inner.py").write_text(
        "from .. import a\n\ndef f():\n    import ray\n    from qmse import a\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "SRC", root)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", root / "qmse")
    assert import_graph() == {
        "qmse": set(),
        "qmse.a": {"qmse.pkg"},
        "qmse.pkg": {"qmse.pkg.inner"},
        "qmse.pkg.inner": {"qmse.a"},
    }
    assert find_cycle(import_graph()) == ["qmse.a", "qmse.pkg", "qmse.pkg.inner", "qmse.a"]
    tree = ast.parse((root / "qmse" / "pkg" / "inner.py").read_text())
    local = [node for _, node in function_imports(tree)]
    assert [ast.unparse(n) for n in local] == ["import ray", "from qmse import a"]
    assert [_optional(n) for n in local] == [True, False]


def test_no_import_cycle():
    graph = import_graph()
    assert {"qmse.train", "qmse.rundir", "qmse.loss"} <= set(graph)
    assert "qmse.rundir" in graph["qmse.train"]  # the graph sees real imports
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def reach(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` loads, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


CNN = {"qmse.train", "qmse.stacked", "qmse.rundir", "qmse.config", "qmse.data", "qmse.models",
       "qmse.reproduce", "qmse.sources", "qmse.download"}  # fmt: skip
REPORTING = {"qmse.report", "qmse.gridplot", "qmse.tuningplot", "qmse.escape.report",
             "qmse.landscapeplot"}  # fmt: skip


def test_the_layers():
    """The shared core (errors, keys, stats, tuning) stands alone; the escape benchmark loads
    nothing of the CNN trainer or its data; the task runner holds no experiment; the
    orchestrations (reproduce, escape.cells, train) take nothing from reporting modules."""
    graph = import_graph()
    assert {"qmse.loss", "qmse.tuning", "qmse.stats"} <= reach(graph, "qmse.escape")  # sees imports
    for core in ("qmse.errors", "qmse.keys", "qmse.stats", "qmse.tuning"):
        assert reach(graph, core) <= {"qmse.errors"}, (core, reach(graph, core))
    assert not reach(graph, "qmse.escape") & CNN, reach(graph, "qmse.escape") & CNN
    assert not reach(graph, "qmse.sweep") & (CNN | {"qmse.escape"})
    for orchestration in ("qmse.reproduce", "qmse.escape.cells", "qmse.train"):
        assert not reach(graph, orchestration) & REPORTING, orchestration


def _optional(node: ast.Import | ast.ImportFrom) -> bool:
    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
    return all(any(n == o or n.startswith(o + ".") for o in OPTIONAL) for n in names)


def test_only_the_command_line_imports_lazily():
    assert [n for n in sorted(modules()) if lazy(n)] == sorted(
        module_name(p) for p in (PACKAGE / "cli").glob("*.py")
    )
    assert not lazy("qmse.client") and not lazy("qmse")


@pytest.mark.parametrize("name", [n for n in sorted(modules()) if not lazy(n)])
def test_no_function_local_imports_except_optional_extras(name):
    path = modules()[name]
    tree = ast.parse(path.read_text(), filename=str(path))
    local = [
        f"{path.relative_to(SRC)}:{node.lineno} in {fn}(): {ast.unparse(node)}"
        for fn, node in function_imports(tree)
        if not _optional(node)
    ]
    assert not local, "imports inside functions (move them to the top):\n" + "\n".join(local)


def torch_load_calls(tree: ast.Module) -> list[ast.Call]:
    """Calls of torch.load, also through `from torch import load [as x]` or `import torch as t`."""
    torch_names, load_names = {"torch"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            torch_names |= {a.asname for a in node.names if a.name == "torch" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            load_names |= {a.asname or a.name for a in node.names if a.name == "load"}
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and (
            (
                isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id in torch_names
            )
            or (isinstance(node.func, ast.Name) and node.func.id in load_names)
        )
    ]


def _weights_only(call: ast.Call) -> bool:
    return any(
        k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
        for k in call.keywords
    )


def test_the_torch_load_scan_sees_every_spelling():
    tree = ast.parse(
        "import torch\nimport torch as t\nfrom torch import load as L\n"
        "torch.load(p, weights_only=True)\nt.load(p)\nL(p, weights_only=False)\nnp.load(p)\n"
    )
    calls = torch_load_calls(tree)
    assert [ast.unparse(c) for c in calls] == [
        "torch.load(p, weights_only=True)",
        "t.load(p)",
        "L(p, weights_only=False)",
    ]
    assert [_weights_only(c) for c in calls] == [True, False, False]


def test_every_torch_load_passes_weights_only_true():
    """A checkpoint must never run code: torch.load without weights_only=True obeys
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 and unpickles anything."""
    unsafe = []
    for path in modules().values():
        tree = ast.parse(path.read_text(), filename=str(path))
        unsafe += [
            f"{path.relative_to(SRC)}:{c.lineno}: {ast.unparse(c)}"
            for c in torch_load_calls(tree)
            if not _weights_only(c)
        ]
    assert not unsafe, "torch.load without weights_only=True:\n" + "\n".join(unsafe)
