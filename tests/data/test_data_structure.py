"""The data package's shape: no import circles, the command imported by nothing, modules of readable size."""

import ast
import subprocess
import sys
from pathlib import Path

import alexnet_jax.data

PACKAGE = Path(alexnet_jax.data.__file__).parent
MODULES = {p.stem: p for p in sorted(PACKAGE.glob("*.py"))}


def imported_modules(path: Path) -> set[str]:
    """The package's modules ``path`` imports, at module level or inside functions ('__init__': the package)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("alexnet_jax.data"):
            rest = node.module[len("alexnet_jax.data"):].lstrip(".")
            if rest:
                out.add(rest.split(".")[0])
            else:  # from alexnet_jax.data import x: a submodule, or a name of the package itself
                out |= {a.name if a.name in MODULES else "__init__" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[2] for a in node.names if a.name.startswith("alexnet_jax.data.")}
    return out


def test_no_import_cycle_inside_the_package():
    graph = {name: imported_modules(path) - {name} for name, path in MODULES.items()}
    assert graph["stats"] and graph["locate"] >= {"packed", "packing", "stats"}  # the parser sees imports
    state = {}  # name -> 'open' while on the path, 'done' after

    def visit(name, path):
        state[name] = "open"
        for dep in sorted(graph.get(name, ())):
            assert state.get(dep) != "open", f'import cycle: {" -> ".join(path + [dep])}'
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_the_command_module_is_imported_by_nothing_in_the_package():
    """``python -m`` runs prepare.py as __main__; imported from the package as well, it would run twice."""
    assert [name for name, path in MODULES.items() if "prepare" in imported_modules(path)] == []
    r = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "alexnet_jax.data.prepare", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Warning" not in r.stderr, r.stderr[-2000:]
    assert "--src" in r.stdout and "--stats_only" in r.stdout


def test_modules_and_functions_stay_readable():
    for name, path in MODULES.items():
        text = path.read_text()
        assert len(text.splitlines()) <= 400, f"{name}.py: {len(text.splitlines())} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 80, f"{name}.{node.name}: {length} lines"


def test_the_package_names_import_plainly():
    from alexnet_jax import data as data_lib

    for name in ("DatasetError", "ResolvedData", "check_config", "resolve", "split_records", "default_data_config",
                 "demo_data_config", "build_train_iter", "build_eval_iter", "EvalPasses", "release_shared_memory",
                 "ensure_embedded_dataset"):
        assert name in data_lib.__all__ and callable(getattr(data_lib, name)), name
    assert not hasattr(data_lib, "__getattr__")  # no lazy table
