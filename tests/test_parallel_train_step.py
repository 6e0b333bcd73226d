"""The jitted train step on the ('data', 'tower') mesh: which collectives it runs, over which
axis, and that every layout trains to the same parameters.

The net is the demo config's at width 0.125 (64x64 inputs, 10 classes, dropout 0.5), the
step is ``steps.make_train_step`` itself, and the batch is 8 images.

Collective inventory of one train step on the 2x2 mesh
------------------------------------------------------
The mesh is ``[[0, 1], [2, 3]]`` (rows: 'data', columns: 'tower'), so the replica groups
of a collective over 'tower' are ``{0, 1}, {2, 3}`` (the two towers of one data shard) and
those over 'data' are ``{0, 2}, {1, 3}`` (the same tower on the two data shards). Each data
shard holds b = 8 / 2 = 4 images.

Inside the network (``shard_map``; the lowered StableHLO holds exactly these 24, and
nothing else):

* 4 ``all_gather`` over 'tower', the paper's four exchanges (``exchange_to_<layer>``):
  conv3's input (1,b,3,3,16)->(1,b,3,3,32), fc6's (1,b,1,1,16)->(1,b,1,1,32), fc7's and
  fc8's (1,b,256)->(1,b,512). (Leading 1: this device's tower; 16/256: one tower's
  conv2/conv5/fc6/fc7 width at 0.125.)
* 4 ``reduce_scatter`` over 'tower', their transposes in the backward pass: the gradient
  of a gathered activation is summed over the towers that used it and each tower keeps
  the slice of its own channels, (1,b,...,2C)->(1,b,...,C), in reverse order (fc8 first).
* 16 ``all_reduce`` over 'data', one per parameter leaf (kernel and bias of conv1-5 and
  fc6-8, named ``<layer>/psum_invariant``): each tower's parameters are replicated over
  'data', so autodiff sums their gradients over the data shards. No gradient is reduced
  over 'tower': each tower's parameters are its own.

Outside the network, the compiler partitions the rest of the step (softmax cross-entropy,
the optimizer, the metrics) from the shardings, so the compiled HLO has more. Measured
(jax 0.10, XLA:CPU), with the 16 gradient all-reduces merged by XLA into one tuple:

* over 'tower', the 4 all-gathers and 4 reduce-scatters of the exchanges, and 6 more that
  carry per-example values or scalars only: fc8 is split between the towers (each holds 5
  of the 10 class scores), so the softmax's max and sum over classes (2 all-reduces, (b,)),
  the true class's score (all-reduce, (b, 1)) and the argmax for the top-1 error
  (2 all-gathers of value and index, (b, 2)) take values from both towers; the gradient
  norm metric sums 16 per-tower scalars (one tuple all-reduce). None of them carries an
  activation or a parameter-sized tensor.
* over 'data', 3 all-reduces: the 16 gradients (one tower's size each) with 3 scalars in
  one tuple, and 2 more scalars (the sums behind the loss, the top-1 error and the count of
  non-finite inputs).

Anything else, an extra exchange, a gradient reduced over 'tower' too, a collective over
all four devices, fails the tests below. The tests read each collective's replica groups
from the program and map them to a mesh axis, rather than only counting collectives. The
exchanges, their transposes and the gradient reductions are pinned one by one; the
partitioner's loss and metric collectives by what they carry (their number is the
compiler's choice).
"""

import collections
import re
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from _hlo import hlo_collectives, hlo_replica_groups

from alexnet_jax import optim
from alexnet_jax.data.prefetch import to_global
from alexnet_jax.model import LAYERS, from_config, tower_widths
from alexnet_jax.parallel import DATA_AXIS, TOWER_AXIS, mesh_for_config, state_shardings
from alexnet_jax.steps import create_train_state, make_train_step

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import demo  # noqa: E402

BATCH = 8
STEPS = 3
# (mesh.data, mesh.tower) as a run's config gives them to parallel.mesh_for_config.
LAYOUTS = {"1x2": (1, 2), "2x2": (2, 2), "tower=1": (2, 1)}
# Tolerance of the layout comparison, relative to the largest change training made to the
# leaf (see test_every_layout_trains_to_the_same_parameters). Measured: 3.9e-6.
RTOL = 5e-5


