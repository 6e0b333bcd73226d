"""python -m alexnet_jax.costs: the per-layer bytes it works out from shapes equal those read from the
compiled training program's collectives, in every layout; and the command line as a user types it."""

import collections
import json
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pytest
from _hlo import hlo_collectives_typed

from alexnet_jax import AlexNet, make_mesh
from alexnet_jax.costs import layer_costs, mesh_shape, rounded
from alexnet_jax.model import LAYERS
from alexnet_jax.parallel import batch_sharding, mesh_forward, state_shardings

ROOT = Path(__file__).resolve().parents[1]
BATCH = 8
NARROW = dict(width=0.125, image_size=96, num_classes=16, init_std=0.03)
OWT = dict(NARROW, towers=1, conv_widths=(64, 192, 384, 256, 256), lrn=False, conv1_pad=2)
CASES = {  # name: (model fields, layout, devices)
    "towers-2": (NARROW, "towers", 2),
    "towers-4": (NARROW, "towers", 4),  # 2 data shards x 2 towers
    "towers-4x4": (dict(NARROW, towers=4), "towers", 8),  # 4 towers, 2 data shards
    "caffe-lrn-towers-2": (dict(NARROW, lrn_scope="layer", lrn_convention="alpha_over_n", lrn_k=1.0), "towers", 2),
    "data-4": (NARROW, "data", 4),
    "hybrid-4": (NARROW, "hybrid", 4),
    "hybrid-owt-8": (OWT, "hybrid", 8),
}


def compiled_collectives(model, layout, devices):
    """The collectives of the compiled gradient step (forward and backward) on the layout's mesh."""
    data, tower = mesh_shape(model, layout, devices)
    mesh = make_mesh(towers=tower, data=data, devices=jax.devices()[:devices])
    s = model.image_size
    x = jax.ShapeDtypeStruct((BATCH, s, s, 3), jnp.float32)
    v = jax.eval_shape(model.init, jax.random.key(0), x)
    forward = mesh_forward(model, mesh, train=True, layout=layout)

    def loss(v, x, y, key):
        return optax.softmax_cross_entropy_with_integer_labels(forward(v, x, key), y).mean()

    step = jax.jit(
        jax.grad(loss),
        in_shardings=(state_shardings(v, mesh, layout), batch_sharding(mesh), batch_sharding(mesh), None),
    )
    text = step.lower(v, x, jax.ShapeDtypeStruct((BATCH,), jnp.int32), jax.random.key(0)).compile().as_text()
    return hlo_collectives_typed(text, mesh.size)


def from_hlo(ops, num_classes):
    """{layer: {forward, backward, gradient}} bytes each device sends, by the ring formulas, from the
    program's own collectives: shapes, element sizes and group sizes as compiled."""
    got = collections.defaultdict(lambda: collections.Counter())
    for op, groups, parts, names in ops:
        (G,) = {len(g) for g in groups}
        if G == 1:  # over the size-1 'tower' axis of a data or hybrid mesh (its name is the towers' vmap
            continue  # axis's too): groups of one device, nothing moves
        for (itemsize, shape), name in zip(parts, names):
            nbytes = itemsize * math.prod(shape)
            if "shard_map" not in name:  # the compiler's, outside the network: loss and metrics values only
                assert nbytes <= BATCH * num_classes * 4, (op, name, shape)
                continue
            scope = name.split("/")[-2]  # exchange_to_fc7, units_to_fc8, batch_to_fc6, lrn_halo_conv1, conv3 ...
            layer = scope.rsplit("_", 1)[-1] if "_" in scope else scope
            assert layer in LAYERS, name
            if op == "all-gather":
                got[layer]["forward"] += Fraction(nbytes * (G - 1), G)
            elif op == "reduce-scatter":  # its result is the scattered piece: the operand is G times it
                got[layer]["backward"] += Fraction(nbytes * G * (G - 1), G)
            else:  # a parameter's gradient (<layer>/psum_invariant)
                assert op == "all-reduce" and scope in LAYERS, (op, name)
                got[layer]["gradient"] += Fraction(2 * nbytes * (G - 1), G)
    return {layer: {k: round(v) for k, v in got[layer].items()} for layer in LAYERS}


DEFAULT_CASES = ("towers-2", "data-4", "hybrid-4")  # one of each layout; the rest in the slow set


