"""The only module that reaches into ``jax._src``: two things JAX has no public handle for.

If a JAX release moves either, ``tests/test_jax_internals.py`` fails and names it, and only
this file needs changing.
"""

from __future__ import annotations


def backends_are_initialized() -> bool:
    """Whether JAX has started its backend (after that, the device count and the distributed
    runtime can no longer be set)."""
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def distributed_client():
    """The distributed runtime's key-value store client (None outside a multi-process run)."""
    from jax._src import distributed

    return distributed.global_state.client
