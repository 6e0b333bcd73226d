"""The network against the paper's numbers and independent NumPy references."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax import LRN, AlexNet, ConfigError, count_params, default_config, from_config
from alexnet_jax.model import conv1_padding, layer_param_counts

# The paper, Section 3; per-layer counts summed over towers.
PAPER_LAYER_PARAMS = {
    "conv1": 34_944,
    "conv2": 307_456,
    "conv3": 885_120,
    "conv4": 663_936,
    "conv5": 442_624,
    "fc6": 37_752_832,
    "fc7": 16_781_312,
    "fc8": 4_097_000,
}


def shapes_of(model, size=224, n=2):
    x = jax.ShapeDtypeStruct((n, size, size, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)


@pytest.mark.parametrize(
    "kwargs, total",
    [
        ({}, 60_965_224),
        ({"towers": 1}, 59_798_312),
        ({"lrn": False}, 60_965_224),
        ({"pool_window": 2, "pool_stride": 2}, 60_965_224),
        # K towers: the two-tower totals split K ways, hand-computed layer by layer
        # (K=4: conv 24-64-96-96-64, fc 1024-1024-250 per tower).
        ({"towers": 4}, 60_258_664),
        ({"towers": 8}, 59_905_384),
        # "One weird trick"'s net as torchvision ships it (torchvision.models.alexnet: 61,100,840).
        ({"towers": 1, "conv_widths": (64, 192, 384, 256, 256), "lrn": False, "conv1_pad": 2}, 61_100_840),
    ],
)
def test_parameter_counts(kwargs, total):
    assert count_params(shapes_of(AlexNet(**kwargs))) == total


def test_k_towers_split_the_two_tower_widths():
    """K=4: every layer's whole-net width is the two-tower net's, each tower a quarter of it."""
    inter = _intermediates(AlexNet(towers=4))
    shapes = {name: inter[name]["__call__"][0].shape for name in ("conv1", "conv3", "fc6", "fc8")}
    got = {name: (shape[0], shape[-1]) for name, shape in shapes.items()}  # (towers, units per tower)
    assert got == {"conv1": (4, 24), "conv3": (4, 96), "fc6": (4, 1024), "fc8": (4, 250)}
    kernel = shapes_of(AlexNet(towers=4))["params"]["towers"]
    assert kernel["conv3"]["kernel"].shape == (4, 3, 3, 256, 96)  # all towers' conv2 maps
    assert kernel["conv4"]["kernel"].shape == (4, 3, 3, 96, 96)  # its own tower's conv3 maps
    assert kernel["fc6"]["kernel"].shape == (4, 9216, 1024)


def test_width_fields_errors():
    with pytest.raises(ValueError, match=r"conv_widths=\(96, 256, 384, 384, 256\) must divide by model.towers=3"):
        from_config({**default_config().to_dict(), "towers": 3})
    with pytest.raises(ValueError, match="needs 5 widths"):
        from_config({**default_config().to_dict(), "conv_widths": (64, 192)})
    with pytest.raises(ValueError, match="integer >= 1"):
        from_config({**default_config().to_dict(), "towers": 0})


def test_per_layer_parameter_counts():
    assert layer_param_counts(shapes_of(AlexNet())) == PAPER_LAYER_PARAMS


def test_one_tower_net_keeps_conv5_and_fc_whole():
    # Footnote 2: conv 48-128-192-192-256, FC 4096-4096-1000, computed by hand here.
    def conv(k, cin, cout):
        return k * k * cin * cout + cout

    expected = {
        "conv1": conv(11, 3, 48),
        "conv2": conv(5, 48, 128),
        "conv3": conv(3, 128, 192),
        "conv4": conv(3, 192, 192),
        "conv5": conv(3, 192, 256),
        "fc6": 6 * 6 * 256 * 4096 + 4096,
        "fc7": 4096 * 4096 + 4096,
        "fc8": 4096 * 1000 + 1000,
    }
    assert layer_param_counts(shapes_of(AlexNet(towers=1))) == expected


def _intermediates(model, size=224, n=1):
    x = jax.ShapeDtypeStruct((n, size, size, 3), jnp.float32)
    v = shapes_of(model, size, n)

    def run(v, x):
        return model.apply(v, x, capture_intermediates=True, mutable=["intermediates"])

    _, state = jax.eval_shape(run, v, x)
    return state["intermediates"]["towers"]


@pytest.mark.parametrize("pool", [(3, 2), (2, 2)])
def test_activation_shapes_at_224(pool):
    inter = _intermediates(AlexNet(pool_window=pool[0], pool_stride=pool[1]))
    T = 2  # leading axis of every captured tower activation

    def spatial(name):
        return inter[name][0].shape[2:4] if name.endswith(("pooled", "act")) else None

    assert inter["conv1"]["__call__"][0].shape == (T, 1, 55, 55, 48)
    assert spatial("conv1_pooled") == (27, 27)
    assert inter["conv2"]["__call__"][0].shape == (T, 1, 27, 27, 128)
    assert spatial("conv2_pooled") == (13, 13)
    assert inter["conv5"]["__call__"][0].shape == (T, 1, 13, 13, 128)
    assert spatial("conv5_pooled") == (6, 6)


def test_neuron_counts_match_paper():
    inter = _intermediates(AlexNet())

    def neurons(layer):
        s = inter[layer]["__call__"][0].shape  # (towers, N=1, ...)
        return int(np.prod(s[:1] + s[2:]))

    # The paper's list; its first entry (253,440) is an erratum for 55*55*96.
    paper = {
        "conv1": 290_400,
        "conv2": 186_624,
        "conv3": 64_896,
        "conv4": 64_896,
        "conv5": 43_264,
        "fc6": 4096,
        "fc7": 4096,
        "fc8": 1000,
    }
    assert {k: neurons(k) for k in paper} == paper


def test_lrn_sums_only_within_a_tower():
    inter = _intermediates(AlexNet())
    # Each tower's LRN sees 48 (conv1) and 128 (conv2) channels: its own maps only.
    assert inter["LRN_0"]["__call__"][0].shape[-1] == 48
    assert inter["LRN_1"]["__call__"][0].shape[-1] == 128


@pytest.mark.parametrize("size, pad", [(224, 3), (227, 0), (96, 3), (99, 0)])
def test_conv1_padding_rule(size, pad):
    # cuda-convnet: ceil((size-11)/4)+1 output positions, the far edge padded to fit.
    out = int(np.ceil((size - 11) / 4)) + 1
    assert conv1_padding(size) == ((0, pad), (0, pad))
    assert (size + pad - 11) // 4 + 1 == out


def lrn_reference(a, k, n, alpha, beta):
    """The paper's formula, channel by channel, in float64."""
    a = np.asarray(a, np.float64)
    N = a.shape[-1]
    b = np.empty_like(a)
    for i in range(N):
        lo, hi = max(0, i - n // 2), min(N - 1, i + n // 2)
        s = np.sum(a[..., lo : hi + 1] ** 2, axis=-1)
        b[..., i] = a[..., i] / (k + alpha * s) ** beta
    return b


@pytest.mark.parametrize("convention", ["paper", "alpha_over_n"])
@pytest.mark.parametrize("alpha", [1e-4, 0.05])
def test_lrn_matches_float64_reference(convention, alpha):
    rng = np.random.default_rng(0)
    a = np.maximum(rng.normal(0, 40, size=(2, 3, 4, 48)), 0).astype(np.float32)  # post-ReLU
    got = np.asarray(LRN(alpha=alpha, convention=convention).apply({}, jnp.asarray(a)), np.float64)
    eff = alpha if convention == "paper" else alpha / 5
    want = lrn_reference(a, 2.0, 5, eff, 0.75)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)
    # Edges of a tower by hand: channel 0 sums channels 0..2, channel 47 sums 45..47.
    x = a[0, 0, 0]
    np.testing.assert_allclose(got[0, 0, 0, 0], x[0] / (2 + eff * np.sum(x[0:3] ** 2.0)) ** 0.75, rtol=2e-6)
    np.testing.assert_allclose(got[0, 0, 0, 1], x[1] / (2 + eff * np.sum(x[0:4] ** 2.0)) ** 0.75, rtol=2e-6)
    np.testing.assert_allclose(got[0, 0, 0, 46], x[46] / (2 + eff * np.sum(x[44:48] ** 2.0)) ** 0.75, rtol=2e-6)
    np.testing.assert_allclose(got[0, 0, 0, 47], x[47] / (2 + eff * np.sum(x[45:48] ** 2.0)) ** 0.75, rtol=2e-6)


