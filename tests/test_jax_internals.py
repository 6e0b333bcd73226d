"""``alexnet_jax._jax_internals`` is our one door into ``jax._src``; if JAX moves what it uses,
this fails first and says what moved."""

import subprocess
import sys

import jax

from alexnet_jax import _jax_internals


def test_backend_started_query_tracks_jax():
    jax.devices()  # the test process has started its backend (conftest)
    assert _jax_internals.backends_are_initialized() is True
    fresh = subprocess.run(
        [
            sys.executable,
            "-c",
            "from alexnet_jax import _jax_internals as j; "
            "a = j.backends_are_initialized(); import jax; jax.devices(); "
            "print(a, j.backends_are_initialized())",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert fresh.returncode == 0, f"jax._src.xla_bridge.backends_are_initialized moved? {fresh.stderr[-2000:]}"
    assert fresh.stdout.split() == ["False", "True"]


def test_distributed_client_is_reachable():
    # One process: the runtime is not started, so there is no client, but the handle must exist.
    assert _jax_internals.distributed_client() is None
