"""Test set-up: 8 virtual CPU devices, fixed before JAX starts its backend, and a compilation cache.

Many tests compile the same tiny training step, in this process and in the
``launch.py`` subprocesses they start (which inherit these variables). JAX's
persistent compilation cache, under ``.cache/jax-tests`` in the checkout, lets
each compile once per test run; its keys cover the program, the devices and the
JAX version, so a changed network is compiled afresh. Delete the folder at will.
"""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "jax-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # the tiny nets compile in under a second
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax

jax.config.update("jax_num_cpu_devices", 8)


def pytest_addoption(parser):
    parser.addoption(
        "--heavy",
        choices=("run", "skip"),
        default="run",
        help="skip: leave out the tests marked heavy (what .ci/run does first, to fit its time)",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--heavy") == "skip":
        heavy = [item for item in items if "heavy" in item.keywords]
        if heavy:
            config.hook.pytest_deselected(items=heavy)
            items[:] = [item for item in items if "heavy" not in item.keywords]