def test_lrn_conventions_differ_by_n():
    a = jnp.full((1, 1, 1, 8), 30.0)
    paper = LRN().apply({}, a)
    caffe = LRN(convention="alpha_over_n", alpha=5e-4).apply({}, a)  # alpha/n with alpha=5*1e-4
    np.testing.assert_allclose(paper, caffe, rtol=1e-6)


@pytest.fixture(scope="module")
def paper_variables():
    x = jnp.zeros((1, 224, 224, 3))
    return jax.jit(AlexNet().init)(jax.random.key(42), x)


def test_initialisation_statistics(paper_variables):
    p = paper_variables["params"]["towers"]
    bias_one = {"conv2", "conv4", "conv5", "fc6", "fc7"}
    for layer, leaves in p.items():
        w = np.asarray(leaves["kernel"], np.float64)
        for t in range(2):
            wt = w[t].ravel()
            n = wt.size
            # Sampling error of the mean and of the std of n normal draws with sigma 0.01.
            assert abs(wt.mean()) < 5 * 0.01 / np.sqrt(n), layer
            assert abs(wt.std() - 0.01) < 5 * 0.01 / np.sqrt(2 * n), layer
            # Gaussian, not merely std 0.01: P(|w| < sigma) = 0.6827 for a normal.
            frac = np.mean(np.abs(wt) < 0.01)
            assert abs(frac - 0.6827) < 5 * np.sqrt(0.6827 * 0.3173 / n), layer
        assert not np.allclose(w[0], w[1]), f"{layer}: towers must start from different weights"
        b = np.asarray(leaves["bias"])
        np.testing.assert_array_equal(b, 1.0 if layer in bias_one else 0.0, err_msg=layer)