@pytest.fixture(scope="module")
def setup():
    """Model, optimizer, one initial state (on the host) and the batches every layout gets."""
    c = demo.get_config()
    c.model.width = 0.125
    model = from_config(c.model)
    assert model.towers == 2 and model.dropout == 0.5
    tx = optim.make_optimizer(c.optim)
    mesh = mesh_of(model, "2x2")
    state, _ = create_train_state(model, tx, 0, mesh)
    rng = np.random.default_rng(0)
    s = model.image_size
    batches = [
        {
            "image": (50 * rng.standard_normal((BATCH, s, s, 3))).astype(np.float32),
            "label": rng.integers(0, model.num_classes, BATCH).astype(np.int32),
            "mask": np.arange(BATCH) < BATCH - 1,
        }  # one padded row, as at an epoch's end
        for _ in range(STEPS)
    ]
    return model, tx, jax.device_get(state), batches


def mesh_of(model, layout):
    data, tower = LAYOUTS[layout]
    mesh, _ = mesh_for_config(model.towers, ml_collections.ConfigDict({"data": data, "tower": tower}))
    assert dict(mesh.shape) == {DATA_AXIS: data, TOWER_AXIS: tower}
    return mesh


def on_mesh(host_state, mesh):
    return jax.device_put(host_state, state_shardings(host_state, mesh))


@pytest.fixture(scope="module")
def step_2x2(setup):
    """The 2x2 train step: lowered (StableHLO with source locations) and compiled, once."""
    model, tx, host_state, batches = setup
    mesh = mesh_of(model, "2x2")
    state = on_mesh(host_state, mesh)
    step = make_train_step(model, tx, mesh, jax.tree.map(lambda x: x.sharding, state))
    lowered = step.lower(state, to_global(batches[0], mesh))
    compiled = lowered.compile()
    return mesh, lowered.as_text(debug_info=True), compiled.as_text(), compiled


def axis_groups(mesh):
    """Replica groups, as sets of device ids, of a collective over each mesh axis."""
    ids = np.vectorize(lambda d: d.id)(mesh.devices)  # (data, tower)
    return {
        TOWER_AXIS: frozenset(frozenset(row) for row in ids.tolist()),  # a data shard's towers
        DATA_AXIS: frozenset(frozenset(col) for col in ids.T.tolist()),  # one tower's data shards
    }


def axis_of(groups, mesh):
    """The mesh axis whose replica groups are ``groups`` (device ids are the program's logical
    ids: positions in the mesh's device list, which equal the ids on this mesh)."""
    assert [d.id for d in mesh.devices.flat] == list(range(mesh.size))
    found = [axis for axis, g in axis_groups(mesh).items() if g == groups]
    return found[0] if found else f"groups {sorted(map(sorted, groups))}"


def per_tower_param_sizes(host_state):
    """{layer: sorted sizes of one tower's kernel and bias}."""
    towers = host_state.params["towers"]
    return {layer: sorted(int(leaf[0].size) for leaf in jax.tree.leaves(towers[layer])) for layer in LAYERS}


# ---- StableHLO ------------------------------------------------------------------------

_SHLO_OP = re.compile(
    r'"stablehlo\.(all_gather|all_reduce|reduce_scatter|all_to_all|collective_permute|'
    r'collective_broadcast)"'
)
_SHLO_ANY = re.compile(
    r"stablehlo\.(all_gather|all_reduce|reduce_scatter|all_to_all|collective_permute|"
    r"collective_broadcast|send|recv)\b"
)


def _tensor_shape(t):
    dims = t.split("x")[:-1]  # 'tensor<1x4x256xf32>' -> '1x4x256xf32' -> ['1', '4', '256']
    return tuple(int(d) for d in dims)


