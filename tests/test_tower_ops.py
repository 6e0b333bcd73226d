"""The fast operations (tower_ops.FAST) compute what the plain flax/lax ones (PLAIN) compute:
op by op, and for the whole network, values and gradients, on one device and on a mesh."""

import dataclasses
import re
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_parallel import assert_same

from alexnet_jax import AlexNet
from alexnet_jax.parallel import batch_sharding, make_mesh, mesh_forward, shard_variables
from alexnet_jax.tower_ops import (
    ACCELERATOR,
    FAST,
    PLAIN,
    TowerOps,
    for_devices,
    max_pool,
    resolve,
    tower_conv,
    tower_dense,
)

NARROW = dict(width=0.125, image_size=64, num_classes=10, init_std=0.03)


def test_max_pool_gradient_equals_reduce_window_gradient_with_ties():
    """Our max_pool's custom gradient vs JAX's own reduce_window gradient (select-and-scatter),
    on inputs full of ties (rounded ReLU outputs), for 3/2 and 2/2 pooling."""
    x = jnp.round(4 * jax.nn.relu(jax.random.normal(jax.random.key(0), (3, 27, 27, 5)))) / 4
    g = jax.random.normal(jax.random.key(1), (3, 13, 13, 5))
    for window, stride in ((3, 2), (2, 2)):
        out = (27 - window) // stride + 1
        g_ = g[:, :out, :out]
        ours = jax.vjp(lambda a: max_pool(a, window, stride), x)
        ref = jax.vjp(lambda a: nn.max_pool(a, (window, window), (stride, stride)), x)
        plain = jax.vjp(lambda a: PLAIN.max_pool(a, window, stride), x)
        np.testing.assert_array_equal(ours[0], ref[0])
        np.testing.assert_array_equal(plain[1](g_)[0], ref[1](g_)[0])
        got, want = ours[1](g_)[0], ref[1](g_)[0]
        np.testing.assert_array_equal(got != 0, want != 0)  # the same input wins every window
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # overlaps summed in another order
    assert float(jnp.mean(x == 0)) > 0.4  # ties were really there