def test_tower_one_weights_do_not_reach_tower_zero_conv2(paper_variables):
    x = jax.random.normal(jax.random.key(1), (2, 224, 224, 3))
    m = AlexNet()

    @jax.jit
    def conv2_and_conv3(v):
        _, st = m.apply(v, x, capture_intermediates=True, mutable=["intermediates"])
        t = st["intermediates"]["towers"]
        return t["conv2"]["__call__"][0], t["conv3"]["__call__"][0]

    v2 = jax.tree_util.tree_map(lambda a: a, paper_variables)
    tp = dict(v2["params"]["towers"])
    for layer in ("conv1", "conv2"):
        k = tp[layer]["kernel"]
        tp[layer] = dict(tp[layer], kernel=k.at[1].set(k[1] * -3.0 + 0.01))
    v2 = {"params": {"towers": tp}}
    c2a, c3a = conv2_and_conv3(paper_variables)
    c2b, c3b = conv2_and_conv3(v2)
    np.testing.assert_array_equal(c2a[0], c2b[0])  # tower 0's conv2: untouched
    assert not np.allclose(c2a[1], c2b[1])  # tower 1's conv2 did change
    assert not np.allclose(c3a[0], c3b[0])  # and tower 0 hears of it at conv3


def test_dropout_is_active_only_in_training(paper_variables):
    m = AlexNet()
    x = jax.random.normal(jax.random.key(3), (4, 224, 224, 3))
    f = jax.jit(lambda v, k, train: m.apply(v, x, train=train, rngs={"dropout": k}), static_argnums=2)
    a, b = f(paper_variables, jax.random.key(0), False), f(paper_variables, jax.random.key(1), False)
    np.testing.assert_array_equal(a, b)
    c, d = f(paper_variables, jax.random.key(0), True), f(paper_variables, jax.random.key(1), True)
    assert not np.allclose(c, d)


