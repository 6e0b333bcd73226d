"""The programs a GPU runs, checked on this CPU: the train and eval steps lowered for CUDA devices.

The meshes are those of a 1-GPU and an 8-GPU machine, built from compile-only H100 devices
(``gpu_compile.devices``; the gpu-compile extra), beside the same meshes of the test process's
virtual CPU devices. What is read from the lowered StableHLO:

* ``model.ops='auto'`` takes the plain convolutions on CUDA devices (grouped, as cuDNN runs them)
  with the fast forms' max-pool gradient, and the fast forms on CPU devices, from the same function;
* no host callback and no custom call;
* in bfloat16, every convolution and matmul is bfloat16 and LRN's window sum is float32;
* the collectives are exactly the CPU program's.
"""

import collections
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("jax_plugins.xla_cuda13", reason="needs the gpu-compile extra: pip install -e '.[gpu-compile]'")
from alexnet_jax import gpu_compile, optim, parallel, steps
from alexnet_jax.model import from_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configs import owt, paper

B = 16  # a global batch that divides over 8 devices; shapes, not speed, matter here


def _config(net="paper", dtype="float32", ops="auto", layout="towers"):
    c = (owt if net == "owt" else paper).get_config()
    c.model.dtype, c.model.ops, c.mesh.parallelism = dtype, ops, layout
    return c


