"""The data package's shape: the command module imported by nothing, the package's names imported plainly.

Import cycles and module and function sizes are checked for the whole package in tests/test_structure.py.
"""

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
            rest = node.module[len("alexnet_jax.data") :].lstrip(".")
            if rest:
                out.add(rest.split(".")[0])
            else:  # from alexnet_jax.data import x: a submodule, or a name of the package itself
                out |= {a.name if a.name in MODULES else "__init__" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[2] for a in node.names if a.name.startswith("alexnet_jax.data.")}
    return out


def test_the_command_module_is_imported_by_nothing_in_the_package():
    """``python -m`` runs prepare.py as __main__; imported from the package as well, it would run twice."""
    assert [name for name, path in MODULES.items() if "prepare" in imported_modules(path)] == []
    r = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", "alexnet_jax.data.prepare", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "Warning" not in r.stderr, r.stderr[-2000:]
    assert "--src" in r.stdout and "--stats_only" in r.stdout


def test_the_package_names_import_plainly():
    from alexnet_jax import data as data_lib

    for name in (
        "ResolvedData",
        "check_config",
        "resolve",
        "split_records",
        "default_data_config",
        "demo_data_config",
        "build_train_iter",
        "build_eval_iter",
        "EvalPasses",
        "release_shared_memory",
        "ensure_embedded_dataset",
    ):
        assert name in data_lib.__all__ and callable(getattr(data_lib, name)), name
    assert not hasattr(data_lib, "__getattr__")  # no lazy table
