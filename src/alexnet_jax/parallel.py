"""Device layouts: the ``('data', 'tower')`` mesh and the network under ``shard_map``.

One parameter tree (a leading ``tower`` axis), every layout. A layout is a row of ``LAYOUTS``, data
rather than code: which mesh axis splits the towers, the conv and FC layers' examples and the FC units.
One mesh forward and the state shardings read it: ``towers`` (the paper: a tower per device), ``data``
(all towers everywhere) or ``hybrid`` (OWT 2014: conv data-parallel, FC units split, so FC gradients
need no reduction). Virtual CPU devices must be asked for before JAX starts (``devices.prepare_devices``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from alexnet_jax import tower_ops
from alexnet_jax.axes import TOWER_AXIS, Axes
from alexnet_jax.errors import ConfigError
from alexnet_jax.model import LAYERS, AlexNet, tower_widths

DATA_AXIS = "data"


# The layouts, as data: the network (mesh_forward), the shardings (param_specs) and the costs read them.
LAYOUTS = {
    "towers": Axes(tower=TOWER_AXIS, conv_batch=DATA_AXIS, fc_batch=DATA_AXIS),
    "data": Axes(conv_batch=DATA_AXIS, fc_batch=DATA_AXIS),
    "hybrid": Axes(conv_batch=DATA_AXIS, fc_units=DATA_AXIS),
}
DEFAULT_LAYOUT = "towers"
BATCH_SPEC = P(DATA_AXIS)  # input examples split over the data axis (every layout)


def mesh_shape(model: AlexNet, layout: str, devices: int) -> tuple[int, int]:
    """``(data, tower)``: the mesh ``launch.py`` builds for this layout on ``devices`` devices (``mesh.tower=-1``)."""
    if LAYOUTS[layout].tower is not None and devices % model.towers == 0:
        return devices // model.towers, model.towers
    return devices, 1


def layout_named(name: str) -> Axes:
    if name not in LAYOUTS:
        raise ConfigError(f"mesh.parallelism={name!r}: choose one of {', '.join(map(repr, LAYOUTS))}.")
    return LAYOUTS[name]


def _key_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


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


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, BATCH_SPEC)


def param_specs(tree: Any, layout: str = DEFAULT_LAYOUT) -> Any:
    """The PartitionSpec of every leaf of a parameter tree, a train state or its momentum.

    Leaves under a layer's ``kernel``/``bias`` follow the layout; the step, the
    learning rate and the RNG key data are replicated.
    """
    rules = layout_named(layout)

    def spec(path, leaf):
        names = _key_names(path)
        if len(names) >= 2 and names[-1] in ("kernel", "bias") and names[-2] in LAYERS:
            return rules.spec(names[-2], leaf.ndim)
        return P()

    return jax.tree_util.tree_map_with_path(spec, tree)


def state_shardings(tree: Any, mesh: Mesh, layout: str = DEFAULT_LAYOUT) -> Any:
    """The sharding of every leaf of a train state (or parameter tree) in ``layout``."""
    return jax.tree_util.tree_map(
        lambda spec: NamedSharding(mesh, spec), param_specs(tree, layout), is_leaf=lambda x: isinstance(x, P)
    )


def shard_variables(variables: Any, mesh: Mesh, layout: str = DEFAULT_LAYOUT) -> Any:
    return jax.device_put(variables, state_shardings(variables, mesh, layout))


def indivisible_units(model: AlexNet, devices: int) -> dict[str, int]:
    """The FC layers whose units per tower (fc8: classes per tower) do not split over ``devices``."""
    w = tower_widths(model.towers, model.width, model.num_classes, model.conv_widths, model.fc_widths)
    return {k: w[k] for k in ("fc6", "fc7", "fc8") if w[k] % devices}


def check_layout(model: AlexNet, mesh: Mesh, layout: str = DEFAULT_LAYOUT) -> None:
    """``ConfigError`` (saying what to change) if ``model`` cannot run in ``layout`` on ``mesh``."""
    if layout != "towers" and mesh.shape[TOWER_AXIS] != 1:
        raise ConfigError(
            f"mesh.parallelism={layout!r} puts every device on the '{DATA_AXIS}' axis; "
            f"the mesh has tower={mesh.shape[TOWER_AXIS]}: build it with make_mesh(towers=1) "
            "(--config.mesh.tower=1)."
        )
    units = layout_named(layout).fc_units
    if units is not None:
        bad = indivisible_units(model, mesh.shape[units])
        if bad:
            raise ConfigError(
                f"mesh.parallelism={layout!r} splits every FC layer's units over the "
                f"{mesh.shape[units]} devices of the '{units}' axis; per tower {bad} do not divide "
                "(fc8: num_classes / towers). Use another device count, or another layout."
            )
    if mesh.shape[TOWER_AXIS] not in (model.towers, 1):
        raise ConfigError(
            f"The model has towers={model.towers} but the mesh's '{TOWER_AXIS}' axis has size "
            f"{mesh.shape[TOWER_AXIS]}; build it with make_mesh(towers={model.towers}) (one tower per "
            "device) or make_mesh(towers=1) (all towers on every device)."
        )


def mesh_forward(
    model: AlexNet, mesh: Mesh, *, train: bool = False, features: bool = False, layout: str = DEFAULT_LAYOUT
):
    """``f(variables, images_NHWC, dropout_key) -> logits`` ``(N, num_classes)`` as on one device, in ``layout``.

    Inside, each device holds the layout's block (towers: its tower's classes, as each paper GPU held half
    of fc8). ``features=True``: ``(logits, fc7)``, fc7's activations ``(N, towers * units)`` (the paper's
    Figure 4 features). The variables must be laid out as ``state_shardings`` says.
    """
    model = model.clone(ops=tower_ops.for_devices(model.ops, mesh.devices.flat))  # 'auto': by these devices
    axes = layout_named(layout)
    if axes.tower is not None and mesh.shape[axes.tower] != model.towers:  # every tower on each device
        axes = dataclasses.replace(axes, tower=None)
    towers_here = 1 if axes.tower else model.towers
    # (N, towers, per tower), split as the layout says. The tower axis is named even where the
    # layout does not split it (it has size 1 there): the towers' vmapped axis shares its name.
    out_spec = P(axes.fc_batch, TOWER_AXIS, axes.fc_units)

    def per_device(variables, images_nHWC, key):
        rngs = {"dropout": key} if key is not None else {}
        logits, state = model.apply(
            variables, images_nHWC, train, axes, rngs=rngs, mutable=["intermediates"] if features else []
        )
        logits_nTK = logits.reshape(logits.shape[0], towers_here, -1)
        if not features:
            return logits_nTK
        fc7_TnF = state["intermediates"]["towers"]["fc7_act"][0]  # T: the towers this device runs
        return logits_nTK, jnp.moveaxis(fc7_TnF, 0, 1)

    def f(variables, images_NHWC, key):
        sharded = jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(param_specs(variables, layout), BATCH_SPEC, P()),
            out_specs=(out_spec, out_spec) if features else out_spec,
        )
        # (N, towers, per tower) -> (N, towers * per tower): class tower * per_tower + j, as on one device.
        out = sharded(variables, images_NHWC, key)
        return tuple(o.reshape(o.shape[0], -1) for o in out) if features else out.reshape(out.shape[0], -1)

    return f


def apply_on_mesh(
    model: AlexNet,
    variables: Any,
    images_NHWC: jax.Array,
    mesh: Mesh,
    *,
    train: bool = False,
    rngs: dict[str, jax.Array] | None = None,
    layout: str = DEFAULT_LAYOUT,
) -> jax.Array:
    """``model.apply`` on a mesh: same parameters, same logits, one tower per device.

    ``variables`` may live anywhere (they are placed on the mesh first); the batch must divide by ``data``.
    """
    check_layout(model, mesh, layout)
    n = images_NHWC.shape[0]
    if n % mesh.shape[DATA_AXIS]:
        raise ValueError(f"Batch size {n} does not divide over the mesh's data axis ({mesh.shape[DATA_AXIS]}).")
    key = None
    if train and model.dropout > 0:
        if not rngs or "dropout" not in rngs:
            raise ValueError("Training with dropout needs rngs={'dropout': key}.")
        key = rngs["dropout"]
    f = jax.jit(mesh_forward(model, mesh, train=train, layout=layout))
    return f(shard_variables(variables, mesh, layout), jax.device_put(images_NHWC, batch_sharding(mesh)), key)


def mesh_for_config(towers: int, mesh_cfg) -> tuple[Mesh, str | None]:
    """The mesh a (checked, ``config_check``) ``mesh`` section asks for, and a line to print when the default changed.

    ``mesh.tower=-1``: one tower per device, or, when the towers do not divide the device count (one GPU),
    all towers on every device (``mesh.tower=1``, the same results). Data and hybrid: every device on data.
    """
    tower_axis, note = mesh_cfg.tower, None
    if mesh_cfg.get("parallelism", DEFAULT_LAYOUT) != "towers":
        tower_axis = 1
    if tower_axis == -1:
        tower_axis = towers
        n = jax.device_count()
        if n % towers:
            tower_axis = 1
            note = (
                f"{n} {jax.devices()[0].platform} device(s) for {towers} towers: every device runs all "
                f"towers (--config.mesh.tower=1; same results, no exchanges between devices)."
            )
    try:
        return make_mesh(towers=tower_axis, data=None if mesh_cfg.data == -1 else mesh_cfg.data), note
    except ConfigError as e:
        raise ConfigError(
            f"{e} With fewer devices, --config.mesh.tower=1 runs all towers on every device, "
            "and --config.mesh.data=N uses N of them."
        ) from None
