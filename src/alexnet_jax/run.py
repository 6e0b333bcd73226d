"""What ``launch.py`` runs.

Until the training loop lands (issue 4), the main job builds the configured
network, prints its summary, and runs one batch on the ``('data', 'tower')``
mesh and on a single device, checking that both layouts give the same logits.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from rich.console import Console

from alexnet_jax.model import from_config
from alexnet_jax.parallel import apply_on_mesh, make_mesh, use_virtual_cpu_devices
from alexnet_jax.summary import summary_table


def setup_devices(config: ml_collections.ConfigDict) -> None:
    """Ask for virtual CPU devices before JAX starts; accelerators, if present, win anyway."""
    use_virtual_cpu_devices(config.mesh.cpu_devices)


def build_mesh(config: ml_collections.ConfigDict, towers: int):
    data = None if config.mesh.data == -1 else config.mesh.data
    return make_mesh(towers=towers, data=data)


def main(config: ml_collections.ConfigDict, workdir: str) -> dict:
    console = Console()
    model = from_config(config.model)  # unknown or mistyped model keys fail here, by name
    setup_devices(config)
    mesh = build_mesh(config, model.towers)
    devices = jax.devices()
    console.print(f"[bold]alexnet_jax[/bold]  {len(devices)} x {devices[0].device_kind} "
                  f"({devices[0].platform});  mesh {dict(mesh.shape)};  workdir {workdir}")
    console.print(summary_table(model))

    s = model.image_size
    batch = 2 * mesh.shape["data"]
    key_init, key_x = jax.random.split(jax.random.key(config.seed))
    x = jax.random.normal(key_x, (batch, s, s, 3))
    t0 = time.perf_counter()
    variables = jax.jit(model.init)(key_init, x)
    one = jax.jit(model.apply)(variables, x)
    t1 = time.perf_counter()
    on_mesh = apply_on_mesh(model, variables, x, mesh)
    t2 = time.perf_counter()
    diff = float(jnp.max(jnp.abs(one - on_mesh)))
    scale = float(jnp.max(jnp.abs(one)))
    console.print(
        f"One batch of {batch}: one device {t1 - t0:.1f}s (init+compile+run), "
        f"mesh {dict(mesh.shape)} {t2 - t1:.1f}s (compile+run); "
        f"max |logits difference| = {diff:.2e} (logit scale {scale:.2e})"
    )
    if not np.isfinite(diff) or diff > 1e-4 * max(scale, 1.0):
        raise SystemExit("The mesh and single-device layouts disagree; please report this.")
    console.print("Layouts agree. Training is not implemented yet (issue 4): this run stops here.")
    return {"max_abs_diff": diff}
