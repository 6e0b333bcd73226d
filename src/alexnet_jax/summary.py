"""A printable account of the network: per-layer shapes, neurons and parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from rich.table import Table

from alexnet_jax.model import LAYERS, AlexNet, layer_param_counts

_AFTER = {
    "conv1": "conv1_pooled",
    "conv2": "conv2_pooled",
    "conv5": "conv5_pooled",
}


def layer_rows(model: AlexNet) -> list[dict]:
    """Shapes from an abstract run (no FLOPs, no memory): one dict per layer."""
    x = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)

    def run(v, x):
        return model.apply(v, x, capture_intermediates=True, mutable=["intermediates"])

    _, state = jax.eval_shape(run, variables, x)
    inter = state["intermediates"]["towers"]
    params = layer_param_counts(variables)
    rows = []
    for name in LAYERS:
        out = inter[name]["__call__"][0].shape  # (towers, 1, ...)
        after = inter[_AFTER[name]][0].shape if name in _AFTER else None
        neurons = int(np.prod(out[:1] + out[2:]))
        channels = out[0] * out[-1]  # output channels (units), all towers
        rows.append(
            {
                "layer": name,
                "per_tower": tuple(out[2:]),
                "neurons": neurons,
                "after_pool": tuple(after[2:]) if after else None,
                "params": params[name],
                # every weight is used once per output position: positions x weights
                "macs": (neurons // channels) * (params[name] - channels),
            }
        )
    return rows


def flops_per_image(model: AlexNet, train: bool = True) -> int:
    """Model FLOPs of one image: 2 per multiply-add in the conv and FC layers; training
    counts 3x the forward pass (forward, input gradients, weight gradients), the usual
    convention. ReLU, LRN, pooling and the update add well under 1% and are left out."""
    forward = 2 * sum(r["macs"] for r in layer_rows(model))
    return 3 * forward if train else forward


def summary_table(model: AlexNet) -> Table:
    rows = layer_rows(model)
    table = Table(title=f"AlexNet: towers={model.towers}, input {model.image_size}x{model.image_size}x3")
    for col in ("layer", "output per tower", "neurons (all towers)", "after pool", "parameters"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["layer"],
            "x".join(map(str, r["per_tower"])),
            f"{r['neurons']:,}",
            "x".join(map(str, r["after_pool"])) if r["after_pool"] else "",
            f"{r['params']:,}",
        )
    table.add_row("total", "", "", "", f"{sum(r['params'] for r in rows):,}", style="bold")
    return table