def stablehlo_collectives(text):
    """[(kind, replica groups, operand shapes, result shapes, source name)] in program order."""
    locs = {}
    for line in text.splitlines():
        m = re.match(r"(#loc\d+) = loc\((.*)\)$", line)
        if m:
            locs[m.group(1)] = m.group(2)

    def name(ref):
        body = locs[ref]
        m = re.match(r'"([^"]*)"', body)
        if m:
            return m.group(1)
        m = re.match(r"(?:callsite|fused\[)\(?(#loc\d+)", body)
        return name(m.group(1)) if m else body

    lines = text.splitlines()
    found = []
    for i, line in enumerate(lines):
        m = _SHLO_OP.search(line)
        if not m:
            assert not _SHLO_ANY.search(line), f"a collective this test does not read: {line.strip()[:200]}"
            continue
        groups = re.search(r"replica_groups = dense<(\[\[.*?\]\])>", line).group(1)
        groups = frozenset(frozenset(int(d) for d in g.split(",")) for g in re.findall(r"\[([\d, ]+)\]", groups))
        sig = line
        if not re.search(r"\) -> ", line):  # an op with a region (the reduction): signature after it
            sig = next(s for s in lines[i + 1 :] if s.lstrip().startswith("})"))
        m2 = re.search(r": \((.*)\) -> (.*?) loc\((#loc\d+)\)$", sig)
        operands = [_tensor_shape(t) for t in re.findall(r"tensor<([^>]*)>", m2.group(1))]
        results = [_tensor_shape(t) for t in re.findall(r"tensor<([^>]*)>", m2.group(2))]
        found.append((m.group(1), groups, operands, results, name(m2.group(3))))
    return found


def test_lowered_train_step_exchanges_at_four_places_and_reduces_gradients_over_data(setup, step_2x2):
    """The lowered 2x2 step (StableHLO, before the compiler partitions anything outside
    ``shard_map``) holds exactly 4 all_gathers and 4 reduce_scatters over 'tower' (the
    exchanges and their transposes) and 16 all_reduces over 'data' (one per parameter leaf)."""
    model, _, host_state, _ = setup
    mesh, text, _, _ = step_2x2
    ops = stablehlo_collectives(text)
    by = collections.defaultdict(list)
    for kind, groups, operands, results, where in ops:
        by[(kind, axis_of(groups, mesh))].append((operands, results, where))
    assert sorted(by) == [("all_gather", TOWER_AXIS), ("all_reduce", DATA_AXIS), ("reduce_scatter", TOWER_AXIS)], {
        k: [w for *_, w in v] for k, v in by.items()
    }

    # The four exchanges, forward, in order; each gathers one tower's channels from both towers.
    b = BATCH // mesh.shape[DATA_AXIS]
    w = tower_widths(model.towers, model.width, model.num_classes)
    exchanges = {  # layer -> one tower's input to it (spatial sizes of a 64x64 input: 3x3 after conv2, 1x1 after conv5)
        "conv3": (1, b, 3, 3, w["conv2"]),
        "fc6": (1, b, 1, 1, w["conv5"]),
        "fc7": (1, b, w["fc6"]),
        "fc8": (1, b, w["fc7"]),
    }

    def both(shape):
        return shape[:-1] + (shape[-1] * model.towers,)

    gathers = by[("all_gather", TOWER_AXIS)]
    assert [where.rsplit("/", 2)[-2:] for *_, where in gathers] == [
        [f"exchange_to_{layer}", "all_gather"] for layer in exchanges
    ]
    assert [(ops_, res) for ops_, res, _ in gathers] == [([s], [both(s)]) for s in exchanges.values()]
    # Their transposes, backward (fc8 first): the sum over towers of the gathered activation's
    # gradient, each tower keeping its own channels.
    scatters = by[("reduce_scatter", TOWER_AXIS)]
    assert [where.rsplit("/", 2)[-2:] for *_, where in scatters] == [
        [f"exchange_to_{layer}", "reduce_scatter"] for layer in reversed(exchanges)
    ]
    assert [(ops_, res) for ops_, res, _ in scatters] == [([both(s)], [s]) for s in reversed(exchanges.values())]

    # Gradient reductions: over 'data' only, two per layer (kernel and bias), each the size of
    # one tower's parameter.
    reductions = collections.defaultdict(list)
    for ops_, res, where in by[("all_reduce", DATA_AXIS)]:
        layer, what = where.rsplit("/", 2)[-2:]
        assert what == "psum_invariant" and ops_ == res and len(ops_) == 1, where
        reductions[layer].append(int(np.prod(ops_[0])))
    assert {k: sorted(v) for k, v in reductions.items()} == per_tower_param_sizes(host_state)


# ---- Compiled HLO ---------------------------------------------------------------------