def _mesh(layout, devices, towers, platform):
    tower_axis = towers if (layout == "towers" and devices > 1) else 1
    devs = gpu_compile.devices("h100", devices) if platform == "cuda" else jax.devices()[:devices]
    return parallel.make_mesh(towers=tower_axis, data=devices // tower_axis, devices=devs)


def _stats(size):
    rng = np.random.default_rng(0)
    return {
        "mean_image": rng.uniform(0, 255, (size, size, 3)).astype(np.float32),
        "eigval": np.array([0.2, 0.02, 0.005], np.float32),
        "eigvec": np.eye(3, dtype=np.float32),
    }


def lowered_steps(config, devices, platform):
    """(train step, eval step) as StableHLO text, lowered for ``platform`` with training's own inputs
    (uint8 crops with crop offsets, flips and lighting draws; whole images for the ten views)."""
    model = from_config(config.model)
    layout = config.mesh.parallelism
    mesh = _mesh(layout, devices, model.towers, platform)
    tx = optim.make_optimizer(config.optim)
    abstract = jax.eval_shape(lambda: steps.create_train_state(model, tx, 0, mesh, layout)[0])
    shardings = parallel.state_shardings(abstract, mesh, layout)
    state = steps.abstract_state(abstract, shardings)
    inputs = steps.make_input_fn(config.data, _stats(config.data.resize_size))
    S, R = config.data.crop_size, config.data.resize_size
    sds = jax.ShapeDtypeStruct
    train_batch = {
        "image": sds((B, S, S, 3), jnp.uint8),
        "label": sds((B,), jnp.int32),
        "mask": sds((B,), jnp.bool_),
        "crop_yx": sds((B, 2), jnp.int32),
        "flip": sds((B,), jnp.bool_),
        "alpha": sds((B, 3), jnp.float32),
    }
    eval_batch = {"image": sds((B, R, R, 3), jnp.uint8), "label": sds((B,), jnp.int32), "mask": sds((B,), jnp.bool_)}
    train = steps.make_train_step(model, tx, mesh, shardings, inputs, layout)
    evaluate = steps.make_eval_step(model, mesh, shardings.params, inputs, layout)
    return tuple(
        fn.trace(*args).lower().as_text(debug_info=False)
        for fn, args in ((train, (state, train_batch)), (evaluate, (state.params, eval_batch)))
    )


_TYPES = re.compile(r"\) : \((?P<ins>.*)\) -> (?P<outs>.*)$")


def ops_named(text, name):
    """[(the op's first line, its operand types, its result types)] for every ``stablehlo.<name>``.

    An op with a region (reduce_window, all_reduce, ...) prints its types on the line
    that closes the region, at the op's own indentation.
    """
    lines = text.splitlines()
    found = []
    for i, line in enumerate(lines):
        if not re.search(rf'= "?stablehlo\.{name}\b', line):
            continue
        end = i
        if line.rstrip().endswith("({"):
            indent = len(line) - len(line.lstrip())
            end = next(
                j
                for j in range(i + 1, len(lines))
                if lines[j].startswith(" " * indent + "})") and _TYPES.search(lines[j])
            )
        m = _TYPES.search(lines[end]) or re.search(r": \((?P<ins>.*)\) -> (?P<outs>.*)$", lines[end])
        assert m, f"types of {name} not found: {lines[end][:300]}"
        found.append(
            (line.strip(), re.findall(r"tensor<([^>]*)>", m["ins"]), re.findall(r"tensor<([^>]*)>", m["outs"]))
        )
    return found


def element_types(types):
    return {t.rsplit("x", 1)[-1] for t in types}


COLLECTIVES = ("all_gather", "all_reduce", "reduce_scatter", "all_to_all", "collective_permute", "collective_broadcast")


def collectives(text):
    """Every collective between devices: (kind, its attributes less the channel number, operand
    types, result types). Those over groups of one device (a mesh axis of size 1) are left out:
    they move nothing, XLA drops them, and how many there are depends on the op forms."""
    out = []
    for kind in COLLECTIVES:
        for first, ins, outs in ops_named(text, kind):
            if re.search(r"replica_groups = dense<\[?\[?\d+\]?\]?> : tensor<\d+x1xi64>", first):
                continue
            attrs = re.sub(r"channel_handle = [^>]*>, ", "", first.split("<{", 1)[-1].split("}>", 1)[0])
            out.append((kind, attrs, tuple(ins), tuple(outs)))
    return out


def same_collectives(a, b):
    """The same exchanges of activations, op for op; the same gradient all-reduces, as elements of
    each type over each device group (the fast forms reduce each tower's kernel on its own, the
    plain forms the towers' stacked kernels: the same numbers, in other shapes)."""

    def elements(types):
        return sum(int(np.prod([int(d) for d in t.split("x")[:-1]])) for t in types)

    def key(ops):
        exact = collections.Counter(op for op in ops if op[0] != "all_reduce")
        totals = collections.Counter()
        for kind, attrs, ins, _ in ops:
            if kind == "all_reduce":
                totals[attrs, tuple(sorted(element_types(ins)))] += elements(ins)
        return exact, totals

    return key(a) == key(b)


def convolution_groups(text):
    return [int(g) for g in re.findall(r"(?:feature|batch)_group_count = (\d+)", text)]


def test_ops_auto_takes_the_plain_forms_for_cuda_and_the_fast_forms_for_cpu():
    """The same step: on CUDA devices it has the grouped convolutions that cuDNN runs natively and
    the strided max-pool gradient (XLA:GPU's select-and-scatter moves more bytes); on CPU devices,
    the dense per-tower convolutions too. 'fast' and 'plain' are what they say on every platform."""
    forms = {}
    for ops in ("auto", "fast", "plain"):
        for platform in ("cuda", "cpu"):
            train, _ = lowered_steps(_config(ops=ops), 1, platform)
            forms[ops, platform] = (
                len(ops_named(train, "convolution")),
                len(ops_named(train, "select_and_scatter")),
                max(convolution_groups(train)),
            )
    assert forms["plain", "cuda"] == forms["plain", "cpu"] == (14, 3, 2)  # 5 forward + 9 backward; 3 pools
    assert forms["fast", "cuda"] == forms["fast", "cpu"] == (23, 0, 1)  # per tower: dense convolutions only
    assert forms["auto", "cuda"] == (14, 0, 2)  # the plain convolutions; max-pool's gradient as the fast forms do
    assert forms["auto", "cpu"] == forms["fast", "cpu"]


def test_ops_auto_compiles_on_cpu_to_the_fast_program():
    """The choice by device leaves nothing behind in the CPU program XLA runs: it is the fast program."""
    import alexnet_jax

    def compiled(ops):
        model = alexnet_jax.AlexNet(ops=ops, width=0.125, image_size=64, num_classes=10)
        mesh = parallel.make_mesh(towers=1, data=1)
        tx = optim.make_optimizer(paper.get_config().optim)
        abstract = jax.eval_shape(lambda: steps.create_train_state(model, tx, 0, mesh)[0])
        shardings = parallel.state_shardings(abstract, mesh)
        batch = {
            "image": jax.ShapeDtypeStruct((8, 64, 64, 3), jnp.float32),
            "label": jax.ShapeDtypeStruct((8,), jnp.int32),
            "mask": jax.ShapeDtypeStruct((8,), jnp.bool_),
        }
        c = (
            steps.make_train_step(model, tx, mesh, shardings)
            .lower(steps.abstract_state(abstract, shardings), batch)
            .compile()
        )
        text = c.as_text()
        return text.count(" conditional("), text.count(" convolution("), c.memory_analysis().temp_size_in_bytes

    auto, fast = compiled("auto"), compiled("fast")
    assert auto[0] == fast[0] == 0 and auto == fast


PROGRAMS = [  # (layout, net, devices): the meshes of one GPU and of an 8-GPU machine
    ("towers", "paper", 1),
    ("towers", "paper", 8),  # 8 GPUs: 4 x 2, one tower per GPU
    ("data", "paper", 1),
    ("data", "paper", 8),
    ("hybrid", "paper", 1),
    ("hybrid", "owt", 8),  # the paper net's 500 classes per tower do not split 8 ways
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layout,net,devices", PROGRAMS, ids=[f"{a}-{b}-{c}gpu" for a, b, c in PROGRAMS])
def test_gpu_programs(layout, net, devices, dtype):
    config = _config(net=net, dtype=dtype, layout=layout)
    cuda = lowered_steps(config, devices, "cuda")
    cpu = lowered_steps(config, devices, "cpu") if devices > 1 else ("", "")  # one device: no collectives
    for name, text, text_cpu in zip(("train", "eval"), cuda, cpu):
        assert "custom_call" not in text and "callback" not in text, name  # nothing leaves the device program
        convs = ops_named(text, "convolution")
        dots = [op for op in ops_named(text, "dot_general") if "3x3xf32" not in op[1]]  # not PCA lighting's 3x3
        assert convs and dots, name
        compute = {"float32": "f32", "bfloat16": "bf16"}[dtype]
        for first, ins, outs in convs + dots:
            assert element_types(ins) == element_types(outs) == {compute}, (name, first[:120], ins, outs)
        lrn = [
            op for op in ops_named(text, "reduce_window") if "window_dimensions = array<i64: 1, 1, 1, 1, 5>" in op[0]
        ]
        if config.model.lrn:  # LRN's window over 5 channels, forward (and its gradient), in float32
            # train: forward, its recomputation for the backward pass (rematerialised), and its gradient
            assert len(lrn) == (6 if name == "train" else 2), (name, len(lrn))
            assert all(element_types(ins) == {"f32"} for _, ins, _ in lrn), name
        else:
            assert not lrn
        got, want = collectives(text), collectives(text_cpu)
        assert same_collectives(got, want), (name, got, want)
        assert "stablehlo.case" not in text and "stablehlo.case" not in text_cpu, name  # chosen before lowering
        if devices == 1:
            assert not got, name
        elif name == "train":  # (eval's counts are summed outside shard_map: XLA places that sum)
            assert got, name
