"""What each device layout costs: per layer, parameters, multiply-adds and the bytes devices exchange.

    python -m alexnet_jax.costs --config=configs/paper.py --devices=8 [--config.mesh.parallelism=hybrid] [--json OUT]
    python -m alexnet_jax.costs --compile_for=h100 [--devices=1] [--batch=128] [--dtype=bfloat16] [--dump_hlo=DIR]

For one training step of ``batch_size`` images on ``--devices`` devices in the
config's layout (``mesh.parallelism``: ``towers``, ``data`` or ``hybrid``), each
layer's row gives

* ``params`` and ``macs_per_image`` (multiply-adds of the forward pass, every weight
  once per output position);
* ``exchange_bytes_forward`` / ``_backward``: activations exchanged at the layer's
  input (the towers' exchanges at conv3 and fc6-fc8; the hybrid layout's batch
  gather before fc6 and unit gathers before fc7 and fc8; the LRN halo of
  ``lrn_scope='layer'`` at conv1/conv2), and their gradients on the way back;
* ``gradient_bytes_per_step``: the all-reduce of the layer's parameter gradients
  over the devices that hold the same parameters, in the compute dtype (with ``model.dtype=bfloat16``
  the gradients are summed in bfloat16, then applied to the float32 parameters).

Bytes are what each device sends per step with ring algorithms (as NCCL's bus
bandwidth counts them): an all-gather whose result is R bytes over a group of G
devices sends R (G-1)/G; a reduce-scatter of an R-byte operand the same; an
all-reduce of R bytes 2 R (G-1)/G. Collectives the compiler adds outside the
network (the loss's and the metrics' scalars; with fc8's classes split between
towers or devices, the per-example class scores) are left out: they carry at
most batch x classes values. The numbers are worked out from the layer shapes
and the layout here; ``tests/test_costs.py`` reads the same from the compiled
training program's collectives.
"""

from __future__ import annotations

import json
import os
import sys
from fractions import Fraction

from alexnet_jax import cli, paths
from alexnet_jax.errors import CompileForError, ConfigError
from alexnet_jax.model import LAYERS, AlexNet, from_config
from alexnet_jax.parallel import LAYOUTS, indivisible_units, layout_named, mesh_shape

_PROG = cli.program("costs")
_DEFAULT_CONFIG = "configs/paper.py"


def _gather(result: int, group: int) -> Fraction:
    return Fraction(result * (group - 1), group)


def layer_costs(model: AlexNet, layout: str, devices: int, batch: int) -> dict:
    """The per-layer table (exact byte counts as ``Fraction``) and the mesh it assumes."""
    from alexnet_jax.summary import layer_rows

    axes = layout_named(layout)
    data, tower = mesh_shape(model, layout, devices)
    if batch % data:
        raise ValueError(f"batch_size={batch} does not divide over the mesh's data axis ({data}).")
    rows = {r["layer"]: r for r in layer_rows(model)}
    T, b = model.towers, batch // data
    split = axes.tower is not None and tower == T and T > 1  # one tower per device: the exchanges cross devices
    regroup = {"fc6"} if axes.fc_batch != axes.conv_batch else set()  # batch_to_fc6: every device's examples
    if axes.fc_units is not None:
        regroup |= {"fc7", "fc8"}  # units_to_<layer>: every device's units
    act = 2 if model.dtype == "bfloat16" else 4  # bytes of an exchanged activation (compute dtype)
    inputs = {  # whole-net features of one example at each exchange's layer
        "conv3": rows["conv2"]["after_pool"],
        "fc6": rows["conv5"]["after_pool"],
        "fc7": rows["fc6"]["per_tower"],
        "fc8": rows["fc7"]["per_tower"],
    }
    size = {k: T * _prod(v) for k, v in inputs.items()}
    out = []
    for name in LAYERS:
        exchange = Fraction(0)
        if split and name in size:  # all-gather over 'tower' of b examples
            exchange = _gather(b * size[name] * act, T)
        if split and model.lrn and model.lrn_scope == "layer" and name in ("conv1", "conv2"):
            h, w, _ = rows[name]["per_tower"]  # 2 * (n // 2) edge channels of every tower, float32
            exchange = _gather(T * b * h * w * 4 * 4, T)
        if name in regroup:  # the whole batch, over all devices
            exchange = _gather(batch * size[name] * act, devices)
        if name.startswith("fc") and axes.fc_units is not None and axes.fc_batch is None:
            grad = Fraction(0)  # each device's units are its own, for the whole batch
        else:  # replicated over 'data': each device holds one tower (split) or all
            held = rows[name]["params"] // (T if split else 1)
            grad = Fraction(2 * held * act * (data - 1), data)  # summed in the compute dtype, as JAX's psum does
        out.append(
            {
                "name": name,
                "params": rows[name]["params"],
                "macs_per_image": rows[name]["macs"],
                "exchange_bytes_forward": exchange,
                "exchange_bytes_backward": exchange,
                "exchange_bytes_per_step": 2 * exchange,
                "gradient_bytes_per_step": grad,
            }
        )
    return {
        "layout": layout,
        "devices": devices,
        "mesh": {"data": data, "tower": tower},
        "batch_size": batch,
        "layers": out,
    }


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def rounded(costs: dict) -> dict:
    """JSON-ready: byte counts rounded to whole bytes; totals added."""
    keys = (
        "params",
        "macs_per_image",
        "exchange_bytes_forward",
        "exchange_bytes_backward",
        "exchange_bytes_per_step",
        "gradient_bytes_per_step",
    )
    layers = [{k: (round(v) if isinstance(v, Fraction) else v) for k, v in row.items()} for row in costs["layers"]]
    total = {k: sum(row[k] for row in layers) for k in keys}
    return {**costs, "layers": layers, "total": total}