def test_per_tower_conv_and_dense_equal_plain_vmap_values_and_gradients():
    """tower_conv / tower_dense under vmap vs jax.vmap of the plain ops (which XLA runs as a
    grouped convolution and a merged matmul): same values, same gradients."""

    def plain_conv(x, k):
        return jax.lax.conv_general_dilated(x, k, (1, 1), ((2, 2), (2, 2)), dimension_numbers=("NHWC", "HWIO", "NHWC"))

    k_ = jax.random.split(jax.random.key(0), 4)
    x_shared = jax.random.normal(k_[0], (4, 9, 9, 6))
    x_towers = jax.random.normal(k_[1], (2, 4, 9, 9, 6))
    kernels = jax.random.normal(k_[2], (2, 5, 5, 6, 8))
    for x, in_axes in ((x_shared, (None, 0)), (x_towers, (0, 0))):

        def loss(x, k, f):
            return jnp.sum(jnp.sin(jax.vmap(f, in_axes=in_axes)(x, k)))

        ours = jax.value_and_grad(loss, argnums=(0, 1))(
            x, kernels, lambda a, b: tower_conv(a, b, (1, 1), ((2, 2), (2, 2)))
        )
        ref = jax.value_and_grad(loss, argnums=(0, 1))(x, kernels, plain_conv)
        np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5)
        for a, b in zip(ours[1], ref[1]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)

    w = jax.random.normal(k_[3], (2, 6, 3))
    for x, in_axes in ((x_shared[:, 0, 0], (None, 0)), (x_towers[:, :, 0, 0], (0, 0))):

        def loss(x, k, f):
            return jnp.sum(jnp.sin(jax.vmap(f, in_axes=in_axes)(x, k)))

        ref = jax.value_and_grad(loss, argnums=(0, 1))(x, w, lambda a, b: a @ b)
        ours = jax.value_and_grad(loss, argnums=(0, 1))(x, w, tower_dense)
        np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5)
        for a, b in zip(ours[1], ref[1]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _convolution_groups(model):
    x = jnp.zeros((2, 96, 96, 3))
    v = jax.eval_shape(model.init, jax.random.key(0), x)
    grad = jax.jit(jax.grad(lambda v: jnp.sum(model.apply(v, x, train=True, rngs={"dropout": jax.random.key(1)}))))
    text = grad.lower(v).as_text()
    return (
        [int(g) for g in re.findall(r"feature_group_count = (\d+)", text)],
        [int(g) for g in re.findall(r"batch_group_count = (\d+)", text)],
    )


def test_one_device_program_has_no_grouped_convolution():
    """The point of tower_conv: XLA sees dense convolutions only, forwards and backwards
    (and the plain ops really are the grouped ones it replaces)."""
    groups, batch_groups = _convolution_groups(AlexNet(width=0.125, image_size=96, num_classes=10, ops="fast"))
    assert len(groups) >= 13 and set(groups) == {1} and set(batch_groups) == {1}
    groups, batch_groups = _convolution_groups(AlexNet(width=0.125, image_size=96, num_classes=10, ops=PLAIN))
    assert 2 in set(groups) | set(batch_groups)


def test_ops_are_a_static_module_field():
    mixed = dataclasses.replace(FAST, max_pool=PLAIN.max_pool)
    assert isinstance(mixed, TowerOps) and mixed != FAST and mixed == dataclasses.replace(FAST, max_pool=PLAIN.max_pool)
    assert len({FAST, PLAIN, mixed}) == 3  # hashable
    assert AlexNet().ops == "auto" and AlexNet(ops=PLAIN) != AlexNet() and AlexNet(ops="fast") != AlexNet()
    assert resolve("auto") is FAST and resolve("fast") is FAST and resolve("plain") is PLAIN and resolve(mixed) is mixed


def test_auto_is_decided_by_the_devices():
    cpu, gpu = types.SimpleNamespace(platform="cpu"), types.SimpleNamespace(platform="cuda")
    assert for_devices("auto", [cpu, cpu]) == "fast" and for_devices("auto", [gpu]) is ACCELERATOR
    assert for_devices("auto", [cpu, gpu]) is ACCELERATOR and for_devices("fast", [gpu]) == "fast"
    assert ACCELERATOR.conv is PLAIN.conv and ACCELERATOR.max_pool is FAST.max_pool
    assert for_devices(PLAIN, [cpu]) is PLAIN


def _loss_and_grads(model, variables, x, y, key, mesh=None):
    if mesh is None:

        def forward(v, x):
            return model.apply(v, x, train=True, rngs={"dropout": key})

        args = (variables, x)
    else:
        fwd = mesh_forward(model, mesh, train=True)

        def forward(v, x):
            return fwd(v, x, key)

        args = (shard_variables(variables, mesh), jax.device_put(x, batch_sharding(mesh)))

    def loss(v, x):
        logits = forward(v, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(*args)
    return logits, grads


@pytest.fixture(scope="module")
def fast_and_plain():
    """Both networks, and parameters from each one's init: the same tree and the same draws."""
    fast, plain = AlexNet(**NARROW, ops=FAST), AlexNet(**NARROW, ops=PLAIN)
    x = jnp.zeros((1, 64, 64, 3))
    v = jax.jit(fast.init)(jax.random.key(0), x)
    # The ops do not take part in initialisation (Tower._layer does): the same tree, the same draws.
    assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(
        jax.eval_shape(plain.init, jax.random.key(0), x)
    )
    return fast, plain, v


@pytest.mark.parametrize("layout", ["one_device", "mesh_2x2"])
def test_fast_and_plain_ops_give_the_same_network(fast_and_plain, layout):
    """The whole AlexNet with FAST and with PLAIN ops: the same logits and gradients (dropout
    on) to float32 round-off (measured: 5e-7 of the largest entry)."""
    fast, plain, v = fast_and_plain
    n = 8
    x = 50.0 * jax.random.normal(jax.random.key(1), (n, 64, 64, 3))
    y = jax.random.randint(jax.random.key(2), (n,), 0, 10)
    mesh = None if layout == "one_device" else make_mesh(towers=2, data=2)
    key = jax.random.key(3)
    logits_f, grads_f = _loss_and_grads(fast, v, x, y, key, mesh)
    logits_p, grads_p = _loss_and_grads(plain, v, x, y, key, mesh)
    assert_same(logits_f, logits_p, "logits")
    flat_f = dict(jax.tree_util.tree_flatten_with_path(grads_f)[0])
    for path, g_p in jax.tree_util.tree_flatten_with_path(grads_p)[0]:
        assert_same(flat_f[path], g_p, jax.tree_util.keystr(path))


def test_fast_forms_lose_no_gradient_precision_on_one_or_two_devices():
    """The fast and the plain forms' float32 gradients, on one device and data-parallel on two, against
    the plain forms in float64: every leaf within 2e-6 of its largest gradient, for both forms alike.
    (Two devices sum the batch in two halves: the layouts differ from each other by as much, ~6e-7 a
    step, and training carries such differences on; they are rounding, not a form's loss of precision.)"""
    from alexnet_jax import parallel
    from configs import demo

    c = demo.get_config()
    c.model.towers, c.model.width = 1, 0.125
    base = AlexNet(**c.model.to_dict())
    s = base.image_size
    rng = np.random.default_rng(0)
    images = (50 * rng.standard_normal((16, s, s, 3))).astype(np.float64)
    labels = rng.integers(0, base.num_classes, 16).astype(np.int32)
    with jax.enable_x64(True):
        variables = base.init(jax.random.key(0), jnp.zeros((1, s, s, 3), jnp.float32))

        def grads(ops, dtype, devices):
            model = base.clone(ops=ops, dtype=dtype)
            mesh = parallel.make_mesh(towers=1, data=devices, devices=jax.devices()[:devices])
            forward = parallel.mesh_forward(model, mesh, layout="data")

            def loss(v, x):
                return optax.softmax_cross_entropy_with_integer_labels(forward(v, x, None), labels).mean()

            v = jax.tree.map(lambda a: a.astype(dtype), variables)
            return jax.device_get(jax.jit(jax.grad(loss))(v, images.astype(dtype)))

        reference = grads("plain", "float64", 1)
        for ops in ("fast", "plain"):
            for devices in (1, 2):
                errors = jax.tree.map(
                    lambda g, r: float(np.abs(g - r).max() / np.abs(r).max()), grads(ops, "float32", devices), reference
                )
                assert max(jax.tree.leaves(errors)) < 2e-6, (ops, devices, errors)
