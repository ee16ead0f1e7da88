"""The import graph of ``tokenreduce`` and ``tokenreduce_plugins``, read from the source with ``ast``.

Two rules (issue #15):

* no import cycles: a cycle makes import order matter and hides which module owns what;
* the core never imports a plugin: it reaches plugins only through the hooks of
  :mod:`tokenreduce.hookspecs` (the plugins package may import the core, never the reverse).

Every import that can run counts, wherever it is written: at module level, inside a
function (an import deferred into a function still ties the two modules together, so it
still makes a cycle), under ``try``/``if``; so do ``importlib.import_module("...")`` calls
with a literal name. Only imports under ``if TYPE_CHECKING:`` are left out: they never
run and name types for annotations only (e.g. :mod:`tokenreduce.adapter_base` names the
``Pipeline`` an adapter takes, while building a pipeline from YAML needs the registry,
which checks adapter classes against :class:`~tokenreduce.adapter_base.Adapter`).
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path

import tokenreduce
import tokenreduce_plugins

CORE = "tokenreduce"
PLUGINS = "tokenreduce_plugins"


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    where: str  # file:line of the import statement


def modules_of(package: str, folder: Path) -> dict[str, tuple[Path, bool]]:
    """``dotted name -> (file, is_package)`` of every ``.py`` file under ``folder``."""
    found = {}
    for path in sorted(folder.rglob("*.py")):
        parts = [package, *path.relative_to(folder).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        found[".".join(parts)] = (path, is_package)
    return found


def _known(name: str | None, modules: dict) -> str | None:
    """The deepest module of ours that ``name`` lies in (``a.b.func`` -> ``a.b``), or None."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imported_names(node: ast.AST, package: str, modules: dict) -> list[str]:
    """Dotted names an import statement (or ``importlib.import_module("x")``) brings in."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:  # relative: ``from ..x import y`` inside package ``a.b`` -> ``a.x``
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        # ``from a import b`` imports the submodule ``a.b`` when there is one, else (a name in) ``a``.
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    if isinstance(node, ast.Call):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        arg = node.args[0] if node.args else None
        if name in ("import_module", "__import__") and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return [arg.value]
    return []


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None) if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runnable_nodes(tree: ast.AST):
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` (their ``else`` runs)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if _is_type_checking(node):
            todo.extend(node.orelse)  # type: ignore[attr-defined]
            continue
        todo.extend(ast.iter_child_nodes(node))


def import_graph(roots: dict[str, Path]) -> tuple[set[str], list[Edge]]:
    """Modules and import edges of the packages ``{name: folder}``; edges only between them."""
    modules: dict[str, tuple[Path, bool]] = {}
    for package, folder in roots.items():
        modules.update(modules_of(package, folder))
    edges = []
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        for node in _runnable_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names = _imported_names(node, package, modules)
            for target in {_known(n, modules) for n in names} - {None, name}:
                edges.append(Edge(name, target, f"{path}:{node.lineno}"))  # type: ignore[arg-type]
    return set(modules), edges


def find_cycles(nodes: set[str], edges: list[Edge]) -> list[tuple[set[str], list[Edge]]]:
    """Each strongly connected component of more than one module, with one cycle in it (as edges)."""
    out: dict[str, list[Edge]] = {n: [] for n in nodes}
    for e in edges:
        out[e.source].append(e)
    # Tarjan's algorithm, iterative (no recursion limit on deep graphs).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in sorted(nodes):
        if start in index:
            continue
        work = [(start, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = len(index)
                stack.append(v)
                on_stack.add(v)
            if i < len(out[v]):
                work.append((v, i + 1))
                w = out[v][i].target
                if w not in index:
                    work.append((w, 0))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    components.append(comp)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    return [(comp, _cycle_in(comp, out)) for comp in components]


def _cycle_in(comp: set[str], out: dict[str, list[Edge]]) -> list[Edge]:
    """A shortest cycle through the component's first module (breadth-first back to it)."""
    start = min(comp)
    paths: dict[str, list[Edge]] = {start: []}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for e in out[v]:
                if e.target == start:
                    return paths[v] + [e]
                if e.target in comp and e.target not in paths:
                    paths[e.target] = paths[v] + [e]
                    nxt.append(e.target)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in its own component")  # pragma: no cover