def test_replica_group_forms():
    """The parser behind the compiled-HLO test, on the forms XLA prints (groups of logical ids)."""
    tower, data = {frozenset({0, 1}), frozenset({2, 3})}, {frozenset({0, 2}), frozenset({1, 3})}
    assert hlo_replica_groups("x), replica_groups={{0,1},{2,3}}, dimensions={4}", 4) == tower
    assert hlo_replica_groups("x), replica_groups={}, to_apply=%add", 4) == {frozenset(range(4))}
    assert hlo_replica_groups("x), replica_groups=[2,2]<=[4], dimensions={1}", 4) == tower
    assert hlo_replica_groups("x), replica_groups=[2,2]<=[2,2]T(1,0), to_apply=%add", 4) == data
    assert hlo_replica_groups("x), replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_1'}, use_global", 4) == tower
    assert hlo_replica_groups("x), replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0'}, use_global", 4) == data
    assert hlo_replica_groups("x), replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0','axis_1'}, use", 4) == {
        frozenset(range(4))
    }
    # device ids 0, 2, 1, 3 laid out on a (2, 1, 1, 2) mesh: along axis_0 run 0-1 and 2-3.
    assert (
        hlo_replica_groups(
            "x), replica_groups=mesh['axis_0'=2,'axis_1'=1,'axis_2'=1,'axis_3'=2], "
            "device_ids=([2,2]T(1,0)) {'axis_0'}, use_global",
            4,
        )
        == tower
    )
    assert (
        hlo_replica_groups(
            "x), replica_groups=mesh['axis_0'=2,'axis_1'=1,'axis_2'=1,'axis_3'=1,'axis_4'=2] {'axis_0'}, use_global", 4
        )
        == data
    )
    with pytest.raises(AssertionError, match="does not read"):
        hlo_replica_groups("x), replica_groups=something_new, use_global", 4)


def test_compiled_train_step_talks_across_towers_only_at_the_exchanges(setup, step_2x2):
    """The compiled 2x2 step (what runs): every collective runs over exactly one mesh axis;
    over 'tower', the network's only collectives are the four exchanges and their four
    transposes, and the rest carry per-example or scalar values (loss and metrics over the
    class scores the towers split); over 'data', all-reduces of every parameter's gradient
    and of scalars."""
    model, _, host_state, _ = setup
    mesh, _, text, _ = step_2x2
    b, T = BATCH // mesh.shape[DATA_AXIS], model.towers
    ops = hlo_collectives(text, mesh.size)
    assert ops, "no collectives found: the parser no longer reads this HLO"
    exchanges = collections.defaultdict(list)  # (opcode, layer) -> result shapes
    per_example = []  # other collectives over 'tower': (opcode, shapes)
    data_sizes = []  # element counts of every operand reduced over 'data'
    for op, groups, shapes, op_name in ops:
        axis = axis_of(groups, mesh)
        assert axis in (TOWER_AXIS, DATA_AXIS), f"{op} over {axis} ({op_name})"
        assert op in ("all-gather", "all-reduce", "reduce-scatter"), f"{op} over {axis} ({op_name})"
        exchange = re.search(r"/shard_map/.*exchange_to_(\w+)/(all_gather|reduce_scatter)$", op_name)
        if axis == TOWER_AXIS and exchange:
            assert op == exchange.group(2).replace("_", "-") and len(shapes) == 1, (op, shapes, op_name)
            exchanges[(op, exchange.group(1))].append(shapes[0])
        elif axis == TOWER_AXIS:
            # Loss and metrics over the class scores the towers split (per example), and the
            # gradient norm (one scalar per parameter leaf): nothing activation- or parameter-sized.
            for s in shapes:
                assert tuple(d for d in s if d != 1) in ((), (b,), (b, T)), (
                    f"{op} over 'tower' carries {s}, not a per-example value ({op_name})"
                )
            per_example.append((op, shapes))
        else:
            assert op == "all-reduce", f"{op} over 'data' ({op_name})"
            data_sizes += [int(np.prod(s)) for s in shapes]
    print("exchanges over 'tower':", dict(exchanges))
    print("per-example/scalar collectives over 'tower':", per_example)
    print("operand sizes all-reduced over 'data':", sorted(data_sizes))

    # Each of the four exchanges once forward (gather) and once backward (its transpose).
    layers = ("conv3", "fc6", "fc7", "fc8")
    assert sorted(exchanges) == sorted((op, layer) for op in ("all-gather", "reduce-scatter") for layer in layers), (
        sorted(exchanges)
    )
    for layer in layers:
        (g,), (r,) = exchanges[("all-gather", layer)], exchanges[("reduce-scatter", layer)]
        assert g[:2] == (1, b) and g[:-1] == r[:-1] and g[-1] == T * r[-1], (
            f"exchange_to_{layer}: gathers to {g}, its transpose keeps {r}"
        )

    # Over 'data': every parameter leaf's gradient (one tower's size), and otherwise scalars.
    grads = collections.Counter(s for sizes in per_tower_param_sizes(host_state).values() for s in sizes)
    rest = collections.Counter(data_sizes)
    rest.subtract(grads)
    assert all(n >= 0 for n in rest.values()), f"gradients not reduced over 'data': {-rest}"
    assert set(+rest) <= {1}, f"non-scalar all-reduces over 'data' besides the gradients: {+rest}"


