"""The paper's ablations, as config overrides, checked on the activations they change.

Every check compares what the network computed against an independent NumPy
computation from the paper's definitions (the paper's Sections 3.1, 3.3, 3.4
and 4.2), made from tensors read out of the same forward pass:

* ``lrn``: the tensor that goes into pooling after conv1/conv2 is relu(conv)
  exactly with ``lrn=False``, and the paper's LRN of it (k=2, n=5, alpha=1e-4,
  beta=0.75, float64, within each tower's channels) with ``lrn=True``;
* ``pool_window``/``pool_stride``: map sizes worked out by hand for 3/2 and 2/2
  pooling at a 228 input (where they differ), and the pooled values against a
  NumPy max-pool of the pre-pool activations;
* ``activation``: every hidden layer's output is tanh (or relu) of its input;
* ``dropout`` on fc7: masks with rate 1/2, kept units scaled by 2, drawn per
  tower and per example, independent of fc6's, and absent in eval mode.

Activations are read with a method interceptor that sows, into the
``intermediates`` collection, the input and output of every conv/dense/LRN
layer and of ``Tower._pool`` (the one place pooling happens).
"""

import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax import default_config, from_config
from alexnet_jax.model import BIAS_ONE_LAYERS, LRN, Tower
from alexnet_jax.tower_ops import TowerConv, TowerDense

WIDTH = 0.125  # per tower: conv 6-16-24-24-16, fc 256-256

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configs import ablations  # noqa: E402  the variants the runner (alexnet_jax.ablate) trains


def variant(name):
    """The ``model.*`` overrides of the named ablation in ``configs/ablations.py``."""
    return {k.split(".", 1)[1]: v for k, v in ablations.VARIANTS[name].items() if k.startswith("model.")}


def build(**overrides):
    """The network a run config with these ``model.*`` overrides builds."""
    cfg = {**default_config().to_dict(), "width": WIDTH, "num_classes": 10, **overrides}
    return from_config(cfg)


def _probe(next_fun, args, kwargs, context):
    """Sow each layer's input and output, and each pooling's input and output."""
    out = next_fun(*args, **kwargs)
    mod, name = context.module, context.method_name
    if (name == "__call__" and isinstance(mod, (TowerConv, TowerDense, LRN))) or (
        name == "_pool" and isinstance(mod, Tower)
    ):
        mod.sow("intermediates", f"{name}:in", args[0])
        mod.sow("intermediates", f"{name}:out", out)
    return out


_COMPILED = {}


def forward(model, variables, x, train=False, key=None):
    """Run the net; return the logits and the tower intermediates as float64 NumPy
    (leading axis of every intermediate = tower)."""
    key = jax.random.key(0) if key is None else key
    cache_key = (repr(model), train)  # one compiled program per network and mode
    if cache_key not in _COMPILED:

        def run(v, x, k):
            with nn.intercept_methods(_probe):
                logits, st = model.apply(v, x, train=train, rngs={"dropout": k}, mutable=["intermediates"])
            return logits, st["intermediates"]["towers"]

        _COMPILED[cache_key] = jax.jit(run)
    logits, inter = _COMPILED[cache_key](variables, x, key)
    return np.asarray(logits), jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), inter)


def layer(inter, name, io="out"):
    """(towers, N, ...) input or output of layer ``name``'s computation."""
    return inter[name][f"__call__:{io}"][0]


def pools(inter, io):
    """The three max-pool inputs/outputs (after conv1, conv2, conv5), each (towers, N, H, W, C)."""
    assert "_pool:in" in inter, "pooling is expected to happen in Tower._pool"
    got = inter[f"_pool:{io}"]
    assert len(got) == 3
    return got


def images(size, n=2, seed=1, scale=50.0):
    # Mean-subtracted pixels are tens of units: large enough that LRN changes the maps.
    return scale * jax.random.normal(jax.random.key(seed), (n, size, size, 3))