def describe(component: set[str], cycle: list[Edge]) -> str:
    """The cycle's path, then each import on it with its file:line, then the whole tangle."""
    lines = [" -> ".join([cycle[0].source] + [e.target for e in cycle])]
    lines += [f"    {e.source} -> {e.target} at {e.where}" for e in cycle]
    if len(component) > len(cycle):
        lines.append(f"    (one cycle of several among: {', '.join(sorted(component))})")
    return "\n".join(lines)


def real_graph() -> tuple[set[str], list[Edge]]:
    return import_graph(
        {CORE: Path(tokenreduce.__file__).parent, PLUGINS: Path(tokenreduce_plugins.__file__).parent}
    )


# -- the machinery, on a package written for the purpose ----------------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_the_graph_sees_relative_and_function_level_imports_and_finds_their_cycle(tmp_path):
    _write(
        tmp_path / "pkg",
        {
            "__init__.py": "from .a import f\n",
            "a.py": "def f():\n    from .sub import b\n    return b\n",
            "sub/__init__.py": "",
            "sub/b.py": "try:\n    from ..c import C\nexcept ImportError:\n    C = None\n",
            "c.py": "import importlib\nimportlib.import_module('pkg.a')\nimport os, json\n",
            "d.py": "from pkg import sub\nfrom pkg.sub import b as _b\n",
            # Annotations only: never run, so no edge e -> a (its else branch runs: d -> c).
            "e.py": "import typing\nif typing.TYPE_CHECKING:\n    from .a import f\nelse:\n    from . import c\n",
        },
    )
    nodes, edges = import_graph({"pkg": tmp_path / "pkg"})
    assert nodes == {"pkg", "pkg.a", "pkg.sub", "pkg.sub.b", "pkg.c", "pkg.d", "pkg.e"}
    pairs = {(e.source, e.target) for e in edges}
    assert pairs == {
        ("pkg", "pkg.a"),
        ("pkg.a", "pkg.sub.b"),
        ("pkg.sub.b", "pkg.c"),
        ("pkg.c", "pkg.a"),
        ("pkg.d", "pkg.sub"),
        ("pkg.d", "pkg.sub.b"),
        ("pkg.e", "pkg.c"),
    }
    ((component, cycle),) = find_cycles(nodes, edges)
    assert component == {"pkg.a", "pkg.sub.b", "pkg.c"}
    text = describe(component, cycle)
    assert text.splitlines()[0] == "pkg.a -> pkg.sub.b -> pkg.c -> pkg.a"
    assert f"{tmp_path / 'pkg' / 'sub' / 'b.py'}:2" in text  # the line of the offending import


def test_the_graph_of_the_real_packages_has_the_imports_we_know_of():
    nodes, edges = real_graph()
    assert {"tokenreduce", "tokenreduce.pipeline", "tokenreduce_plugins.fastv", "tokenreduce_plugins.adapters"} <= nodes
    pairs = {(e.source, e.target) for e in edges}
    # plugins import the core; the core package re-exports its modules.
    assert {("tokenreduce_plugins.fastv", "tokenreduce"), ("tokenreduce_plugins.fastv", "tokenreduce.context")} <= pairs
    assert ("tokenreduce", "tokenreduce.pipeline") in pairs


# -- the rules ---------------------------------------------------------------------------------


def test_no_import_cycles():
    cycles = find_cycles(*real_graph())
    assert not cycles, "import cycles (every import counts, also inside functions):\n" + "\n".join(
        describe(*c) for c in cycles
    )


def test_the_core_imports_no_plugin():
    _, edges = real_graph()
    bad = [e for e in edges if e.source.split(".")[0] == CORE and e.target.split(".")[0] == PLUGINS]
    assert not bad, "the core reaches plugins only through hooks (tokenreduce.hookspecs):\n" + "\n".join(
        f"    {e.source} imports {e.target} at {e.where}" for e in bad
    )