def dropout_masks_via_fc7(model, variables, x, key):
    """Read fc6's dropout masks: fc6 outputs 1 everywhere, fc7 copies its tower's fc6 units."""
    tp = dict(variables["params"]["towers"])
    T, units = tp["fc6"]["bias"].shape
    tp["fc6"] = {"kernel": jnp.zeros_like(tp["fc6"]["kernel"]), "bias": jnp.ones((T, units))}
    eye = np.eye(T * units, dtype=np.float32)
    tp["fc7"] = {
        "kernel": jnp.asarray(np.stack([eye[:, t * units : (t + 1) * units] for t in range(T)])),
        "bias": jnp.zeros((T, units)),
    }
    _, st = model.apply(
        {"params": {"towers": tp}},
        x,
        train=True,
        rngs={"dropout": key},
        capture_intermediates=True,
        mutable=["intermediates"],
    )
    return st["intermediates"]["towers"]["fc7"]["__call__"][0]  # (T, N, units) = mask / keep


def test_dropout_masks_rate_scale_and_independence():
    m = AlexNet(width=0.25, image_size=64, num_classes=10, dropout=0.5)
    x = jnp.ones((16, 64, 64, 3))  # identical examples: only the masks tell them apart
    v = jax.jit(m.init)(jax.random.key(0), x)
    masks = np.asarray(jax.jit(lambda v, k: dropout_masks_via_fc7(m, v, x, k))(v, jax.random.key(9)))
    assert set(np.unique(masks)) == {0.0, 2.0}  # inverted dropout: kept units scaled by 1/0.5
    kept = masks.mean() / 2.0
    assert abs(kept - 0.5) < 5 * np.sqrt(0.25 / masks.size)
    assert not np.array_equal(masks[0], masks[1])  # towers draw their own masks
    assert len({m_.tobytes() for m_ in masks[0]}) == masks.shape[1]  # every example its own
    again = np.asarray(jax.jit(lambda v, k: dropout_masks_via_fc7(m, v, x, k))(v, jax.random.key(9)))
    np.testing.assert_array_equal(masks, again)  # same key, same masks


def test_config_roundtrip_and_errors():
    cfg = default_config()
    assert from_config(cfg) == AlexNet()
    cfg.towers = 1
    assert from_config(cfg).towers == 1
    paper = default_config().to_dict()
    bad = {
        "lrm": ("Unknown model config key", {"lrm": False}),
        "towers": ("must divide by model.towers=3", {"towers": 3}),
        "classes": ("divisible", {"num_classes": 999}),
        "activation": ("activation", {"activation": "gelu"}),
        "lrn": ("lrn_convention", {"lrn_convention": "caffe"}),
        "dropout": ("dropout must be in", {"dropout": 1.0}),
        "size": ("too small", {"image_size": 40}),
        "width": ("width must be > 0", {"width": 0.0}),
    }
    for _what, (msg, override) in bad.items():
        with pytest.raises(ConfigError, match=msg):
            from_config({**paper, **override})
    from_config({**paper, "image_size": 67})  # the smallest input whose maps survive 3 pools
    with pytest.raises(ValueError, match=r"\(N, 224, 224, 3\)"):
        shapes_of(AlexNet(), size=227)


def _valid_taps(size, kernel, stride, pad_lo, out):
    """Per-dimension count of kernel taps that land on the image (not on padding)."""
    o = np.arange(out)[:, None] * stride - pad_lo + np.arange(kernel)[None, :]
    return int(((o >= 0) & (o < size)).sum())