# ---- Every layout, the same training --------------------------------------------------


def train(setup, layout, step_2x2, rng=None):
    """STEPS steps on ``layout`` from the shared initial state; returns (params, losses) on the host."""
    model, tx, host_state, batches = setup
    if rng is not None:
        host_state = host_state.replace(rng=rng)
    mesh = mesh_of(model, layout)
    state = on_mesh(host_state, mesh)
    if layout == "2x2":
        step = step_2x2[3]  # compiled already
    else:
        step = make_train_step(model, tx, mesh, jax.tree.map(lambda x: x.sharding, state))
    losses = []
    for batch in batches:
        state, metrics = step(state, to_global(batch, mesh))
        losses.append(metrics["train/loss"])
    return jax.device_get(state.params), np.asarray(jax.device_get(losses))


def largest_difference(params, ref, init):
    """Per leaf, max |params - ref| over the largest change training made to that leaf of ref."""
    out = {}
    for (path, p), r, p0 in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref), jax.tree.leaves(init)
    ):
        moved = np.abs(np.float64(r) - p0).max()
        assert moved > 0, f"{jax.tree_util.keystr(path)}: training did not change it"
        out[jax.tree_util.keystr(path)] = np.abs(np.float64(p) - r).max() / moved
    return out


def test_every_layout_trains_to_the_same_parameters(setup, step_2x2):
    """Three steps with dropout from the same initial state and batches: one tower per
    device with one data shard (1x2) or two (2x2), and both towers on every device of a
    two-way data-parallel mesh (mesh.tower=1), end at the same parameters.

    Tolerance: the layouts compute the same sums in different orders (a gradient over the
    batch is one sum on 1x2, two partial sums and a psum on 2x2; XLA fuses the vmapped
    towers of mesh.tower=1 differently), so float32 rounding differs, by ~1e-7 of each
    value. Parameters are compared by what training changed: max |p - p_ref| over
    max |p_ref - p_init|, per leaf, below 5e-5. Rounding the parameters themselves
    (~1e-7 of |p|) is up to ~1e-5 of that change; measured 3.9e-6 (conv1's kernel, on both
    2x2 and mesh.tower=1). A different dropout mask moves every leaf by 0.2 of its change
    or more (checked below with another dropout key; a planted layout-dependent mask gave
    ~1), so the comparison sees any layout-dependent mask. Losses agree to 1e-5.
    """
    _, _, host_state, _ = setup
    init = host_state.params
    ref, ref_losses = train(setup, "1x2", step_2x2)
    assert np.all(np.isfinite(ref_losses)) and ref_losses[-1] < ref_losses[0]
    for layout in ("2x2", "tower=1"):
        params, losses = train(setup, layout, step_2x2)
        diff = largest_difference(params, ref, init)
        worst = max(diff, key=diff.get)
        print(f"{layout}: largest difference {diff[worst]:.1e} of the change training made ({worst})")
        assert diff[worst] < RTOL, f"{layout} vs 1x2: {worst} differs by {diff[worst]:.2e} of its change"
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=f"losses on {layout}")

    # Dropout is on and the comparison would see a different mask: another key, far apart.
    other, _ = train(setup, "1x2", step_2x2, rng=np.asarray(jax.random.key_data(jax.random.key(1))))
    diff = largest_difference(other, ref, init)
    print(f"another dropout key: every leaf differs by at least {min(diff.values()):.1e} of its change")
    assert min(diff.values()) > 100 * RTOL, diff


