"""Eval-mode logits of the network against an independent float64 NumPy reference of the paper's net.

The reference is written from the paper (Section 3, Figure 2) as ONE network with
grouped convolutions, the way Figure 2 reads when the two GPUs are drawn side by side
(and the way Caffe's ``group: 2`` wrote it), not as a tower function run twice:

* conv1 (11x11, stride 4) and conv3 (3x3, pad 1) are ordinary convolutions over all input
  channels: conv1 sees the image, conv3 sees both towers' conv2 maps;
* conv2 (5x5, pad 2), conv4 and conv5 (3x3, pad 1) are grouped convolutions with
  ``groups = towers``: output block t is computed from input block t only;
* ReLU -> LRN -> max-pool 3/2 after conv1 and conv2, LRN summing over the channels of one
  group (tower) with the sum clipped at the group's edges; ReLU -> max-pool after conv5;
* fc6, fc7, fc8 are ordinary dense layers over all units; no ReLU on fc8; no dropout at
  test time (the model uses inverted dropout: scaling by 2 in training is equivalent to the paper's x0.5 at test).

Everything is NumPy float64: convolutions as explicit sliding windows (``sliding_window_view``)
contracted with ``einsum``, max-pooling as a max over windows, LRN as the paper's sum,
channel by channel. Nothing from ``alexnet_jax.model`` is called except to build the network
and the shapes of its parameter tree; the parameters are our own random draws, copied into
the model and re-arranged into the whole-net arrays (a tower-stacked kernel ``(T, ..., O)``
becomes the whole-net/grouped kernel ``(..., T*O)`` by putting the towers' output blocks side
by side).

Conventions the paper does not fix, pinned here (the model's documented layout):

* Tower order: in every whole-net activation, tower t owns the t-th contiguous block of
  channels/units. conv3's kernel and the fc7/fc8 kernels read their inputs in that order.
* Classes: class index ``k = t * (num_classes // towers) + j`` is output ``j`` of tower ``t``'s
  fc8 (tower 0 scores the first half of the classes).
* fc6 flatten order: the pooled conv5 map ``(N, H, W, C)``, C = both towers' channels in tower
  order, flattened row-major in (H, W, C) order, i.e. fc6 kernel row
  ``r = (h * W + w) * C + c`` (the NHWC layout's own order; Caffe/PyTorch's C, H, W order is
  the alternative and must fail).
* conv1 padding (as cuda-convnet): cuda-convnet's ``ceil((S - 11) / 4) + 1`` windows, zeros added at the
  bottom and right edges only (224 -> pad 3 -> 55).
* LRN (Section 3.3): k=2, n=5, alpha=1e-4, beta=0.75, alpha not divided by n
  (``'paper'``, the default); ``'alpha_over_n'`` divides it by n.

The weights are drawn so that every difference above shows: activations of order 10-100
make LRN clearly nonlinear (its denominator reaches 1.5-4.5 k, not ~k; checked), all biases
are nonzero and differ between towers, and the logits take both signs (checked).

Tolerance: the model computes in float32, the reference in float64, so the difference is the
model's float32 round-off. Each layer is a sum of K <= 9216 products (fc6); with unit
round-off u = 6e-8 the relative error of one such sum is about u*sqrt(K) <= 6e-6 in
practice (u*K = 5.5e-4 is the worst-case bound, never reached with random signs), and eight
layers compound it to a few 1e-6 of the logits' scale (measured: 0.6e-6 to 1.2e-6 for the nets
below). We require ``max|model - reference| <= 1e-4 * max|reference|``: about 100x above
the round-off measured, and about 1000x below what a wiring or ordering mistake does (LRN
after pooling, conv1 padded top/left, fc6 flattened C,H,W, the towers' classes swapped, a
ReLU on fc8: each moves the logits by 11% to 107% of their scale, measured).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from alexnet_jax.model import AlexNet

TOL = 1e-4  # max abs error allowed, as a fraction of max |reference logit| (see the docstring)
LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")


# --- The reference, in float64 NumPy ----------------------------------------------------------


def conv2d(x_NHWC, w_HWIO, stride, pads, groups):
    """Convolution (cross-correlation, as every framework) with zero padding ``pads =
    ((top, bottom), (left, right))``; ``groups`` splits input and output channels into that
    many contiguous blocks, block g of the output seeing block g of the input only."""
    kh, kw, cin_g, cout = w_HWIO.shape
    assert x_NHWC.shape[-1] == cin_g * groups and cout % groups == 0
    x = np.pad(x_NHWC, ((0, 0), pads[0], pads[1], (0, 0)))
    win = sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]  # (N, Ho, Wo, C, kh, kw)
    cout_g = cout // groups
    blocks = []
    for g in range(groups):
        patches = win[..., g * cin_g : (g + 1) * cin_g, :, :]
        kernel = w_HWIO[..., g * cout_g : (g + 1) * cout_g]
        blocks.append(np.einsum("nhwcij,ijco->nhwo", patches, kernel, optimize=True))
    return np.concatenate(blocks, axis=-1)


def max_pool(x_NHWC, z, s):
    """Max over z x z windows placed every s pixels, no padding (55 -> 27 -> 13 -> 6 for 3/2)."""
    return sliding_window_view(x_NHWC, (z, z), axis=(1, 2))[:, ::s, ::s].max(axis=(-2, -1))


def lrn(a, groups, alpha, k=2.0, n=5, beta=0.75, stats=None):
    """Section 3.3, literally: b[i] = a[i] / (k + alpha * sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a[j]^2)^beta,
    with N the channels of one tower (group): the sum never crosses into the other tower."""
    per = a.shape[-1] // groups
    b = np.empty_like(a)
    for g in range(groups):
        off = g * per
        for i in range(per):
            lo, hi = max(0, i - n // 2), min(per - 1, i + n // 2)
            denom = k + alpha * np.sum(a[..., off + lo : off + hi + 1] ** 2, axis=-1)
            b[..., off + i] = a[..., off + i] / denom**beta
            if stats is not None:
                stats.append(float(denom.max() / k))
    return b


def relu(x):
    return np.maximum(x, 0.0)


def whole_net(params_towers):
    """Tower-stacked parameters -> whole-net float64 arrays: towers' output blocks side by side."""
    return {
        name: {
            leaf: np.concatenate(list(np.asarray(v, np.float64)), axis=-1) for leaf, v in params_towers[name].items()
        }
        for name in LAYERS
    }