@pytest.mark.parametrize("case", [c if c in DEFAULT_CASES else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_costs_equal_the_compiled_programs_collectives(case):
    kwargs, layout, devices = CASES[case]
    model = AlexNet(**kwargs)
    table = {r["name"]: r for r in rounded(layer_costs(model, layout, devices, BATCH))["layers"]}
    hlo = from_hlo(compiled_collectives(model, layout, devices), model.num_classes)
    want = {
        layer: {
            k: v
            for k, v in (
                ("forward", r["exchange_bytes_forward"]),
                ("backward", r["exchange_bytes_backward"]),
                ("gradient", r["gradient_bytes_per_step"]),
            )
            if v
        }
        for layer, r in table.items()
    }
    assert {layer: {k: v for k, v in d.items() if v} for layer, d in hlo.items()} == want
    assert any(d for d in want.values()), "a case with no communication compares nothing"


def test_the_layouts_differ_as_the_owt_paper_says():
    """The paper net, batch 128 on 8 devices: data parallelism all-reduces every gradient (the FC
    layers' ~94% of them); the hybrid layout reduces only the conv layers' and exchanges
    activations instead, well under a tenth of the bytes; the towers layout sits between."""
    totals = {}
    for layout in ("data", "towers", "hybrid"):
        model = AlexNet(towers=1) if layout == "hybrid" else AlexNet()  # hybrid: 1000 classes over 8 devices
        c = rounded(layer_costs(model, layout, 8, 128))["total"]
        totals[layout] = c["exchange_bytes_per_step"] + c["gradient_bytes_per_step"]
    assert totals["hybrid"] < totals["data"] / 10 and totals["hybrid"] < totals["towers"] < totals["data"]
    # By hand: data layout, 8 devices: 2 * 7/8 of the 60,965,224 float32 gradients.
    assert rounded(layer_costs(AlexNet(), "data", 8, 128))["total"]["gradient_bytes_per_step"] == round(
        Fraction(2 * 7 * 60_965_224 * 4, 8)
    )


def test_command_line_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "costs.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "alexnet_jax.costs",
            "--config=configs/paper.py",
            "--devices=4",
            "--config.mesh.parallelism=hybrid",
            f"--json={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "hybrid layout on 4 devices" in r.stdout and "fc6" in r.stdout
    saved = json.loads(out.read_text())
    assert [row["name"] for row in saved["layers"]] == list(LAYERS)
    assert set(saved["layers"][0]) >= {
        "name",
        "params",
        "macs_per_image",
        "exchange_bytes_per_step",
        "gradient_bytes_per_step",
    }
    assert saved["total"]["params"] == 60_965_224
    fc6 = saved["layers"][5]  # batch 128 gathered, 9216 features, float32, 3/4 sent; and back
    assert fc6["exchange_bytes_per_step"] == 2 * 128 * 9216 * 4 * 3 // 4 and fc6["gradient_bytes_per_step"] == 0
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "alexnet_jax.costs",
            "--config=configs/paper.py",
            "--devices=8",
            "--config.mesh.parallelism=hybrid",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1 and "{'fc8': 500} do not divide" in bad.stderr and "Traceback" not in bad.stderr


def test_the_docs_layout_table_is_what_the_command_computes():
    """Every row of docs/parallelism.md's layout table, recomputed from the costs for that net and layout."""
    import re

    from alexnet_jax.model import from_config

    sys.path.insert(0, str(ROOT))
    from configs import owt, paper

    rows = re.findall(
        r"^\| (paper|OWT) \| (\w+) \| (\d) \| (\d) × (\d) "
        r"\| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| (\d+)% \|$",
        (ROOT / "docs" / "parallelism.md").read_text(),
        re.M,
    )
    assert len(rows) == 10
    for net, layout, n, data, tower, ex, grad, total, fc in rows:
        model = from_config((paper if net == "paper" else owt).get_config().model)
        c = rounded(layer_costs(model, layout, int(n), 128))
        t = c["total"]
        fc_bytes = sum(
            r["exchange_bytes_per_step"] + r["gradient_bytes_per_step"]
            for r in c["layers"]
            if r["name"].startswith("fc")
        )
        all_bytes = t["exchange_bytes_per_step"] + t["gradient_bytes_per_step"]
        assert (c["mesh"]["data"], c["mesh"]["tower"]) == (int(data), int(tower))
        assert [
            f"{t['exchange_bytes_per_step'] / 1e6:.1f}",
            f"{t['gradient_bytes_per_step'] / 1e6:.1f}",
            f"{all_bytes / 1e6:.1f}",
            f"{100 * fc_bytes / all_bytes:.0f}",
        ] == [ex, grad, total, fc], (net, layout, n)