def init(model, x, seed=0):
    """Parameters drawn as the paper does (weights N(0, init_std^2), biases init_bias in
    conv2/4/5 and fc6/7, 0 elsewhere), in NumPy: compiling model.init takes 15-25 s on CPU."""
    shapes = jax.eval_shape(model.init, jax.random.key(seed), x)["params"]["towers"]
    rng = np.random.default_rng(seed)
    params = {}
    for name, leaves in shapes.items():
        bias = model.init_bias if name in BIAS_ONE_LAYERS else 0.0
        params[name] = {
            "kernel": jnp.asarray(rng.normal(0.0, model.init_std, leaves["kernel"].shape), jnp.float32),
            "bias": jnp.full(leaves["bias"].shape, bias, jnp.float32),
        }
    return {"params": {"towers": params}}


# --- Independent references ------------------------------------------------------------


def np_relu(a):
    return np.maximum(a, 0.0)


def np_lrn(a, k=2.0, n=5, alpha=1e-4, beta=0.75):
    """Section 3.3, literally: b_i = a_i / (k + alpha * sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a_j^2)^beta,
    over the last axis (one tower's channels), in float64."""
    a = np.asarray(a, np.float64)
    N = a.shape[-1]
    b = np.empty_like(a)
    for i in range(N):
        lo, hi = max(0, i - n // 2), min(N - 1, i + n // 2)
        b[..., i] = a[..., i] / (k + alpha * np.sum(a[..., lo : hi + 1] ** 2, axis=-1)) ** beta
    return b


def np_max_pool(a, window, stride):
    """Max over each window x window patch at stride ``stride``, no padding; a is (..., H, W, C)."""
    H, W = a.shape[-3:-1]
    Ho, Wo = (H - window) // stride + 1, (W - window) // stride + 1
    out = np.empty(a.shape[:-3] + (Ho, Wo, a.shape[-1]), a.dtype)
    for i in range(Ho):
        for j in range(Wo):
            patch = a[..., i * stride : i * stride + window, j * stride : j * stride + window, :]
            out[..., i, j, :] = patch.max(axis=(-3, -2))
    return out


# --- LRN ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lrn_runs():
    """The same parameters and images through lrn=True (both conventions) and lrn=False."""
    x = images(64)
    runs = {}
    for key, over in {
        "paper": {},
        "alpha_over_n": {"lrn_convention": "alpha_over_n"},
        "off": variant("no_lrn"),
    }.items():
        m = build(image_size=64, init_std=0.03, **over)
        v = init(m, x) if not runs else runs["paper"][0]
        runs[key] = (v, forward(m, v, x)[1])
    return runs


def test_no_lrn_pools_the_relu_output_untouched(lrn_runs):
    _, inter = lrn_runs["off"]
    assert not any(k.startswith("LRN") for k in inter)  # no normalisation layer at all
    pool_in = pools(inter, "in")
    for i, conv in enumerate(("conv1", "conv2")):
        relu = np_relu(layer(inter, conv))
        np.testing.assert_array_equal(pool_in[i], relu, err_msg=conv)  # exactly, not approximately
        # And the pooled map the next layer reads is the max-pool of relu(conv) itself.
        np.testing.assert_array_equal(inter[f"{conv}_pooled"][0], np_max_pool(relu, 3, 2), err_msg=conv)


@pytest.mark.parametrize("convention, alpha", [("paper", 1e-4), ("alpha_over_n", 1e-4 / 5)])
def test_lrn_pools_the_papers_normalisation_of_the_relu_output(lrn_runs, convention, alpha):
    _, inter = lrn_runs[convention]
    pool_in = pools(inter, "in")
    for i, conv in enumerate(("conv1", "conv2")):
        relu = np_relu(layer(inter, conv))  # (towers, N, H, W, C): C = one tower's channels
        assert relu.shape[0] == 2 and relu.shape[-1] == {"conv1": 6, "conv2": 16}[conv]
        want = np_lrn(relu, alpha=alpha)  # channel sums stay inside each tower
        np.testing.assert_allclose(pool_in[i], want, rtol=2e-6, atol=1e-6, err_msg=conv)
        # The check can tell: LRN changed these maps by far more than the tolerance,
        nz = relu > 1.0
        assert np.median(1 - want[nz] / relu[nz]) > 0.01, conv
        # the other convention would not pass,
        other = np_lrn(relu, alpha=1e-4 / 5 if convention == "paper" else 1e-4)
        assert np.max(np.abs(other - want) / (np.abs(want) + 1e-6)) > 1e-3, conv
        # and neither would sums over both towers' channels (at the towers' common edge).
        both = np.concatenate([relu[0], relu[1]], axis=-1)
        across = np_lrn(both, alpha=alpha)[..., : relu.shape[-1]]
        assert np.max(np.abs(across - want[0]) / (np.abs(want[0]) + 1e-6)) > 1e-3, conv
    # conv5 has no LRN: its pooling input is relu(conv5) exactly.
    np.testing.assert_array_equal(pool_in[2], np_relu(layer(inter, "conv5")))


def test_lrn_changes_only_what_follows_it(lrn_runs):
    """Same parameters, same images: conv1's pre-activation is identical with and without LRN,
    and the maps after conv2's pooling are not."""
    on, off = lrn_runs["paper"][1], lrn_runs["off"][1]
    np.testing.assert_array_equal(layer(on, "conv1"), layer(off, "conv1"))
    assert not np.allclose(on["conv1_pooled"][0], off["conv1_pooled"][0], rtol=1e-3)
    assert not np.allclose(on["conv2_pooled"][0], off["conv2_pooled"][0], rtol=1e-3)


# --- Pooling --------------------------------------------------------------------------

# Worked by hand for a 228 input. conv1 (11x11, stride 4) places ceil((228-11)/4)+1 = 56
# windows (the far edge padded by 55*4+11-228 = 3). convs 2-5 keep the size (padding k//2).
# A z x z pool at stride s gives floor((H-z)/s)+1:
#   3/2 (overlapping):     56 -> 27,  27 -> 13,  13 -> 6
#   2/2 (non-overlapping): 56 -> 28,  28 -> 14,  14 -> 7
POOL_SIZES_228 = {
    (3, 2): {"conv1": 56, "conv1_pooled": 27, "conv2_pooled": 13, "conv5_pooled": 6},
    (2, 2): {"conv1": 56, "conv1_pooled": 28, "conv2_pooled": 14, "conv5_pooled": 7},
}


@pytest.mark.parametrize("name", ["baseline", "pool_2x2"])
def test_pooling_sizes_and_values(name):
    m = build(image_size=228, init_std=0.03, **variant(name))
    window, stride = m.pool_window, m.pool_stride
    x = images(228)
    v = init(m, x)
    _, inter = forward(m, v, x)
    sizes = POOL_SIZES_228[(window, stride)]
    assert layer(inter, "conv1").shape[2:4] == (sizes["conv1"],) * 2
    for name in ("conv1_pooled", "conv2_pooled", "conv5_pooled"):
        assert inter[name][0].shape[2:4] == (sizes[name],) * 2, name
    # Between pools the convs keep the size: conv2 reads conv1's pool, conv5 conv2's.
    assert layer(inter, "conv2").shape[2:4] == (sizes["conv1_pooled"],) * 2
    assert layer(inter, "conv5").shape[2:4] == (sizes["conv2_pooled"],) * 2
    # fc6 reads all conv5 features of both towers: 2 towers x 16 maps x s x s.
    s = sizes["conv5_pooled"]
    assert v["params"]["towers"]["fc6"]["kernel"].shape == (2, 2 * 16 * s * s, 256)
    assert layer(inter, "fc6", "in").shape == (2, 2, 2 * 16 * s * s)

    pool_in, pool_out = pools(inter, "in"), pools(inter, "out")
    for i, name in enumerate(("conv1_pooled", "conv2_pooled", "conv5_pooled")):
        want = np_max_pool(pool_in[i], window, stride)
        np.testing.assert_array_equal(pool_out[i], want, err_msg=name)  # a max is exact
        np.testing.assert_array_equal(inter[name][0], want, err_msg=name)  # and is what is passed on
        # The other pooling would give other values (not merely other sizes) on these maps.
        other = np_max_pool(pool_in[i], 5 - window, stride)
        n = min(other.shape[2], want.shape[2])
        assert not np.array_equal(other[:, :, :n, :n], want[:, :, :n, :n]), name


# --- Activation -----------------------------------------------------------------------


def _pre_and_post_activations(inter):
    """(pre-activation, post-activation) of every hidden layer, read at layer boundaries
    (run with lrn=False, so the tensors going into pooling are post-activation)."""
    pool_in = pools(inter, "in")
    return {
        "conv1": (layer(inter, "conv1"), pool_in[0]),
        "conv2": (layer(inter, "conv2"), pool_in[1]),
        "conv3": (layer(inter, "conv3"), layer(inter, "conv4", "in")),
        "conv4": (layer(inter, "conv4"), layer(inter, "conv5", "in")),
        "conv5": (layer(inter, "conv5"), pool_in[2]),
        "fc6": (layer(inter, "fc6"), inter["fc6_act"][0]),
        "fc7": (layer(inter, "fc7"), inter["fc7_act"][0]),
    }


@pytest.mark.parametrize("name", ["tanh", "baseline"])
def test_activation_is_the_one_asked_for(name):
    # Biases 0 and wide weights: every layer's pre-activations have both signs and reach
    # where tanh bends (at init, bias 1 keeps conv4/conv5 all positive).
    m = build(image_size=64, lrn=False, init_std=0.1, init_bias=0.0, **variant(name))
    activation = m.activation
    x = images(64)
    logits, inter = forward(m, init(m, x), x)
    ref = {"tanh": np.tanh, "relu": np_relu}[activation]
    for name, (pre, post) in _pre_and_post_activations(inter).items():
        assert (pre < -0.1).mean() > 0.05, name  # relu would zero these, tanh would not
        assert np.max(np.abs(np.tanh(pre) - pre)) > 0.05, name  # tanh is not the identity here
        np.testing.assert_allclose(post, ref(pre), rtol=1e-6, atol=1e-6, err_msg=name)
        if activation == "tanh":
            assert post.min() < -0.1, name  # relu would leave nothing negative
    # fc8 has no activation: the logits are fc8's output as it is.
    fc8 = layer(inter, "fc8")  # (towers, N, classes per tower); class = tower * 5 + j
    np.testing.assert_allclose(logits, np.concatenate([fc8[0], fc8[1]], axis=-1), rtol=1e-6, atol=1e-6)


# --- Dropout in fc7 -------------------------------------------------------------------


def masks_of_fc6_and_fc7(model, variables, x, key, train=True):
    """Make fc6 and fc7 output 1 everywhere (zero kernels, unit biases); then fc7's input is
    fc6's dropout mask / keep and fc8's input is fc7's, both gathered over the towers.
    Returns two (towers, N, units) arrays: tower t's masks for each example."""
    tp = dict(variables["params"]["towers"])
    for name in ("fc6", "fc7"):
        tp[name] = {"kernel": jnp.zeros_like(tp[name]["kernel"]), "bias": jnp.ones_like(tp[name]["bias"])}
    _, inter = forward(model, {"params": {"towers": tp}}, x, train=train, key=key)
    out = []
    for reader in ("fc7", "fc8"):
        gathered = layer(inter, reader, "in")  # (towers, N, towers * units): the same on every tower
        np.testing.assert_array_equal(gathered[0], gathered[1])
        T, N, TU = gathered.shape
        out.append(gathered[0].reshape(N, T, TU // T).transpose(1, 0, 2))
    return out


@pytest.fixture(scope="module")
def dropout_net():
    m = build(image_size=64, dropout=0.5)
    x = jnp.ones((16, 64, 64, 3))  # identical examples: only the masks tell them apart
    return m, init(m, x), x


def test_fc7_dropout_masks_rate_scale_and_independence(dropout_net):
    m, v, x = dropout_net
    fc6, fc7 = masks_of_fc6_and_fc7(m, v, x, jax.random.key(9))
    T, N, units = fc7.shape
    assert (T, N, units) == (2, 16, 256)
    assert set(np.unique(fc7)) == {0.0, 2.0}  # inverted dropout: kept units scaled by 1/0.5
    five_sigma = 5 * np.sqrt(0.25 / fc7.size)
    assert abs((fc7 == 2.0).mean() - 0.5) < five_sigma  # rate one half
    # Towers draw their own masks, each example its own, and fc7's are not fc6's:
    # two independent rate-1/2 masks agree on half their units.
    assert abs((fc7[0] == fc7[1]).mean() - 0.5) < 5 * np.sqrt(0.25 / fc7[0].size)
    assert len({row.tobytes() for row in fc7.reshape(T * N, units)}) == T * N
    assert abs((fc7 == fc6).mean() - 0.5) < five_sigma
    # The same key gives the same masks; another key other masks.
    again = masks_of_fc6_and_fc7(m, v, x, jax.random.key(9))[1]
    np.testing.assert_array_equal(fc7, again)
    other = masks_of_fc6_and_fc7(m, v, x, jax.random.key(10))[1]
    assert abs((fc7 == other).mean() - 0.5) < five_sigma


def test_fc7_dropout_scales_the_real_activations(dropout_net):
    """With the network's own weights, what fc8 reads is 0 or 2 x fc7's activation."""
    m, v, x = dropout_net
    x = images(64, n=16, seed=3)
    _, inter = forward(m, v, x, train=True, key=jax.random.key(4))
    act = inter["fc7_act"][0]  # (towers, N, units)
    T, N, units = act.shape
    read = layer(inter, "fc8", "in")[0].reshape(N, T, units).transpose(1, 0, 2)
    kept = np.isclose(read, 2.0 * act, rtol=1e-6, atol=0)
    dropped = read == 0.0
    assert np.all(kept | dropped)
    live = act > 0  # (bias 1 at init: fc7's units are alive)
    assert live.mean() > 0.9
    assert abs(kept[live].mean() - 0.5) < 5 * np.sqrt(0.25 / live.sum())


@pytest.mark.parametrize("train, rate", [(False, 0.5), (True, 0.0)])
def test_no_fc7_dropout_in_eval_mode_or_at_rate_zero(dropout_net, train, rate):
    m, v, x = dropout_net
    fc6, fc7 = masks_of_fc6_and_fc7(m.clone(dropout=rate), v, x, jax.random.key(9), train=train)
    np.testing.assert_array_equal(fc6, 1.0)
    np.testing.assert_array_equal(fc7, 1.0)


def test_one_tower_and_no_dropout_variants_change_what_they_name():
    """one_tower: footnote 2's one-GPU net at full size (59,798,312 parameters, against the paper
    net's 60,965,224); no_dropout: training-mode logits equal evaluation-mode ones, where the
    baseline's differ."""
    from alexnet_jax import count_params

    full = default_config().to_dict()
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    counts = {
        name: count_params(jax.eval_shape(from_config({**full, **variant(name)}).init, jax.random.key(0), x))
        for name in ("baseline", "one_tower")
    }
    assert counts == {"baseline": 60_965_224, "one_tower": 59_798_312}
    x = images(64)
    for name, same in (("no_dropout", True), ("baseline", False)):
        m = build(image_size=64, init_std=0.03, **variant(name))
        v = init(m, x)
        train = forward(m, v, x, train=True, key=jax.random.key(5))[0]
        assert np.array_equal(train, forward(m, v, x)[0]) is same, name