# ---- The hybrid layout ("one weird trick") ------------------------------------------------

HYBRID_DEVICES = 4


@pytest.fixture(scope="module")
def hybrid_setup():
    """The demo net at width 0.125 with 16 classes (8 per tower, so that fc8's classes split 4 ways),
    one initial state, the batches, and the three layouts' meshes."""
    c = demo.get_config()
    c.model.width, c.model.num_classes = 0.125, 16
    model = from_config(c.model)
    tx = optim.make_optimizer(c.optim)
    meshes = {
        "one device": (mesh_for_config(model.towers, ml_collections.ConfigDict({"data": 1, "tower": 1}))[0], "towers"),
        "towers 2x2": (mesh_of(model, "2x2"), "towers"),
        "hybrid": (
            mesh_for_config(
                model.towers, ml_collections.ConfigDict({"data": -1, "tower": -1, "parallelism": "hybrid"})
            )[0],
            "hybrid",
        ),
    }
    assert dict(meshes["hybrid"][0].shape) == {DATA_AXIS: 8, TOWER_AXIS: 1}  # all 8 devices on 'data'
    meshes["hybrid"] = (
        mesh_for_config(
            model.towers, ml_collections.ConfigDict({"data": HYBRID_DEVICES, "tower": 1, "parallelism": "hybrid"})
        )[0],
        "hybrid",
    )
    state, _ = create_train_state(model, tx, 0, meshes["one device"][0])
    rng = np.random.default_rng(1)
    s = model.image_size
    batches = [
        {
            "image": (50 * rng.standard_normal((BATCH, s, s, 3))).astype(np.float32),
            "label": rng.integers(0, model.num_classes, BATCH).astype(np.int32),
            "mask": np.arange(BATCH) < BATCH - 1,
        }
        for _ in range(STEPS)
    ]
    return model, tx, jax.device_get(state), batches, meshes


def train_in(hybrid_setup, name):
    model, tx, host_state, batches, meshes = hybrid_setup
    mesh, layout = meshes[name]
    state = jax.device_put(host_state, state_shardings(host_state, mesh, layout))
    step = make_train_step(model, tx, mesh, jax.tree.map(lambda x: x.sharding, state), layout=layout)
    losses = []
    for batch in batches:
        state, metrics = step(state, to_global(batch, mesh))
        losses.append(metrics["train/loss"])
    return state, np.asarray(jax.device_get(losses)), step