def table(costs: dict):
    from rich.table import Table

    c = rounded(costs)
    mb = lambda v: f"{v / 1e6:,.2f}" if v else "-"
    t = Table(
        title=f"{c['layout']} layout on {c['devices']} devices (mesh data={c['mesh']['data']} x "
        f"tower={c['mesh']['tower']}), batch {c['batch_size']}: MB each device sends per step"
    )
    for col in ("layer", "parameters", "MACs/image", "exchange fwd", "exchange bwd", "gradient all-reduce"):
        t.add_column(col, justify="right")
    for r in c["layers"] + [{"name": "total", **c["total"]}]:
        t.add_row(
            r["name"],
            f"{r['params']:,}",
            f"{r['macs_per_image'] / 1e6:,.1f}M",
            mb(r["exchange_bytes_forward"]),
            mb(r["exchange_bytes_backward"]),
            mb(r["gradient_bytes_per_step"]),
            style="bold" if r["name"] == "total" else None,
        )
    return t


def main(argv: list[str] | None = None) -> None:
    """``python -m alexnet_jax.costs ARGS`` (and ``alexnet-costs``); ``argv`` defaults to ``sys.argv[1:]``."""
    argv = [_PROG, *(sys.argv[1:] if argv is None else argv)]
    sys.path.insert(0, os.getcwd())  # config files import configs.paper, as under python -m
    cli.run_main(_PROG, lambda: _main(argv))


def _main(argv: list[str]) -> None:
    from absl import flags
    from rich.console import Console

    fv = flags.FlagValues()
    devices = flags.DEFINE_integer("devices", 2, "How many devices (the paper: 2 GPUs).", flag_values=fv)
    out = paths.DEFINE_path("json", None, "Also write the table to this JSON file.", flag_values=fv)
    from alexnet_jax.gpu_compile import GPUS

    target = flags.DEFINE_enum(
        "compile_for",
        None,
        list(GPUS),
        "Compile the train and eval steps for this GPU "
        "(no GPU needed; the gpu-compile extra) and report memory, kernels and traffic.",
        flag_values=fv,
    )
    batch = flags.DEFINE_integer("batch", None, "Global batch (default: the config's batch_size).", flag_values=fv)
    dtype = flags.DEFINE_enum(
        "dtype", None, ["float32", "bfloat16"], "Compute dtype (default: the config's model.dtype).", flag_values=fv
    )
    dump_hlo = paths.DEFINE_path(
        "dump_hlo", None, "With --compile_for: write the optimised HLO text here.", flag_values=fv
    )
    config = cli.parse_with_config(
        _PROG,
        fv,
        argv,
        _DEFAULT_CONFIG,
        "\n\n".join(__doc__.split("\n\n")[:2]),
        "--config.FIELD=VALUE: any field of the --config file, e.g. --config.mesh.parallelism=hybrid, "
        "--config.batch_size=256.",
    )
    model_config, layout, batch_size = config.model, config.mesh.get("parallelism", "towers"), config.batch_size
    if layout not in LAYOUTS:
        cli.usage_error(_PROG, f"mesh.parallelism={layout!r}: choose one of {', '.join(LAYOUTS)}")
    if devices.value < 1:
        cli.usage_error(_PROG, f"--devices={devices.value} must be at least 1")
    try:
        model = from_config(model_config)
    except ConfigError as e:  # e.g. --config.model.towers=0
        cli.usage_error(_PROG, str(e))
    if batch.value is not None:
        batch_size = batch.value
    if target.value is not None:
        if dtype.value is not None:
            config.model.dtype = dtype.value
        _compiled(config, target.value, devices.value, batch_size, out.value, dump_hlo.value)
        return
    try:
        costs = layer_costs(model, layout, devices.value, batch_size)
        if layout == "hybrid":  # the layout's own requirement, checked as the run would
            bad = indivisible_units(model, devices.value)
            if bad:
                raise ValueError(
                    f"the hybrid layout splits every FC layer's units over the {devices.value} devices; "
                    f"per tower {bad} do not divide"
                )
    except ValueError as e:
        sys.exit(f"{_PROG}: {e}")
    Console(soft_wrap=True).print(table(costs))
    if out.value:
        try:
            with open(out.value, "w") as f:
                json.dump(rounded(costs), f, indent=1)
                f.write("\n")
        except OSError as e:
            sys.exit(f"{_PROG}: cannot write --json={out.value}: {e} (the table is printed above)")