def test_model_flops_match_xla_cost_analysis():
    """The hand count behind the benchmark's matmul share (summary.flops_per_image: every
    weight once per output position) vs XLA's own count of the compiled forward pass.
    XLA skips taps that fall on zero padding, so the test removes those by hand first."""
    from alexnet_jax.model import tower_widths
    from alexnet_jax.summary import flops_per_image, layer_rows

    for model in (AlexNet(), AlexNet(towers=1)):
        w = tower_widths(model.towers, 1.0, 1000)
        T = model.towers
        geometry = {  # layer: (input size, kernel, stride, pad before, input channels per tower)
            "conv1": (224, 11, 4, 0, 3),
            "conv2": (27, 5, 1, 2, w["conv1"]),
            "conv3": (13, 3, 1, 1, T * w["conv2"]),
            "conv4": (13, 3, 1, 1, w["conv3"]),
            "conv5": (13, 3, 1, 1, w["conv4"]),
        }
        xla_style = 0
        for r in layer_rows(model):
            if r["layer"] in geometry:
                size, k, s, pad, cin = geometry[r["layer"]]
                out = r["per_tower"][0]
                xla_style += 2 * _valid_taps(size, k, s, pad, out) ** 2 * cin * T * r["per_tower"][-1]
            else:
                xla_style += 2 * r["macs"]
        x = jnp.zeros((1, 224, 224, 3))
        v = jax.eval_shape(model.init, jax.random.key(0), x)
        cost = jax.jit(lambda v, x: model.apply(v, x)).lower(v, x).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        assert abs(cost["flops"] - xla_style) / xla_style < 0.01, (cost["flops"], xla_style)
        assert flops_per_image(model, train=True) == 3 * flops_per_image(model, train=False)
    assert flops_per_image(AlexNet(), train=False) == 2 * 724_406_816  # the familiar 724M multiply-adds


@pytest.mark.slow  # bfloat16 compiles slowly on CPU; its program is checked by test_lrn_runs_in_float32_under_bfloat16
def test_bfloat16_compute_keeps_float32_parameters_and_close_logits():
    model = AlexNet(width=0.125, image_size=64, num_classes=10, init_std=0.03)
    x = 50.0 * jax.random.normal(jax.random.key(1), (4, 64, 64, 3))
    v = jax.jit(model.init)(jax.random.key(0), x)
    v16 = jax.jit(model.clone(dtype="bfloat16").init)(jax.random.key(0), x)
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(v16))
    jax.tree_util.tree_map(np.testing.assert_array_equal, v, v16)  # same initial parameters
    a = model.apply(v, x)
    b = model.clone(dtype="bfloat16").apply(v, x)
    assert b.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) < 0.05
    with pytest.raises(ConfigError, match="model.dtype"):
        from_config({"dtype": "float16"})


def test_lrn_runs_in_float32_under_bfloat16():
    """The program, not just its output: under bfloat16 compute, LRN's sum of squares and its power
    are float32 (the README's promise), and everything else around them is bfloat16."""
    model = AlexNet(width=0.125, image_size=64, num_classes=10, dtype="bfloat16")
    x = jnp.zeros((2, 64, 64, 3))
    v = jax.eval_shape(model.init, jax.random.key(0), x)
    jaxpr = jax.make_jaxpr(model.apply)(v, x)

    def eqns(j):
        for e in j.eqns:
            yield e
            for sub in jax.extend.core.jaxprs_in_params(e.params):
                yield from eqns(sub)

    sums = [e for e in eqns(jaxpr.jaxpr) if e.primitive.name == "reduce_window_sum"]
    assert len(sums) == 2  # conv1's and conv2's LRN (both towers at once under vmap)
    assert all(e.outvars[0].aval.dtype == jnp.float32 for e in sums)
    convs = [e for e in eqns(jaxpr.jaxpr) if e.primitive.name == "conv_general_dilated"]
    assert convs and all(e.outvars[0].aval.dtype == jnp.bfloat16 for e in convs)