def test_hybrid_trains_to_the_same_parameters_as_one_device_and_the_towers(hybrid_setup):
    """Three steps with dropout: one device, the paper's towers (2x2) and the hybrid layout
    (4 devices) end at the same parameters (same tolerance and measure as above), and the
    hybrid state really is laid out as the layout says: FC kernels split by output units."""
    _, _, host_state, _, _ = hybrid_setup
    init = host_state.params
    ref_state, ref_losses, _ = train_in(hybrid_setup, "one device")
    ref = jax.device_get(ref_state.params)
    for name in ("towers 2x2", "hybrid"):
        state, losses, _ = train_in(hybrid_setup, name)
        diff = largest_difference(jax.device_get(state.params), ref, init)
        worst = max(diff, key=diff.get)
        print(f"{name}: largest difference {diff[worst]:.1e} of the change training made ({worst})")
        assert diff[worst] < RTOL, f"{name} vs one device: {worst} differs by {diff[worst]:.2e} of its change"
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=f"losses on {name}")
    fc6 = state.params["towers"]["fc6"]["kernel"]  # hybrid: (towers, in, units), units split 4 ways
    assert fc6.sharding.shard_shape(fc6.shape) == fc6.shape[:2] + (fc6.shape[2] // HYBRID_DEVICES,)
    conv1 = state.params["towers"]["conv1"]["kernel"]
    assert conv1.sharding.shard_shape(conv1.shape) == conv1.shape  # conv layers: every device holds all


def test_hybrid_train_step_gathers_the_batch_once_and_reduces_only_conv_gradients(hybrid_setup):
    """The lowered hybrid step's collectives, all over 'data' (the 4 devices): before fc6 the
    batch is gathered (conv5's pooled maps of both towers), before fc7 and fc8 the units are;
    backward, their transposes (reduce_scatter); and one all_reduce per conv parameter leaf
    (10). No FC gradient is reduced: each device holds its own units for the whole batch."""
    model, tx, host_state, batches, meshes = hybrid_setup
    mesh, layout = meshes["hybrid"]
    state = jax.device_put(host_state, state_shardings(host_state, mesh, layout))
    step = make_train_step(model, tx, mesh, jax.tree.map(lambda x: x.sharding, state), layout=layout)
    ops = stablehlo_collectives(step.lower(state, to_global(batches[0], mesh)).as_text(debug_info=True))
    # The towers' vmapped axis shares its name with the mesh's 'tower' axis, of size 1 here: JAX
    # writes a few collectives over it, in groups of one device, which move no data. Left out;
    # everything else runs over 'data'.
    ops = [o for o in ops if any(len(g) > 1 for g in o[1])]
    assert {axis_of(groups, mesh) for _, groups, *_ in ops} == {DATA_AXIS}
    T, b, N = model.towers, BATCH // HYBRID_DEVICES, BATCH
    w = tower_widths(model.towers, model.width, model.num_classes)
    gathered = {  # name in the program: (operand, result), per device; T leading: both towers on each
        "batch_to_fc6": ((T, b, 1, 1, w["conv5"]), (T, N, 1, 1, w["conv5"])),
        "units_to_fc7": ((T, N, w["fc6"] // HYBRID_DEVICES), (T, N, w["fc6"])),
        "units_to_fc8": ((T, N, w["fc7"] // HYBRID_DEVICES), (T, N, w["fc7"])),
    }
    got = [
        (kind, where.rsplit("/", 2)[-2], operands, results)
        for kind, _, operands, results, where in ops
        if kind != "all_reduce"
    ]
    assert got == [("all_gather", name, [a], [r]) for name, (a, r) in gathered.items()] + [
        ("reduce_scatter", name, [r], [a]) for name, (a, r) in reversed(gathered.items())
    ]
    reductions = collections.defaultdict(list)
    for kind, _, operands, results, where in ops:
        if kind == "all_reduce":
            layer, what = where.rsplit("/", 2)[-2:]
            assert what == "psum_invariant" and operands == results, where
            reductions[layer].append(int(np.prod(operands[0])))
    # Every conv parameter once, both towers' (the per-tower convolutions split some kernels'
    # reductions in two, one per tower); nothing of fc6-fc8.
    whole = {
        layer: sum(int(leaf.size) for leaf in jax.tree.leaves(host_state.params["towers"][layer])) for layer in LAYERS
    }
    assert {layer: sum(sizes) for layer, sizes in reductions.items()} == {
        layer: whole[layer] for layer in ("conv1", "conv2", "conv3", "conv4", "conv5")
    }
    compiled = hlo_collectives(step.lower(state, to_global(batches[0], mesh)).compile().as_text(), mesh.size)
    # Compiled: the same gathers and scatters, the conv gradients' all-reduce (merged with scalars), and
    # the partitioner's: the loss's scalars, and an all-to-all that reorders the class scores of the
    # split fc8 (N x classes values). No FC-parameter-sized tensor crosses a device.
    moving = [o for o in compiled if any(len(g) > 1 for g in o[1])]
    reduced = sum(
        int(np.prod(s)) for op, _, shapes, _ in moving if op == "all-reduce" for s in shapes if int(np.prod(s)) > 1
    )  # scalars left out: the loss and the metrics
    assert reduced == sum(whole[layer] for layer in ("conv1", "conv2", "conv3", "conv4", "conv5"))
    assert [name.rsplit("/", 2)[-2] for op, _, _, name in moving if op in ("all-gather", "reduce-scatter")] == [
        "batch_to_fc6",
        "units_to_fc7",
        "units_to_fc8",
        "units_to_fc8",
        "units_to_fc7",
        "batch_to_fc6",
    ]
