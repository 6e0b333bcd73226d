"""Device layouts: the ``('data', 'tower')`` mesh and the network under ``shard_map``.

One parameter tree, every layout. Each parameter has a leading ``tower`` axis,
sharded ``P('tower')`` on a mesh, so each device holds its own tower, as the
paper's two GPUs did. The batch is sharded over ``data``. Inside ``shard_map``
each device runs ``Tower`` on its slice of the batch; the towers exchange
activations through ``all_gather`` over ``'tower'`` (see ``model.py``).

On a machine with no accelerators, call ``use_virtual_cpu_devices(n)`` before
anything touches a JAX device (or set
``XLA_FLAGS=--xla_force_host_platform_device_count=n``) to get ``n`` CPU devices.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from alexnet_jax.model import TOWER_AXIS, AlexNet, ConfigError

DATA_AXIS = "data"

# Where arrays live on a ('data', 'tower') mesh: the layout rules, all in one place.
PARAM_SPEC = P(TOWER_AXIS)  # tower-stacked arrays: each device holds its own tower
BATCH_SPEC = P(DATA_AXIS)  # examples split over the data axis
LOGITS_SPEC = P(DATA_AXIS, TOWER_AXIS)  # each tower's share of the classes (and of fc7's units)
# Leaves of a train state, first match wins: parameters and momentum carry the tower
# axis (ndim >= 2, biases included); the step, learning rate and RNG key data do not.
_STATE_RULES = ((lambda leaf: leaf.ndim >= 2, PARAM_SPEC), (lambda leaf: True, P()))


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


def make_mesh(towers: int = 2, data: int | None = None, devices=None) -> Mesh:
    """A ``('data', 'tower')`` mesh; ``data`` defaults to all remaining devices.

    Axes are ``Auto``: arrays carry no sharding in their types, and the
    compiler places the (few) operations outside ``shard_map``.
    """
    if devices is None:  # each process's devices together: a tower pair never spans two hosts
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    devices = list(devices)
    if data is None:
        if len(devices) % towers:
            raise ConfigError(f"{len(devices)} devices cannot be split into towers={towers}.")
        data = len(devices) // towers
    if data * towers > len(devices):
        raise ConfigError(
            f"A mesh of data={data} x tower={towers} needs {data * towers} devices; "
            f"only {len(devices)} are available (on CPU: --config.mesh.cpu_devices=N, or use_virtual_cpu_devices(N))."
        )
    grid = np.asarray(devices[: data * towers], dtype=object).reshape(data, towers)
    return Mesh(grid, (DATA_AXIS, TOWER_AXIS), axis_types=(AxisType.Auto,) * 2)


def param_sharding(mesh: Mesh) -> NamedSharding:
    """Every parameter: leading tower axis split over the mesh's ``tower`` axis."""
    return NamedSharding(mesh, PARAM_SPEC)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def state_shardings(tree: Any, mesh: Mesh) -> Any:
    """The sharding of every leaf of a train state (or parameter tree), by ``_STATE_RULES``."""

    def sharding(leaf):
        return NamedSharding(mesh, next(spec for applies, spec in _STATE_RULES if applies(leaf)))

    return jax.tree_util.tree_map(sharding, tree)


def shard_variables(variables: Any, mesh: Mesh) -> Any:
    return jax.device_put(variables, param_sharding(mesh))


def _check(model: AlexNet, mesh: Mesh) -> None:
    if mesh.shape[TOWER_AXIS] not in (model.towers, 1):
        raise ConfigError(
            f"The model has towers={model.towers} but the mesh's '{TOWER_AXIS}' axis has size "
            f"{mesh.shape[TOWER_AXIS]}; build it with make_mesh(towers={model.towers}) (one tower per "
            "device) or make_mesh(towers=1) (all towers on every device)."
        )


