"""The shape of the code in ``src/alexnet_jax``, kept so it stays easy to read and to change.

No module-level ``__getattr__`` (names that go-to-definition cannot find), and no
import cycle (not even through imports inside functions: a cycle means two
modules that cannot be understood, or changed, apart). Pure ``ast``: nothing
here imports the package or JAX. Each check takes a package folder, so the last
test can show on a small planted tree that each one fails when it should.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "alexnet_jax"


def _modules(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``package`` (``__init__.py``: the package)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _rel(package: Path, path: Path) -> str:
    return path.relative_to(package).as_posix()


# ---------------------------------------------------------------------------
# The checks: each returns its offenders, empty when the code is as it should be.


def _module_level(body: list[ast.stmt]):
    """The statements that run at import: the module's own, and those in its top-level if/try/with blocks."""
    for stmt in body:
        yield stmt
        if isinstance(stmt, (ast.If, ast.Try, ast.With, getattr(ast, "TryStar", ast.Try))):
            for block in ("body", "orelse", "finalbody"):
                yield from _module_level(getattr(stmt, block, []))
            for handler in getattr(stmt, "handlers", []):
                yield from _module_level(handler.body)


def module_getattrs(package: Path) -> list[tuple[str, int]]:
    """``(file, line)`` of every module-level ``__getattr__`` (a def or an assignment)."""
    out = []
    for path in _modules(package).values():
        for stmt in _module_level(_tree(path).body):
            targets = (
                [stmt.name]
                if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef))
                else [
                    t.id for t in getattr(stmt, "targets", [getattr(stmt, "target", None)]) if isinstance(t, ast.Name)
                ]
            )
            if "__getattr__" in targets:
                out.append((_rel(package, path), stmt.lineno))
    return out


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Ids of the import nodes under ``if TYPE_CHECKING:``: never run, so no edge."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def import_edges(package: Path) -> dict[str, dict[str, int]]:
    """``{module: {imported module: line}}`` among the package's modules, from every ``import`` and
    ``from ... import`` in the module, at the top or inside a function.

    ``from P import x`` is an edge to the submodule ``P.x`` when there is one, else to ``P`` itself
    (``P/__init__.py``, where the name ``x`` comes from). Importing ``P.x`` runs ``P/__init__.py``
    first, but that is no edge from the importer to ``P``: a package whose ``__init__`` imports its
    submodules is no cycle with a submodule importing a sibling as ``from P import sibling``. A
    submodule that takes a *name* from its package (``from alexnet_jax import ConfigError``) does
    depend on ``__init__``, and is an edge to it.
    """
    modules = _modules(package)
    edges: dict[str, dict[str, int]] = {m: {} for m in modules}
    for name, path in modules.items():
        tree = _tree(path)
        skip = _type_checking_only(tree)
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's own package, up level - 1 more
                    parts = name.split(".") if is_package else name.split(".")[:-1]
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                if target in modules:  # the first line importing it, for the message
                    edges[name][target] = min(edges[name].get(target, node.lineno), node.lineno)
    return edges


def import_cycles(package: Path) -> list[list[str]]:
    """Every import cycle: one closed path ``[a, b, ..., a]`` per group of modules that import each other
    (a strongly connected component of the import graph), and ``[a, a]`` for a module importing itself."""
    edges = import_edges(package)
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted([_cycle_through(group, edges) for group in groups] + [[v, v] for v in edges if v in edges[v]])


def _cycle_through(group: list[str], edges: dict) -> list[str]:
    """A shortest closed path from the group's first module back to it, inside the group."""
    start, members = group[0], set(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v]):
                if w == start and v != start:
                    return paths[v] + [start]
                if w in members and w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle in {group}")  # not reached: the group is strongly connected


def _describe_cycle(cycle: list[str], edges: dict) -> str:
    return " -> ".join(cycle) + "  (" + ", ".join(f"{a} line {edges[a][b]}" for a, b in zip(cycle, cycle[1:])) + ")"


def _listing(what: str, rows: list[str]) -> str:
    return f"{len(rows)} {what}:\n  " + "\n  ".join(rows)


# ---------------------------------------------------------------------------
# The checks on the package


def test_no_module_level_getattr():
    found = module_getattrs(PACKAGE)
    assert not found, _listing(
        "module-level __getattr__ (import the names plainly)", [f"{f} line {line}" for f, line in found]
    )


def test_no_import_cycles():
    cycles = import_cycles(PACKAGE)
    edges = import_edges(PACKAGE)
    assert not cycles, _listing("import cycles", [_describe_cycle(c, edges) for c in cycles])


def test_the_import_graph_is_read_as_python_imports():
    """Spot checks on the real package: what import_edges must see for the checks above to mean anything."""
    edges = import_edges(PACKAGE)
    assert "alexnet_jax.model" in edges["alexnet_jax"]  # __init__'s own imports
    assert "alexnet_jax.inference" in edges["alexnet_jax"]
    assert "alexnet_jax.cli" in edges["alexnet_jax.evaluate"]  # from alexnet_jax import cli: the submodule
    assert "alexnet_jax" not in edges["alexnet_jax.evaluate"]


