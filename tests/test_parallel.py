"""One network in every layout: the same parameters give the same logits and gradients
on one device and on ('data', 'tower') meshes, and the towers talk only where the paper says."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alexnet_jax import AlexNet, apply_on_mesh, make_mesh, use_virtual_cpu_devices
from alexnet_jax.parallel import batch_sharding, check_layout, mesh_forward, shard_variables

NARROW = dict(width=0.125, image_size=96, num_classes=10, init_std=0.03)
ABLATIONS = {
    "paper": {},
    "no_lrn": {"lrn": False},
    "lrn_alpha_over_n": {"lrn_convention": "alpha_over_n"},
    "pool_2_2": {"pool_window": 2, "pool_stride": 2},
    "one_tower": {"towers": 1},
    "tanh": {"activation": "tanh"},
    "no_dropout": {"dropout": 0.0},
    "caffe_lrn": {"lrn_scope": "layer", "lrn_k": 1.0, "lrn_convention": "alpha_over_n"},  # across the towers
}


def loss_fn(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def reference(model, variables, x, y, key):
    """Single device, both towers under vmap: the layout everything is compared with."""

    def loss(v):
        logits = model.apply(v, x, train=True, rngs={"dropout": key})
        return loss_fn(logits, y), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables)
    return logits, grads


def on_mesh(model, variables, x, y, key, mesh, layout="towers"):
    fwd = mesh_forward(model, mesh, train=True, layout=layout)

    def loss(v, x):
        logits = fwd(v, x, key)
        return loss_fn(logits, y), logits

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, logits), grads = step(shard_variables(variables, mesh, layout), jax.device_put(x, batch_sharding(mesh)))
    return logits, grads


def assert_same(a, b, what, rtol=2e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.abs(a).max()
    assert scale > 0, f"{what}: all zeros, the comparison would be empty"
    err = np.abs(a - b).max() / scale
    assert err < rtol, f"{what}: max relative difference {err:.2e}"


def layouts(towers):
    """(data, tower) meshes: one tower per device, and (tower=1) every device running all towers."""
    return [(1, 2), (2, 2), (4, 2), (1, 1), (2, 1)] if towers == 2 else [(2, 1), (4, 1), (8, 1)]


def check_layouts(kwargs, batch, meshes=None, layout="towers"):
    model = AlexNet(**kwargs)
    s = model.image_size
    x = 50.0 * jax.random.normal(jax.random.key(1), (batch, s, s, 3))
    y = jax.random.randint(jax.random.key(2), (batch,), 0, model.num_classes)
    key = jax.random.key(3)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    ref_logits, ref_grads = reference(model, variables, x, y, key)
    for data, towers in meshes or layouts(model.towers):
        mesh = make_mesh(towers=towers, data=data)
        logits, grads = on_mesh(model, variables, x, y, key, mesh, layout)
        where = f"{kwargs} on data={data} x tower={towers}, {layout} layout"
        assert_same(ref_logits, logits, f"logits {where}")
        flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads)
        flat = jax.tree_util.tree_leaves(grads)
        assert len(flat_ref) == len(flat) == 16
        for (path, g_ref), g in zip(flat_ref, flat):
            # Gradients sum over batch and positions in a layout-dependent order.
            assert_same(g_ref, g, f"grad {jax.tree_util.keystr(path)} {where}", rtol=1e-4)


# The default run keeps the one-tower net and LRN over the whole layer (caffe_lrn: the one exchange between
# neighbouring towers, here with a tower per device); the paper net's layouts after training are also in
# test_parallel_train_step, its first steps pinned in test_pinned_steps.
@pytest.mark.parametrize(
    "name", [n if n in ("one_tower", "caffe_lrn") else pytest.param(n, marks=pytest.mark.slow) for n in ABLATIONS]
)
def test_layouts_agree_narrow(name):
    # Every layout for the paper net; for the ablations, one of each kind (they change
    # the layers, not how the layouts split them).
    meshes = {"paper": None, "one_tower": [(4, 1)], "caffe_lrn": [(1, 2)]}.get(name, [(2, 2), (2, 1)])
    check_layouts({**NARROW, **ABLATIONS[name]}, batch=8, meshes=meshes)


# K towers' exchanges are pinned in the default run (test_towers_exchange_only_at_conv3_and_fc_layers);
# their values against one device are slow.
@pytest.mark.parametrize(
    "K, meshes",
    [
        pytest.param(4, [(2, 4)], marks=pytest.mark.slow),
        pytest.param(4, [(1, 4), (2, 1)], marks=pytest.mark.slow),
        pytest.param(8, [(1, 8)], marks=pytest.mark.slow),
    ],
)
def test_k_towers_agree_across_layouts(K, meshes):
    """K towers, one per device (4 and 8 virtual devices) or all on each, against one device."""
    check_layouts({**NARROW, "num_classes": 16, "towers": K}, batch=8, meshes=meshes)


# "One weird trick"'s net (Krizhevsky 2014; torchvision's alexnet) at 1/8 width: one tower, no LRN.
OWT_NARROW = dict(NARROW, towers=1, conv_widths=(64, 192, 384, 256, 256), lrn=False, conv1_pad=2, num_classes=16)


@pytest.mark.parametrize(
    "kwargs, meshes",
    [
        # the paper's two towers: 8 classes per tower, 2 per device. The default run trains hybrid against one device
        # in test_parallel_train_step; these forward-and-gradient checks are slow.
        pytest.param(dict(NARROW, num_classes=16), [(4, 1)], marks=pytest.mark.slow),
        pytest.param(dict(NARROW, num_classes=16), [(2, 1)], marks=pytest.mark.slow),
        pytest.param(OWT_NARROW, [(2, 1), (4, 1), (8, 1)], marks=pytest.mark.slow),  # also in test_costs, on 8
    ],
    ids=["paper-4", "paper-2", "owt"],
)
def test_hybrid_layout_agrees_with_one_device(kwargs, meshes):
    """Conv layers data-parallel, FC units split over the same devices: same logits and gradients."""
    check_layouts(kwargs, batch=8, meshes=meshes, layout="hybrid")


@pytest.mark.slow  # the data layout is the towers layout's tower=1 mesh, checked above
def test_data_layout_agrees_with_one_device():
    check_layouts(NARROW, batch=8, meshes=[(4, 1)], layout="data")


@pytest.mark.slow  # the full-size forward is also checked against a NumPy reference in test_model_reference
@pytest.mark.heavy  # over a minute on 2 cores: .ci/run runs it when time allows
def test_layouts_agree_full_size_paper_net():
    check_layouts({}, batch=8)


def test_apply_on_mesh_matches_apply():
    model = AlexNet(**NARROW)
    x = 50.0 * jax.random.normal(jax.random.key(1), (4, 96, 96, 3))
    v = jax.jit(model.init)(jax.random.key(0), x)
    want = jax.jit(lambda v: model.apply(v, x))(v)
    got = apply_on_mesh(model, v, x, make_mesh(towers=2, data=2))
    assert got.shape == (4, 10)
    assert_same(want, got, "eval logits")


def test_mesh_forward_features_are_fc7_in_tower_order():
    """features=True adds fc7's activations, (N, towers * units) with tower 0's units first,
    whether the towers are split over devices (2x2) or run together on one (1x1)."""
    model = AlexNet(**NARROW)
    x = 50.0 * jax.random.normal(jax.random.key(1), (4, 96, 96, 3))
    v = jax.jit(model.init)(jax.random.key(0), x)
    logits, state = jax.jit(lambda v: model.apply(v, x, mutable=["intermediates"]))(v)
    fc7_TNF = state["intermediates"]["towers"]["fc7_act"][0]
    want = jnp.concatenate(list(fc7_TNF), axis=-1)
    for mesh in (make_mesh(towers=2, data=2), make_mesh(towers=1, data=1, devices=jax.devices()[:1])):
        f = jax.jit(mesh_forward(model, mesh, features=True))
        got_logits, got = f(shard_variables(v, mesh), jax.device_put(x, batch_sharding(mesh)), None)
        assert got.shape == (4, 2 * fc7_TNF.shape[-1])
        assert_same(logits, got_logits, f"logits on {mesh.shape}")
        assert_same(want, got, f"fc7 on {mesh.shape}")


def collectives(text, pattern):
    return [line for line in text.splitlines() if re.search(pattern, line)]


STABLEHLO_COLLECTIVE = (
    r"stablehlo\.(all_gather|all_reduce|all_to_all|reduce_scatter|"
    r"collective_permute|collective_broadcast)"
)
HLO_COLLECTIVE = (
    r"= \S+ (all-gather|all-reduce|all-to-all|reduce-scatter|"
    r"collective-permute|collective-broadcast)(-start)?\("
)


def lowered_forward(model, mesh, batch=4):
    s = model.image_size
    x = jax.ShapeDtypeStruct((batch, s, s, 3), jnp.float32)
    v = jax.eval_shape(model.init, jax.random.key(0), x)
    return jax.jit(mesh_forward(model, mesh)).lower(v, x, None)


@pytest.mark.parametrize("K", [2, 4])
def test_towers_exchange_only_at_conv3_and_fc_layers(K):
    lowered = lowered_forward(AlexNet(towers=K), make_mesh(towers=K, data=1))
    ops = collectives(lowered.as_text(), STABLEHLO_COLLECTIVE)
    # Operand -> result of each exchange, per device (leading 1 = this device's tower):
    # each tower's 1/K of the whole layer's maps or units in, all of them out.
    shapes = [re.search(r": \((tensor<[^)]*>)\) -> (tensor<[^>]*>)", op).groups() for op in ops]
    assert shapes == [
        (f"tensor<1x4x13x13x{256 // K}xf32>", "tensor<1x4x13x13x256xf32>"),  # conv2 maps -> conv3
        (f"tensor<1x4x6x6x{256 // K}xf32>", "tensor<1x4x6x6x256xf32>"),  # pooled conv5 -> fc6
        (f"tensor<1x4x{4096 // K}xf32>", "tensor<1x4x4096xf32>"),  # fc6 -> fc7
        (f"tensor<1x4x{4096 // K}xf32>", "tensor<1x4x4096xf32>"),  # fc7 -> fc8
    ]
    assert all("all_gather" in op for op in ops)
    # After compilation (SPMD partitioning, fusion) the program still talks exactly there.
    compiled = collectives(lowered.compile().as_text(), HLO_COLLECTIVE)
    scopes = [re.search(r"exchange_to_(\w+)", op).group(1) for op in compiled]
    assert sorted(scopes) == ["conv3", "fc6", "fc7", "fc8"]
    assert all(" all-gather" in op for op in compiled)


def test_one_tower_net_has_no_exchange():
    lowered = lowered_forward(AlexNet(towers=1), make_mesh(towers=1, data=2))
    assert collectives(lowered.as_text(), STABLEHLO_COLLECTIVE) == []
    assert collectives(lowered.compile().as_text(), HLO_COLLECTIVE) == []


def test_mesh_errors_are_clear():
    """Checked once, where a run (or apply_on_mesh) meets its mesh: check_layout."""
    with pytest.raises(ValueError, match="puts every device on the 'data' axis"):
        check_layout(AlexNet(), make_mesh(towers=2, data=1), layout="hybrid")
    with pytest.raises(ValueError, match=r"per tower \{'fc8': 500\} do not divide"):
        check_layout(AlexNet(), make_mesh(towers=1, data=8), layout="hybrid")
    with pytest.raises(ValueError, match="choose one of 'towers', 'data', 'hybrid'"):
        mesh_forward(AlexNet(), make_mesh(towers=1, data=2), layout="model")
    with pytest.raises(ValueError, match="needs 18 devices"):
        make_mesh(towers=2, data=9)
    with pytest.raises(ValueError, match="towers=1 but the mesh"):
        check_layout(AlexNet(towers=1), make_mesh(towers=2, data=1))
    with pytest.raises(ValueError, match="does not divide"):
        model = AlexNet(**NARROW)
        apply_on_mesh(model, None, jnp.zeros((3, 96, 96, 3)), make_mesh(towers=2, data=2))
    with pytest.raises(RuntimeError, match="already started with 8"):
        use_virtual_cpu_devices(4)
    use_virtual_cpu_devices(8)  # the count we already have: fine