def _compiled(config, target: str, count: int, batch: int, json_path: str | None, hlo_dir: str | None) -> None:
    """``--compile_for``: compile both steps for ``target`` and print what one device runs."""
    import time

    import jax

    jax.config.update("jax_platforms", "cpu")  # compile-only CUDA devices need JAX itself on the CPU
    from rich.console import Console

    from alexnet_jax import gpu_compile as G

    model = from_config(config.model)
    layout = config.mesh.get("parallelism", "towers")
    try:
        flops = 6 * sum(r["macs_per_image"] for r in layer_costs(model, layout, count, batch)["layers"])
        data, _ = mesh_shape(model, layout, count)
        start = time.perf_counter()
        compiled = G.compile_steps(config, G.devices(target, count), batch)
        seconds = time.perf_counter() - start
    except (CompileForError, ValueError, ConfigError) as e:
        sys.exit(f"{_PROG}: {e}")
    gpu = G.GPUS[target]
    result = {
        "target": target,
        "device": gpu.name,
        "devices": count,
        "layout": layout,
        "dtype": model.dtype,
        "batch": batch,
        "images_per_device": batch // data,
        "compile_seconds": round(seconds, 1),
        **G.analyse(compiled["train"], batch, count, gpu, flops, model.dtype),
        "eval": G.analyse(compiled["eval"], batch, count, gpu, None, model.dtype),
        "autotuned": False,
    }
    Console(soft_wrap=True).print(compiled_table(result))
    if hlo_dir:
        for path in G.dump(compiled, hlo_dir):
            print(f"wrote {path}")
    if json_path:
        try:
            with open(json_path, "w") as f:
                json.dump(result, f, indent=1)
                f.write("\n")
        except OSError as e:
            sys.exit(f"{_PROG}: cannot write --json={json_path}: {e} (the table is printed above)")


def compiled_table(r: dict):
    """The ``--compile_for`` report: one device's train step (and eval step's memory)."""
    from rich.console import Group
    from rich.table import Table

    gb = lambda v: f"{v / 1e9:,.2f} GB"
    t = Table(
        title=f"Compiled for {r['devices']} x {r['device']} ({r['layout']} layout, {r['dtype']}, batch "
        f"{r['batch']}, {r['images_per_device']} images per device): per device, without autotuning",
        show_header=False,
    )
    t.add_column(justify="left")
    t.add_column(justify="right")
    fits = "fits" if r["fits"] else "does NOT fit"
    t.add_row(
        "peak memory, train step",
        f"{gb(r['peak_bytes_per_device'])} ({fits} in JAX's 75% of {gb(r['device_memory_bytes'])})",
    )
    t.add_row("  arguments / temporaries", f"{gb(r['argument_bytes'])} / {gb(r['temp_bytes'])}")
    t.add_row("peak memory, eval step", gb(r["eval"]["peak_bytes_per_device"]))
    t.add_row(
        "device ops: fusions / cuDNN convolutions / GEMMs",
        f"{r['device_ops']}: {r['fusions']} / {r['cudnn_convolutions']} / {r['gemms']}",
    )
    for kind, c in sorted(r["collectives"].items()):
        t.add_row(f"  {kind}", f"{c['count']} x, {c['bytes'] / 1e6:,.1f} MB ({c['sent_bytes'] / 1e6:,.1f} MB sent)")
    if not r["collectives"]:
        t.add_row("  collectives", "none")
    t.add_row("HBM traffic per step (one device)", gb(r["hbm_bytes_per_step"]))
    t.add_row("HBM traffic per image (all devices)", f"{r['hbm_bytes_per_image'] / 1e6:,.1f} MB")
    roof = r["roofline_images_per_s"]
    t.add_row("roofline images/s, all devices: memory / compute", f"{roof['memory']:,.0f} / {roof['compute']:,.0f}")
    t.add_row("compile time", f"{r['compile_seconds']} s")
    top = Table(title="The ten ops with the most HBM traffic (one device, one step)")
    for col, justify in (("MB", "right"), ("op", "left"), ("from", "left")):
        top.add_column(col, justify=justify)
    for op in r["top_ops"]:
        top.add_row(f"{op['bytes'] / 1e6:,.1f}", op["op"], op["what"][-90:] or op["name"])
    return Group(t, top)


if __name__ == "__main__":
    main()
