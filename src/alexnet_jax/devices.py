"""Starting JAX on the devices a machine has: virtual CPU devices where there is no accelerator.

What JAX runs on is decided by the devices it finds, not by what is installed: a CUDA plugin on a
machine without a GPU (the ``gpu-compile`` extra, or ``jax[cuda13]`` on a laptop) leaves JAX on the
CPU, and such a machine is a CPU machine. JAX reports the plugin's failed start as a traceback; here
it becomes one line.
"""

from __future__ import annotations

import logging

import jax


class _OneLinePluginError(logging.Filter):
    """JAX's "Jax plugin configuration error" (a CUDA plugin with no GPU) as one line, not a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and "plugin configuration error" in str(record.msg):
            error = record.exc_info[1]
            first = str(error).strip().splitlines()[0] if error is not None and str(error).strip() else ""
            record.msg = f"{record.getMessage()}: {first[:200]} (no usable GPU: JAX runs on the CPU)"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


def quiet_plugin_errors() -> None:
    """Install the filter on JAX's backend logger (once)."""
    logger = logging.getLogger("jax._src.xla_bridge")
    if not any(isinstance(f, _OneLinePluginError) for f in logger.filters):
        logger.addFilter(_OneLinePluginError())


quiet_plugin_errors()


def use_virtual_cpu_devices(n: int) -> None:
    """Split the host CPU into ``n`` JAX devices; must run before JAX starts its backend."""
    from alexnet_jax._jax_internals import backends_are_initialized  # no public query for this

    if backends_are_initialized():
        if jax.device_count() == n:
            return
        raise RuntimeError(
            f"JAX has already started with {jax.device_count()} device(s); cannot switch to "
            f"{n} virtual CPU devices. Call use_virtual_cpu_devices({n}) before any JAX "
            f"computation, or set XLA_FLAGS=--xla_force_host_platform_device_count={n} "
            "in the environment."
        )
    jax.config.update("jax_num_cpu_devices", n)


def prepare_devices(cpu_devices: int) -> str | None:
    """Before JAX starts, on a machine with no accelerator: split the CPU into ``cpu_devices`` devices.

    Returns why it did not (None if it did): JAX had already started. The count applies to JAX's CPU
    backend only: where JAX finds an accelerator, its devices are used as they are. Starts nothing, so a
    multi-process run can join its peers after this.
    """
    from alexnet_jax._jax_internals import backends_are_initialized  # no public query for this

    if backends_are_initialized():
        return "JAX had already started in this process"
    jax.config.update("jax_num_cpu_devices", cpu_devices)
    return None


def devices_note(cpu_devices: int, why: str | None) -> str | None:
    """One line when a CPU run has another device count than ``mesh.cpu_devices`` asked for, saying why."""
    if why is None or jax.default_backend() != "cpu" or jax.device_count() == cpu_devices:
        return None
    return (
        f"Training on the {jax.device_count()} CPU device(s) JAX has: {why} (mesh.cpu_devices={cpu_devices} "
        f"applies in a fresh process, or set XLA_FLAGS=--xla_force_host_platform_device_count={cpu_devices})."
    )