# ---------------------------------------------------------------------------
# Each check, shown failing on a planted mistake


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_each_check_catches_its_planted_mistake(tmp_path):
    pkg = (
        _write(
            tmp_path / "src",
            {
                "pkg/__init__.py": "from pkg.a import A\n",
                "pkg/a.py": "A = 1\n\ndef f():\n    from pkg.b import g\n    return g\n",  # a -> b inside a function
                "pkg/b.py": "from . import c\n\ndef g():\n    pass\n",  # b -> c, relative
                "pkg/c.py": "from pkg import a\n",  # c -> a: the cycle a -> b -> c -> a
                "pkg/sub/__init__.py": "from pkg.sub.leaf import LEAF\n",
                "pkg/sub/leaf.py": "from pkg.sub import other\nLEAF = 0\n",  # a sibling via the package: no cycle
                "pkg/sub/other.py": "from pkg import A\n",  # a name from pkg/__init__: an edge to it, no cycle
                "pkg/ring/__init__.py": "from pkg.ring.one import ONE\n",  # a cycle through a package's __init__:
                "pkg/ring/one.py": "from pkg.ring import two\nONE = 1\n",  # two needs ONE before one has defined it
                "pkg/ring/two.py": "from pkg.ring import ONE\n",
                "pkg/self.py": "def h():\n    from pkg.self import h as again\n    return again\n",  # a module importing itself
                "pkg/typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import typed2\n",
                "pkg/typed2.py": "from pkg import typed\n",  # typed -> typed2 only for type checkers: no cycle
                "pkg/lazy.py": "import importlib\n\ndef __getattr__(name):\n    return importlib.import_module(name)\n",
                "pkg/lazy2.py": "try:\n    pass\nexcept ImportError:\n    __getattr__ = None\n",
            },
        )
        / "pkg"
    )

    edges = import_edges(pkg)
    assert edges["pkg.a"] == {"pkg.b": 4} and edges["pkg.b"] == {"pkg.c": 1} and edges["pkg.c"] == {"pkg.a": 1}
    assert edges["pkg.sub.leaf"] == {"pkg.sub.other": 1} and edges["pkg.sub.other"] == {"pkg": 1}
    assert edges["pkg"] == {"pkg.a": 1} and edges["pkg.sub"] == {"pkg.sub.leaf": 1} and edges["pkg.typed"] == {}

    cycles = import_cycles(pkg)
    assert cycles == [
        ["pkg.a", "pkg.b", "pkg.c", "pkg.a"],
        ["pkg.ring", "pkg.ring.one", "pkg.ring.two", "pkg.ring"],
        ["pkg.self", "pkg.self"],
    ], cycles
    assert _describe_cycle(cycles[0], edges) == (
        "pkg.a -> pkg.b -> pkg.c -> pkg.a  (pkg.a line 4, pkg.b line 1, pkg.c line 1)"
    )

    assert module_getattrs(pkg) == [("lazy.py", 3), ("lazy2.py", 4)]


# The network's rules are checked where a config or a mesh comes in, once; the traced forward trusts them.
CHECKERS = {
    "from_config",
    "_check_widths",
    "_check_sizes",
    "check_layout",
    "layout_named",
    "make_mesh",
    "mesh_for_config",
    "validate_config",
    "_check_section",
}
FORWARD_MODULES = ("model.py", "axes.py", "tower_ops.py", "parallel.py", "config_check.py")


def config_errors_outside_checkers(package: Path) -> list[str]:
    """``raise ConfigError`` in the network's modules anywhere but a boundary checker (CHECKERS)."""
    found = []
    for name in FORWARD_MODULES:
        path = package / name
        if not path.exists():
            continue
        tree = _tree(path)
        for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for node in ast.walk(fn):
                raised = node.exc if isinstance(node, ast.Raise) else None
                call = raised.func if isinstance(raised, ast.Call) else raised
                if isinstance(call, ast.Name) and call.id == "ConfigError" and fn.name not in CHECKERS:
                    found.append(f"{name}:{fn.name} line {node.lineno}")
    return sorted(set(found))


def test_the_forward_pass_raises_no_config_error():
    found = config_errors_outside_checkers(PACKAGE)
    assert not found, _listing(
        "ConfigError raised outside the boundary checkers (check it in from_config, "
        "check_layout or config_check instead)",
        found,
    )


def test_a_config_error_in_the_forward_pass_is_caught(tmp_path):
    (tmp_path / "model.py").write_text(
        "class ConfigError(ValueError):\n    pass\n\n\ndef from_config(c):\n"
        "    raise ConfigError('ok here')\n\n\nclass Tower:\n"
        "    def _dense(self, n):\n        raise ConfigError('not here')\n"
    )
    assert config_errors_outside_checkers(tmp_path) == ["model.py:_dense line 11"]
