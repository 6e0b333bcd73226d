"""AlexNet (Krizhevsky, Sutskever & Hinton, 2012) as the paper drew it: two towers.

The network is written once, as ONE tower's computation; where the paper's GPUs
talked (the inputs of conv3, fc6, fc7 and fc8) it calls the exchanges of
``alexnet_jax.axes``. Under ``flax.linen.vmap`` one device runs all towers; under
``jax.shard_map`` (``alexnet_jax.parallel``) each device can run its own. Tower
parameters are stacked on a leading axis of size ``towers``, so one parameter tree
serves every layout. How each operation is computed is ``ops`` (``tower_ops``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from alexnet_jax.axes import TOWER_AXIS, Axes
from alexnet_jax.errors import ConfigError
from alexnet_jax.tower_ops import OPS, TowerOps, divide_by_power, resolve

ACTIVATIONS = {"relu": nn.relu, "tanh": jnp.tanh}  # tanh: the saturating unit of Section 3.1
# The choice fields; from_config checks them, the forward pass trusts them.
CHOICES = {
    "activation": tuple(ACTIVATIONS),
    "lrn_convention": ("paper", "alpha_over_n"),
    "lrn_scope": ("tower", "layer"),
    "dtype": ("float32", "bfloat16"),
    "ops": ("auto", *OPS),
}


_TWO_TOWER_CONV = (96, 256, 384, 384, 256)  # whole-net widths of the two-tower net (Section 3.5, Figure 2)
_ONE_TOWER_CONV = (48, 128, 192, 192, 256)  # footnote 2's one-GPU net: every conv layer halved but the last
_FC = (4096, 4096)  # fc6 and fc7 in both nets
BIAS_ONE_LAYERS = ("conv2", "conv4", "conv5", "fc6", "fc7")  # biases initialised to 1 (Section 5); others 0
CONV_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")
FC_LAYERS = ("fc6", "fc7", "fc8")
LAYERS = CONV_LAYERS + FC_LAYERS


def whole_net_widths(towers: int, conv_widths: tuple = (), fc_widths: tuple = ()) -> tuple[tuple, tuple]:
    """conv1..conv5 and fc6, fc7 widths summed over towers; empty: the paper's (footnote 2's for one tower)."""
    conv = tuple(conv_widths) or (_ONE_TOWER_CONV if towers == 1 else _TWO_TOWER_CONV)
    return conv, tuple(fc_widths) or _FC


def tower_widths(
    towers: int, width: float, num_classes: int, conv_widths: tuple = (), fc_widths: tuple = ()
) -> dict[str, int]:
    """Output width of each layer within one tower (``from_config`` has checked that they divide)."""
    conv, fc = whole_net_widths(towers, conv_widths, fc_widths)
    scaled = [max(1, int(round(w // towers * width))) for w in conv + fc]
    return dict(zip(LAYERS, scaled + [num_classes // towers]))


def conv1_padding(size: int, kernel: int = 11, stride: int = 4, pad: int = -1) -> tuple[tuple[int, int], ...]:
    """conv1's (low, high) zero padding of rows and of columns.

    ``pad=-1``: cuda-convnet's ceil((size - kernel) / stride) + 1 windows, the far edge
    padded as needed (224 and 227 crops both give 55x55); ``pad >= 0``: that many
    zeros on every side (torchvision's AlexNet: 2).
    """
    if pad >= 0:
        return ((pad, pad),) * 2
    out = -(-(size - kernel) // stride) + 1
    return ((0, (out - 1) * stride + kernel - size),) * 2


class LRN(nn.Module):
    """Section 3.3: ``b[i] = a[i] / (k + alpha' * sum_{|j-i| <= n//2} a[j]^2) ** beta`` over existing channels.

    ``convention``: ``alpha' = alpha`` as printed ('paper'), or ``alpha / n`` as cuda-convnet,
    Caffe and PyTorch ('alpha_over_n'). ``halo``: the neighbouring towers' edge channels, for
    Caffe's LRN over the whole layer; without it the sum stays in the tower, as on the paper's GPUs.
    """

    k: float = 2.0
    n: int = 5
    alpha: float = 1e-4
    beta: float = 0.75
    convention: str = "paper"
    divide: Callable[[jax.Array, jax.Array, float], jax.Array] = divide_by_power  # x / base**beta

    @nn.compact
    def __call__(self, x_NHWC: jax.Array, halo: tuple[jax.Array, jax.Array] | None = None, act=None) -> jax.Array:
        alpha, half = {"paper": self.alpha, "alpha_over_n": self.alpha / self.n}[self.convention], self.n // 2

        def normalise(x, halo):  # in float32 whatever x's dtype; returned in x's
            a = (x if act is None else act(x)).astype(jnp.float32)  # act: the layer's, recomputed with LRN
            squares, pad = jnp.square(a), (half, half)
            if halo is not None:  # the neighbours' channels instead of zeros
                squares, pad = jnp.concatenate([jnp.square(halo[0]), squares, jnp.square(halo[1])], axis=-1), (0, 0)
            window_sum = jax.lax.reduce_window(
                squares, 0.0, jax.lax.add, (1, 1, 1, 2 * half + 1), (1, 1, 1, 1), ((0, 0), (0, 0), (0, 0), pad)
            )
            return self.divide(a, self.k + alpha * window_sum, self.beta).astype(x.dtype)

        return jax.lax.optimization_barrier(jax.checkpoint(normalise)(x_NHWC, halo))  # remat; out in x's dtype


class _Fields(nn.Module):
    """The network's fields, which each tower shares: the ``model.*`` config fields."""

    towers: int = 2  # 2: the paper's two-GPU net; 1: its one-GPU comparison net; K: the 2-tower widths split K ways
    conv_widths: tuple[int, ...] = ()  # conv1..conv5 maps, whole net (summed over towers); () = the paper's
    fc_widths: tuple[int, ...] = ()  # fc6, fc7 units, whole net; () = the paper's 4096, 4096
    conv1_pad: int = -1  # conv1 zero padding: -1 = cuda-convnet's (far edge, as needed); n = n on every side
    lrn: bool = True  # local response normalisation after conv1 and conv2 (Section 3.3)
    lrn_convention: str = "paper"  # 'paper' (alpha as printed) or 'alpha_over_n'
    lrn_k: float = 2.0  # LRN's additive constant k (Section 3.3: 2; Caffe's bvlc_alexnet: 1)
    lrn_scope: str = "tower"  # LRN's channel window within each 'tower' (the paper's GPUs) or the whole 'layer' (Caffe)
    pool_window: int = 3  # max-pool window z (Section 3.4; 3: overlapping; 2 with stride 2: not)
    pool_stride: int = 2  # max-pool stride s
    dropout: float = 0.5  # dropout rate in fc6 and fc7 (Section 4.2)
    activation: str = "relu"  # 'relu' or 'tanh' (the saturating unit of the paper's Section 3.1)
    num_classes: int = 1000  # split evenly between the towers' fc8
    width: float = 1.0  # multiplier on every layer's width except fc8
    image_size: int = 224  # input crops are image_size x image_size x 3 (Section 4.1: 224)
    init_std: float = 0.01  # weights ~ N(0, init_std^2) (Section 5)
    init_bias: float = 1.0  # bias of conv2, conv4, conv5, fc6, fc7 (others 0; Section 5)
    dtype: str = "float32"  # compute dtype: 'float32', or 'bfloat16' (parameters stay float32)
    ops: str | TowerOps = "auto"  # how each op is computed: 'auto' (by the devices), 'fast', 'plain'; or a bundle


# The `model` section of a run config: AlexNet's fields.
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(_Fields) if f.name not in ("parent", "name"))


class Tower(_Fields):
    """One tower, run under the named axis ``axes.tower_name``: its share of the class scores.

    ``dropout_key`` is the same on every tower and device; masks are derived from it
    per tower and per *global* example, so they do not depend on the device layout.
    """

    deterministic: bool = True
    axes: Axes = Axes()

    def _act(self, x):
        return ACTIVATIONS[self.activation](x)

    def _pool(self, x):
        return resolve(self.ops).max_pool(x, self.pool_window, self.pool_stride)

    def _lrn(self, x, layer):
        """``layer``'s activation, then LRN in float32 (the two recomputed for the backward pass); or over the layer."""
        if not self.lrn:
            return self._act(x)
        norm = LRN(k=self.lrn_k, convention=self.lrn_convention, divide=resolve(self.ops).lrn_divide)
        if self.lrn_scope == "layer" and self.towers > 1:  # the halo is exchanged outside the recomputation
            return norm(y := self._act(x), self.axes.neighbour_channels(y.astype(jnp.float32), norm.n // 2, layer))
        return norm(x, act=ACTIVATIONS[self.activation])

    def _layer(self, name):
        """Section 5's initialisation: weights N(0, init_std^2), biases init_bias or 0."""
        bias = self.init_bias if name in BIAS_ONE_LAYERS else 0.0
        return dict(
            kernel_init=nn.initializers.normal(stddev=self.init_std),
            bias_init=nn.initializers.constant(bias),
            dtype=self.dtype,
            name=name,
        )

    def _conv(self, name, features, k, stride=1, padding=None):
        pad = ((k // 2, k // 2),) * 2 if padding is None else padding
        return resolve(self.ops).conv(features, (k, k), strides=(stride, stride), padding=pad, **self._layer(name))

    def _dense(self, name, features):
        return resolve(self.ops).dense(self.axes.units_here(features), **self._layer(name))

    def _dropout(self, x, key, layer):
        if self.deterministic or self.dropout == 0.0:
            return x
        if key is None:
            raise ValueError("Training with dropout needs rngs={'dropout': key}.")
        keep, (n, here) = 1.0 - self.dropout, x.shape
        key = jax.random.fold_in(jax.random.fold_in(key, layer), jax.lax.axis_index(self.axes.tower_name))
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(self.axes.first_example(n) + jnp.arange(n))
        units = here if self.axes.fc_units is None else here * jax.lax.axis_size(self.axes.fc_units)
        mask = self.axes.own_units(jax.vmap(lambda k: jax.random.bernoulli(k, keep, (units,)))(keys), here)
        # Inverted dropout: scaling by 1/keep now equals the paper's x0.5 at test time.
        return jnp.where(mask, x / keep, 0.0).astype(x.dtype)

    @nn.compact
    def __call__(self, images_NHWC: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        w = tower_widths(self.towers, self.width, self.num_classes, self.conv_widths, self.fc_widths)
        ax = self.axes
        pad = conv1_padding(images_NHWC.shape[1], pad=self.conv1_pad)
        x = self._conv("conv1", w["conv1"], 11, stride=4, padding=pad)(images_NHWC)
        x = self._pool(self._lrn(x, "conv1"))
        self.sow("intermediates", "conv1_pooled", x)
        x = self._conv("conv2", w["conv2"], 5)(x)  # own tower only
        x = self._pool(self._lrn(x, "conv2"))
        self.sow("intermediates", "conv2_pooled", x)
        x = ax.exchange(x, "conv3")  # conv3 sees both towers' conv2 maps
        x = self._act(self._conv("conv3", w["conv3"], 3)(x))
        x = self._act(self._conv("conv4", w["conv4"], 3)(x))  # own tower only
        x = self._pool(self._act(self._conv("conv5", w["conv5"], 3)(x)))  # own tower only
        self.sow("intermediates", "conv5_pooled", x)
        x = ax.examples_to_fc(x)
        x = ax.exchange(x, "fc6").reshape(x.shape[0], -1)  # fc6 sees all conv5 features
        x = self._act(self._dense("fc6", w["fc6"])(x))
        self.sow("intermediates", "fc6_act", x)
        x = ax.exchange(ax.all_units(self._dropout(x, dropout_key, 6), "fc7"), "fc7")  # fc7 sees all fc6 units
        x = self._act(self._dense("fc7", w["fc7"])(x))
        self.sow("intermediates", "fc7_act", x)  # the paper's Figure 4 features
        x = ax.exchange(ax.all_units(self._dropout(x, dropout_key, 7), "fc8"), "fc8")  # fc8 sees all fc7 units
        # This tower's class scores, float32 for the softmax (taken over all towers' scores).
        return self._dense("fc8", w["fc8"])(x).astype(jnp.float32)


class AlexNet(_Fields):
    """The paper's network; ``AlexNet()`` is the two-tower ImageNet net, ``from_config`` checks the fields."""

    @nn.compact
    def __call__(self, images_NHWC: jax.Array, train: bool = False, axes: Axes = Axes()) -> jax.Array:
        """Logits ``(N, num_classes)``: class ``tower * (num_classes // towers) + j`` is a tower's j-th score.

        ``axes`` (set by ``alexnet_jax.parallel`` inside ``shard_map``) says which mesh
        axes carry the towers, the examples and the FC units; the logits are then this
        device's block, ``(n, towers here * classes here)``.
        """
        s = self.image_size
        if images_NHWC.shape[1:] != (s, s, 3):
            raise ValueError(
                f"AlexNet expects NHWC images of shape (N, {s}, {s}, 3) "
                f"(model.image_size={s}); got {images_NHWC.shape}."
            )
        key = self.make_rng("dropout") if (train and self.dropout > 0) else None
        # On one device vmap creates the tower axis; where the mesh has it, a vmap of size 1
        # only keeps the stacked parameter layout.
        towers = nn.vmap(
            Tower,
            variable_axes={"params": 0, "intermediates": 0},
            split_rngs={"params": True},
            in_axes=(None, None),
            out_axes=1,
            axis_size=1 if axes.tower else self.towers,
            axis_name=None if axes.tower else TOWER_AXIS,
        )
        fields = {name: getattr(self, name) for name in CONFIG_FIELDS}
        scores_NTK = towers(**fields, deterministic=not train, axes=axes, name="towers")(images_NHWC, key)
        return scores_NTK.reshape(scores_NTK.shape[0], -1)


def default_config() -> ml_collections.ConfigDict:
    """The ``model`` section of a run config: the paper's net."""
    return ml_collections.ConfigDict({name: getattr(AlexNet(), name) for name in CONFIG_FIELDS})


def from_config(cfg: ml_collections.ConfigDict | dict) -> AlexNet:
    """The network a ``model`` config section describes; ``ConfigError`` naming the field if it cannot be built."""
    items = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
    unknown = sorted(set(items) - set(CONFIG_FIELDS))
    if unknown:
        raise ConfigError(f"Unknown model config key(s) {unknown}; known keys: {list(CONFIG_FIELDS)}.")
    for field in ("conv_widths", "fc_widths"):  # lists from JSON (a saved config) hash as tuples
        if field in items:
            items[field] = tuple(items[field])
    model = AlexNet(**items)
    for field, allowed in CHOICES.items():
        if not isinstance(getattr(model, field), TowerOps) and getattr(model, field) not in allowed:
            raise ConfigError(
                f"model.{field} must be {' or '.join(map(repr, allowed))}, got {getattr(model, field)!r}."
            )
    _check_widths(model)
    _check_sizes(model)
    return model


def _check_widths(m: AlexNet) -> None:
    if not (isinstance(m.towers, int) and m.towers >= 1):
        raise ConfigError(f"model.towers must be an integer >= 1, got {m.towers!r}.")
    conv, fc = whole_net_widths(m.towers, m.conv_widths, m.fc_widths)
    if len(conv) != 5 or len(fc) != 2:
        raise ConfigError(
            f"model.conv_widths needs 5 widths (conv1..conv5) and model.fc_widths 2 (fc6, fc7); "
            f"got {m.conv_widths} and {m.fc_widths}."
        )
    for field, widths in (("conv_widths", conv), ("fc_widths", fc)):
        if any(w % m.towers for w in widths):
            raise ConfigError(
                f"model.{field}={widths} must divide by model.towers={m.towers}: "
                "each tower computes an equal share of every layer."
            )
    if m.num_classes % m.towers:
        raise ConfigError(
            f"model.num_classes={m.num_classes} must be divisible by model.towers={m.towers}: "
            "each tower's fc8 computes an equal share of the class scores."
        )
    if not m.width > 0:
        raise ConfigError(f"model.width must be > 0, got {m.width}.")
    w = tower_widths(m.towers, m.width, m.num_classes, m.conv_widths, m.fc_widths)
    if m.lrn_scope == "layer" and m.towers > 1 and min(w["conv1"], w["conv2"]) < 2:
        raise ConfigError("model.lrn_scope='layer' needs at least 2 conv1/conv2 maps per tower; raise model.width.")


def _check_sizes(m: AlexNet) -> None:
    if not m.lrn_k > 0:
        raise ConfigError(f"model.lrn_k must be > 0, got {m.lrn_k}.")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {m.dropout}.")
    if m.pool_window < 1 or m.pool_stride < 1:
        raise ConfigError(f"model.pool_window and pool_stride must be >= 1, got {m.pool_window}/{m.pool_stride}.")
    size = (m.image_size + sum(conv1_padding(m.image_size, pad=m.conv1_pad)[0]) - 11) // 4 + 1  # < 1: < 11x11
    for _ in ("after conv1", "after conv2", "after conv5"):  # convs 2-5 keep the size
        if size < m.pool_window:
            raise ConfigError(
                f"model.image_size={m.image_size} is too small: a feature map shrinks "
                f"below the {m.pool_window}x{m.pool_window} pooling window."
            )
        size = (size - m.pool_window) // m.pool_stride + 1


def count_params(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def layer_param_counts(params: Any) -> dict[str, int]:
    """Parameters per layer, summed over towers."""
    tower_params = params["params"]["towers"] if "params" in params else params["towers"]
    return {name: count_params(tower_params[name]) for name in LAYERS}