def reference_logits(p, images, towers, lrn_on=True, lrn_convention="paper", pool=(3, 2), trace=None):
    """The paper's net, whole, on float64 copies of the weights ``p`` (from ``whole_net``)."""
    T = towers
    alpha = 1e-4 if lrn_convention == "paper" else 1e-4 / 5
    trace = {} if trace is None else trace
    trace.update(sizes=[], lrn_denominator_over_k=[])

    def norm(x):
        return lrn(x, T, alpha, stats=trace["lrn_denominator_over_k"]) if lrn_on else x

    def conv(x, name, stride, pads, groups):
        y = conv2d(x, p[name]["kernel"], stride, pads, groups) + p[name]["bias"]
        trace["sizes"].append(y.shape[1])
        return y

    def pooled(x):
        y = max_pool(x, *pool)
        trace["sizes"].append(y.shape[1])
        return y

    x = np.asarray(images, np.float64)
    S = x.shape[1]
    windows = -(-(S - 11) // 4) + 1  # cuda-convnet: ceil((S - 11) / 4) + 1 positions
    pad = (windows - 1) * 4 + 11 - S  # zeros at the bottom / right only
    x = pooled(norm(relu(conv(x, "conv1", 4, ((0, pad), (0, pad)), groups=1))))  # image -> both towers
    x = pooled(norm(relu(conv(x, "conv2", 1, ((2, 2), (2, 2)), groups=T))))  # own tower only
    x = relu(conv(x, "conv3", 1, ((1, 1), (1, 1)), groups=1))  # both towers' conv2 maps
    x = relu(conv(x, "conv4", 1, ((1, 1), (1, 1)), groups=T))  # own tower only
    x = pooled(relu(conv(x, "conv5", 1, ((1, 1), (1, 1)), groups=T)))  # own tower only
    n, H, W, C = x.shape
    w6 = p["fc6"]["kernel"].reshape(H, W, C, -1)  # row (h * W + w) * C + c: the (H, W, C) flatten
    x = relu(np.einsum("nhwc,hwco->no", x, w6) + p["fc6"]["bias"])
    x = relu(x @ p["fc7"]["kernel"] + p["fc7"]["bias"])
    return x @ p["fc8"]["kernel"] + p["fc8"]["bias"]  # class t*K/T + j = tower t's output j; no ReLU


# --- Weights, model run, comparison --------------------------------------------------------------


def draw_params(model, images, seed):
    """Our own random parameters in the model's tree: weights N(0, g^2 / fan_in), biases
    N(0, 1) (nonzero, different in each tower); g = 1 for conv1 and sqrt(2) (He) elsewhere,
    so with pixel-scale input (std 50) activations stay of order 10-100 through the net."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(images.shape, jnp.float32))
    rng = np.random.default_rng(seed)
    towers = {}
    for name in LAYERS:
        k_shape = shapes["params"]["towers"][name]["kernel"].shape  # (T, ..., in, out)
        b_shape = shapes["params"]["towers"][name]["bias"].shape
        fan_in = int(np.prod(k_shape[1:-1]))
        gain = 1.0 if name == "conv1" else np.sqrt(2.0)
        towers[name] = {
            "kernel": (rng.standard_normal(k_shape, dtype=np.float32) * np.float32(gain / np.sqrt(fan_in))),
            "bias": rng.standard_normal(b_shape, dtype=np.float32),
        }
    return {"params": {"towers": towers}}


def compare(model, n, seed, **ref_kwargs):
    rng = np.random.default_rng(seed + 1000)
    images = (50.0 * rng.standard_normal((n, model.image_size, model.image_size, 3))).astype(np.float32)
    variables = draw_params(model, images, seed)
    got = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.asarray(images)), np.float64)
    trace = {}
    want = reference_logits(
        whole_net(variables["params"]["towers"]),
        images,
        model.towers,
        lrn_on=model.lrn,
        lrn_convention=model.lrn_convention,
        pool=(model.pool_window, model.pool_stride),
        trace=trace,
        **ref_kwargs,
    )
    assert got.shape == want.shape == (n, model.num_classes)
    # The draw exercises what the test is for: logits of both signs (a ReLU on fc8 shows),
    # and an LRN that is far from a constant scale (its place relative to pooling shows).
    assert (want < 0).mean() > 0.2 and (want > 0).mean() > 0.2
    if model.lrn:
        assert max(trace["lrn_denominator_over_k"]) > 1.3, trace["lrn_denominator_over_k"]
    scale = np.max(np.abs(want))
    err = np.max(np.abs(got - want)) / scale
    assert err <= TOL, f"max |model - reference| = {err:.3g} of max |logit| ({scale:.3g}); tolerance {TOL}"
    return trace, err


def test_paper_net_full_size_matches_reference():
    """The paper's two-tower net as published: 224x224 input, 1000 classes."""
    trace, _ = compare(AlexNet(), n=2, seed=0)
    # The reference's own geometry is the paper's: 224 -> 55 -> 27 -> 27 -> 13 -> 13 x3 -> 6.
    assert trace["sizes"] == [55, 27, 27, 13, 13, 13, 13, 6]


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"lrn_convention": "alpha_over_n"},
        {"pool_window": 2, "pool_stride": 2},
    ],
    ids=["paper", "lrn_alpha_over_n", "pool_2x2_stride_2"],
)
def test_narrow_paper_net_matches_reference(variant):
    """Two towers at 1/8 width (6-16-24-24-16 channels, fc 256 per tower), 128x128 input
    (conv1 padding 3 at the bottom/right), 10 classes; and two of the paper's ablations."""
    model = AlexNet(width=0.125, image_size=128, num_classes=10, **variant)
    trace, _ = compare(model, n=3, seed=1)
    assert trace["sizes"][:2] == [31, 15]


def test_one_tower_net_matches_reference():
    """The paper's one-GPU net (footnote 2), at half width: conv 24-64-96-96-128, fc 2048, 10 classes."""
    model = AlexNet(towers=1, width=0.5, image_size=128, num_classes=10)
    compare(model, n=3, seed=2)


def test_one_tower_net_full_size_matches_reference():
    """The one-GPU net at full size: conv 48-128-192-192-256, fc 4096-4096-1000, 224 input."""
    trace, _ = compare(AlexNet(towers=1), n=2, seed=3)
    assert trace["sizes"] == [55, 27, 27, 13, 13, 13, 13, 6]