def mesh_forward(model: AlexNet, mesh: Mesh, *, train: bool = False, features: bool = False):
    """``f(variables, images_NHWC, dropout_key) -> logits`` running one tower per device.

    The logits come back sharded ``P('data', 'tower')``: each tower's share of
    the classes, as the paper's GPUs each held half of fc8. The softmax over all
    classes is taken outside, by whoever computes the loss. On a mesh whose
    ``tower`` axis has size 1, each device runs all towers (data parallelism
    only; on a 1x1 mesh this is ``model.apply``). ``features=True``: ``f``
    returns ``(logits, fc7)``, fc7's activations ``(N, towers * units)``, towers
    in order, the paper's Figure 4 features.
    """
    _check(model, mesh)
    # A tower axis of size 1 with a two-tower net: every device runs both towers (under vmap).
    split = mesh.shape[TOWER_AXIS] == model.towers

    def per_device(variables, images_nHWC, key):
        rngs = {"dropout": key} if key is not None else {}
        out = model.apply(variables, images_nHWC, train=train, rngs=rngs, tower_axis_mapped=split,
                          data_axis=DATA_AXIS, mutable=["intermediates"] if features else False)
        if not features:
            return out
        logits, state = out
        fc7_TnF = state["intermediates"]["towers"]["fc7_act"][0]  # T: the towers this device runs
        return logits, jnp.moveaxis(fc7_TnF, 0, 1).reshape(images_nHWC.shape[0], -1)

    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(PARAM_SPEC, BATCH_SPEC, P()),
        out_specs=(LOGITS_SPEC, LOGITS_SPEC) if features else LOGITS_SPEC,
    )


def apply_on_mesh(
    model: AlexNet,
    variables: Any,
    images_NHWC: jax.Array,
    mesh: Mesh,
    *,
    train: bool = False,
    rngs: dict[str, jax.Array] | None = None,
) -> jax.Array:
    """``model.apply`` on a mesh: same parameters, same logits, one tower per device.

    ``variables`` may live anywhere (e.g. fresh from ``model.init`` on one
    device); they are placed on the mesh first. The batch size must divide by
    the mesh's ``data`` axis.
    """
    n = images_NHWC.shape[0]
    if n % mesh.shape[DATA_AXIS]:
        raise ValueError(
            f"Batch size {n} does not divide over the mesh's data axis ({mesh.shape[DATA_AXIS]})."
        )
    key = None
    if train and model.dropout > 0:
        if not rngs or "dropout" not in rngs:
            raise ValueError("Training with dropout needs rngs={'dropout': key}.")
        key = rngs["dropout"]
    f = jax.jit(mesh_forward(model, mesh, train=train))
    return f(shard_variables(variables, mesh), jax.device_put(images_NHWC, batch_sharding(mesh)), key)


def mesh_for_config(towers: int, mesh_cfg) -> tuple[Mesh, str | None]:
    """The mesh a config's ``mesh`` section asks for, and a line to print when the default had to change.

    ``mesh.tower=-1`` asks for one tower per device; with fewer devices than
    towers (one GPU), or a count the towers do not divide, every device runs
    all towers instead (``mesh.tower=1``), which gives the same results.
    """
    tower_axis, note = mesh_cfg.tower, None
    if tower_axis == -1:
        tower_axis = towers
        n = jax.device_count()
        if n % towers:
            tower_axis = 1
            note = (f"{n} {jax.devices()[0].platform} device(s) for {towers} towers: every device runs all "
                    f"towers (--config.mesh.tower=1; same results, no exchanges between devices).")
    if tower_axis not in (1, towers):
        raise ConfigError(f"mesh.tower={tower_axis}: use -1 or {towers} (one tower per device) "
                          "or 1 (all towers on every device).")
    try:
        return make_mesh(towers=tower_axis, data=None if mesh_cfg.data == -1 else mesh_cfg.data), note
    except ConfigError as e:
        raise ConfigError(f"{e} With fewer devices, --config.mesh.tower=1 runs all towers on every device, "
                          "and --config.mesh.data=N uses N of them.") from None
