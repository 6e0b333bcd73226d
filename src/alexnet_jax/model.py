"""AlexNet (Krizhevsky, Sutskever & Hinton, 2012) as the paper drew it: two towers.

The network is written once, as the computation of ONE tower. The places where
the paper's two GPUs talked (the input of conv3 and the inputs of fc6, fc7 and
fc8) are named-axis collectives over the axis ``'tower'``: an ``all_gather``
along channels. The same tower function then runs

* on one device, both towers at once, under ``flax.linen.vmap`` with
  ``axis_name='tower'`` (this is what ``AlexNet.apply`` does), and
* on a ``('data', 'tower')`` mesh under ``jax.shard_map``, each device running
  its own tower on its own slice of the batch (``alexnet_jax.parallel``).

Tower parameters are stacked on a leading axis of size ``towers``, so one
parameter tree serves every layout. With ``towers=1`` (the paper's one-GPU
comparison net) the exchanges are skipped. How each convolution, matmul and
pooling is computed (per backend by default) is the ``ops`` field; see
``alexnet_jax.tower_ops``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from alexnet_jax.tower_ops import OPS, TowerOps, divide_by_power, resolve

TOWER_AXIS = "tower"  # the mesh axis of the towers layout, and the towers' axis inside the network
# The `model` section of a run config: AlexNet's fields.
CONFIG_FIELDS = (
    "towers", "conv_widths", "fc_widths", "conv1_pad", "lrn", "lrn_convention", "lrn_k", "lrn_scope", "pool_window", "pool_stride", "dropout",
    "activation", "num_classes", "width", "image_size", "init_std", "init_bias", "dtype", "ops",
)
_CHOICES = {"activation": ("relu", "tanh"), "lrn_convention": ("paper", "alpha_over_n"),
            "lrn_scope": ("tower", "layer"), "dtype": ("float32", "bfloat16"), "ops": tuple(OPS)}


class ConfigError(ValueError):
    """A model config field has a value the network cannot be built with."""


# Whole-net widths of the paper's two-tower net (Section 3.5, Figure 2).
_TWO_TOWER_CONV = (96, 256, 384, 384, 256)
# fc6 and fc7, whole-net, in both nets: footnote 2's one-GPU net keeps them (and conv5) whole.
_FC = (4096, 4096)
# Footnote 2: the one-GPU net halves the kernels of every conv layer except the last.
_ONE_TOWER_CONV = (48, 128, 192, 192, 256)

# Layers whose biases the paper initialises to 1 (Section 5); the others get 0.
BIAS_ONE_LAYERS = ("conv2", "conv4", "conv5", "fc6", "fc7")
LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")


def _split(widths: tuple[int, ...], towers: int, field: str) -> list[int]:
    if any(w % towers for w in widths):
        raise ConfigError(f"model.{field}={tuple(widths)} must divide by model.towers={towers}: "
                          "each tower computes an equal share of every layer.")
    return [w // towers for w in widths]


def tower_widths(towers: int, width: float, num_classes: int, conv_widths: tuple = (),
                 fc_widths: tuple = ()) -> dict[str, int]:
    """Output width of each layer within one tower.

    ``conv_widths`` (5) and ``fc_widths`` (2) are whole-net widths, summed over
    towers; empty means the paper's: the two-tower net's 96/256/384/384/256 and
    4096/4096, split evenly over any number of towers >= 2, and for
    ``towers=1`` footnote 2's one-GPU net, 48/128/192/192/256 and 4096/4096.
    """
    if not (isinstance(towers, int) and towers >= 1):
        raise ConfigError(f"model.towers must be an integer >= 1, got {towers!r}.")
    conv = tuple(conv_widths) or (_ONE_TOWER_CONV if towers == 1 else _TWO_TOWER_CONV)
    fc = tuple(fc_widths) or _FC
    if len(conv) != 5 or len(fc) != 2:
        raise ConfigError(f"model.conv_widths needs 5 widths (conv1..conv5) and model.fc_widths 2 (fc6, fc7); "
                          f"got {tuple(conv_widths)} and {tuple(fc_widths)}.")
    per_tower = _split(conv, towers, "conv_widths") + _split(fc, towers, "fc_widths")
    if not width > 0:
        raise ConfigError(f"model.width must be > 0, got {width}.")
    if num_classes % towers:
        raise ConfigError(
            f"model.num_classes={num_classes} must be divisible by model.towers={towers}: "
            "each tower's fc8 computes an equal share of the class scores."
        )
    scaled = [max(1, int(round(w * width))) for w in per_tower]
    return dict(zip(LAYERS, scaled + [num_classes // towers]))


def conv1_padding(size: int, kernel: int = 11, stride: int = 4, pad: int = -1) -> tuple[tuple[int, int], ...]:
    """conv1's (low, high) zero padding of rows and of columns.

    ``pad=-1``: at the bottom/right only, so that conv1 covers the image as
    cuda-convnet did: it placed ceil((size - kernel) / stride) + 1 windows, padding
    the far edge as needed: a 224 crop gives 55x55 (as if it were 227 with no
    padding); a 227 crop needs no padding and also gives 55x55.
    ``pad >= 0``: that many zeros on every side (torchvision's AlexNet: 2, also 55x55 at 224).
    """
    if size < kernel:
        raise ConfigError(f"model.image_size={size} is smaller than conv1's {kernel}x{kernel} kernel.")
    if pad >= 0:
        return ((pad, pad),) * 2
    out = -(-(size - kernel) // stride) + 1
    return ((0, (out - 1) * stride + kernel - size),) * 2


class LRN(nn.Module):
    """Local response normalisation across channels (Section 3.3).

    ``b[i] = a[i] / (k + alpha' * sum_{j=i-n//2}^{i+n//2} a[j]^2) ** beta`` with the sum
    clipped to existing channels. ``convention='paper'`` (default) takes the
    paper's formula literally: ``alpha' = alpha``. ``convention='alpha_over_n'``
    uses ``alpha' = alpha / n`` as cuda-convnet, Caffe and PyTorch do. The sum
    runs over the channels of the array it is given: called inside a tower it
    never reaches the other tower's maps, as on the paper's GPUs. ``halo``, the
    ``n // 2`` channels on each side that belong to the neighbouring towers (zeros
    at the layer's edges), extends the sum across the tower boundary, as Caffe's
    LRN over the whole layer does.
    """

    k: float = 2.0
    n: int = 5
    alpha: float = 1e-4
    beta: float = 0.75
    convention: str = "paper"
    divide: Callable[[jax.Array, jax.Array, float], jax.Array] = divide_by_power  # x / base**beta

    @nn.compact
    def __call__(self, x_NHWC: jax.Array, halo: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        if self.convention not in _CHOICES["lrn_convention"]:
            raise ConfigError(
                f"model.lrn_convention must be 'paper' or 'alpha_over_n', got {self.convention!r}.")
        alpha = self.alpha if self.convention == "paper" else self.alpha / self.n
        half = self.n // 2
        squares, pad = jnp.square(x_NHWC), (half, half)
        if halo is not None:  # the neighbours' channels instead of zeros
            squares, pad = jnp.concatenate([jnp.square(halo[0]), squares, jnp.square(halo[1])], axis=-1), (0, 0)
        window_sum = jax.lax.reduce_window(squares, 0.0, jax.lax.add, (1, 1, 1, 2 * half + 1),
                                           (1, 1, 1, 1), ((0, 0), (0, 0), (0, 0), pad))
        return self.divide(x_NHWC, self.k + alpha * window_sum, self.beta)


def _neighbour_channels(x: jax.Array, half: int, layer: str) -> tuple[jax.Array, jax.Array]:
    """The ``half`` channels either side of this tower's, from the neighbouring towers (zeros at the ends).

    A small exchange (``2 * half`` channels from every tower), named
    ``lrn_halo_<layer>`` in the lowered program; only LRN over the whole layer needs it.
    """
    with jax.named_scope(f"lrn_halo_{layer}"):
        edges = jax.lax.all_gather(jnp.concatenate([x[..., :half], x[..., -half:]], axis=-1), TOWER_AXIS)
    t, last = jax.lax.axis_index(TOWER_AXIS), edges.shape[0] - 1
    left = jnp.where(t > 0, edges[jnp.maximum(t - 1, 0)][..., half:], 0.0)  # the previous tower's last
    right = jnp.where(t < last, edges[jnp.minimum(t + 1, last)][..., :half], 0.0)  # the next tower's first
    return left, right


def _exchange(x: jax.Array, towers: int, to_layer: str) -> jax.Array:
    """The towers swap activations: every tower gets all towers' channels.

    Named ``exchange_to_<layer>`` in the lowered program, where tests look for it.
    """
    if towers == 1:
        return x
    with jax.named_scope(f"exchange_to_{to_layer}"):
        return jax.lax.all_gather(x, TOWER_AXIS, axis=x.ndim - 1, tiled=True)


class _Fields(nn.Module):
    """The network's fields, which each tower shares: the ``model.*`` config fields."""

    towers: int = 2  # 2: the paper's two-GPU net; 1: its one-GPU comparison net; K: the 2-tower widths split K ways
    conv_widths: tuple[int, ...] = ()  # conv1..conv5 maps, whole net (summed over towers); () = the paper's
    fc_widths: tuple[int, ...] = ()  # fc6, fc7 units, whole net; () = the paper's 4096, 4096
    conv1_pad: int = -1  # conv1 zero padding: -1 = cuda-convnet's (far edge, as needed); n = n on every side
    lrn: bool = True  # local response normalisation after conv1 and conv2
    lrn_convention: str = "paper"  # 'paper' (alpha as printed) or 'alpha_over_n'
    lrn_k: float = 2.0  # LRN's additive constant k (the paper: 2; Caffe's bvlc_alexnet: 1)
    lrn_scope: str = "tower"  # LRN's channel window: within each 'tower' (the paper's GPUs) or the whole 'layer' (Caffe)
    pool_window: int = 3  # max-pool window z (3: overlapping; 2 with stride 2: not)
    pool_stride: int = 2  # max-pool stride s
    dropout: float = 0.5  # dropout rate in fc6 and fc7
    activation: str = "relu"  # 'relu' or 'tanh' (the saturating unit of the paper's Section 3.1)
    num_classes: int = 1000  # split evenly between the towers' fc8
    width: float = 1.0  # multiplier on every layer's width except fc8
    image_size: int = 224  # input crops are image_size x image_size x 3
    init_std: float = 0.01  # weights ~ N(0, init_std^2)
    init_bias: float = 1.0  # bias of conv2, conv4, conv5, fc6, fc7 (others 0)
    dtype: str = "float32"  # compute dtype: 'float32', or 'bfloat16' (parameters stay float32)
    ops: str | TowerOps = "auto"  # how each op is computed (tower_ops.OPS): 'auto' (per backend), 'fast', 'plain'; or a bundle


class Tower(_Fields):
    """One tower of the network; run it under a named axis ``'tower'``.

    Returns this tower's share of the class scores, ``(N, num_classes // towers)``.
    ``dropout_key`` is the same on every tower and every data shard; masks are
    derived from it per tower and per *global* example index, so they do not
    depend on how the batch or the towers are laid out on devices.
    """

    deterministic: bool = True
    data_axis: str | None = None  # the named axis the batch of the FC layers is split over, if any
    gather_batch_axis: str | None = None  # hybrid layout: gather the batch over this axis before fc6
    units_axis: str | None = None  # hybrid layout: the FC layers' units are split over this axis

    def _act(self, x):
        if self.activation not in _CHOICES["activation"]:
            raise ConfigError(f"model.activation must be 'relu' or 'tanh', got {self.activation!r}.")
        return nn.relu(x) if self.activation == "relu" else jnp.tanh(x)

    def _pool(self, x):
        return resolve(self.ops).max_pool(x, self.pool_window, self.pool_stride)

    def _lrn(self, x, layer):
        """LRN after ``layer``'s ReLU, in float32 whatever the compute dtype; over the whole layer if asked."""
        if not self.lrn:
            return x
        norm = LRN(k=self.lrn_k, convention=self.lrn_convention, divide=resolve(self.ops).lrn_divide)
        y = x.astype(jnp.float32)
        across = self.lrn_scope == "layer" and self.towers > 1
        halo = _neighbour_channels(y, norm.n // 2, layer) if across else None
        return norm(y, halo).astype(x.dtype)

    def _layer(self, name):
        """Section 5's initialisation: weights N(0, init_std^2), biases init_bias or 0."""
        bias = self.init_bias if name in BIAS_ONE_LAYERS else 0.0
        return dict(kernel_init=nn.initializers.normal(stddev=self.init_std),
                    bias_init=nn.initializers.constant(bias), dtype=self.dtype, name=name)

    def _conv(self, name, features, k, stride=1, padding=None):
        pad = ((k // 2, k // 2),) * 2 if padding is None else padding
        return resolve(self.ops).conv(features, (k, k), strides=(stride, stride), padding=pad, **self._layer(name))

    def _dense(self, name, features):
        """An FC layer; with ``units_axis``, this device's share of its units (kernel columns)."""
        if self.units_axis is not None:
            devices = jax.lax.axis_size(self.units_axis)
            if features % devices:
                raise ConfigError(f"{name}'s {features} units per tower do not split over {devices} devices "
                                  "(the hybrid layout splits every FC layer's units, fc8's classes too).")
            features //= devices
        return resolve(self.ops).dense(features, **self._layer(name))

    def _gather(self, x, axis_name, axis, scope):
        """All devices' ``x`` along ``axis`` over mesh axis ``axis_name`` (named ``scope`` in the program)."""
        if axis_name is None:
            return x
        with jax.named_scope(scope):
            return jax.lax.all_gather(x, axis_name, axis=axis, tiled=True)

    def _dropout(self, x, key, layer):
        if self.deterministic or self.dropout == 0.0:
            return x
        if key is None:
            raise ValueError("Training with dropout needs rngs={'dropout': key}.")
        keep = 1.0 - self.dropout
        n = x.shape[0]
        first = 0 if self.data_axis is None else jax.lax.axis_index(self.data_axis) * n
        tower = jax.lax.axis_index(TOWER_AXIS)
        key = jax.random.fold_in(jax.random.fold_in(key, layer), tower)
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(first + jnp.arange(n))
        units = x.shape[-1] * (1 if self.units_axis is None else jax.lax.axis_size(self.units_axis))
        mask = jax.vmap(lambda k: jax.random.bernoulli(k, keep, (units,)))(keys)
        if self.units_axis is not None:  # this device's units of the mask every layout draws
            mask = jax.lax.dynamic_slice_in_dim(mask, jax.lax.axis_index(self.units_axis) * x.shape[-1],
                                                x.shape[-1], axis=1)
        # Inverted dropout: scaling by 1/keep now equals the paper's x0.5 at test time.
        return jnp.where(mask, x / keep, 0.0).astype(x.dtype)

    @nn.compact
    def __call__(self, images_NHWC: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        w = tower_widths(self.towers, self.width, self.num_classes, self.conv_widths, self.fc_widths)
        T = self.towers
        pad = conv1_padding(images_NHWC.shape[1], pad=self.conv1_pad)
        x = self._conv("conv1", w["conv1"], 11, stride=4, padding=pad)(images_NHWC)
        x = self._pool(self._lrn(self._act(x), "conv1"))
        self.sow("intermediates", "conv1_pooled", x)
        x = self._conv("conv2", w["conv2"], 5)(x)  # own tower only
        x = self._pool(self._lrn(self._act(x), "conv2"))
        self.sow("intermediates", "conv2_pooled", x)
        x = _exchange(x, T, "conv3")  # conv3 sees both towers' conv2 maps
        x = self._act(self._conv("conv3", w["conv3"], 3)(x))
        x = self._act(self._conv("conv4", w["conv4"], 3)(x))  # own tower only
        x = self._pool(self._act(self._conv("conv5", w["conv5"], 3)(x)))  # own tower only
        self.sow("intermediates", "conv5_pooled", x)
        x = self._gather(x, self.gather_batch_axis, 0, "batch_to_fc6")  # hybrid: the FC layers see every example
        x = _exchange(x, T, "fc6").reshape(x.shape[0], -1)  # fc6 sees all conv5 features
        x = self._act(self._dense("fc6", w["fc6"])(x))
        self.sow("intermediates", "fc6_act", x)
        x = self._gather(self._dropout(x, dropout_key, 6), self.units_axis, 1, "units_to_fc7")  # hybrid
        x = _exchange(x, T, "fc7")  # fc7 sees all fc6 units
        x = self._act(self._dense("fc7", w["fc7"])(x))
        self.sow("intermediates", "fc7_act", x)  # the paper's Figure 4 features
        x = self._gather(self._dropout(x, dropout_key, 7), self.units_axis, 1, "units_to_fc8")  # hybrid
        x = _exchange(x, T, "fc8")  # fc8 sees all fc7 units
        # This tower's class scores, float32 for the softmax (taken over all towers' scores).
        return self._dense("fc8", w["fc8"])(x).astype(jnp.float32)


class AlexNet(_Fields):
    """The paper's network. ``AlexNet()`` is the two-tower ImageNet net.

    Attributes are the ``model.*`` config fields (see ``default_config``); ``ops``
    says how the operations are computed: 'auto' (the default: XLA:CPU's fast
    forms on CPU, grouped convolutions and select-and-scatter elsewhere), 'fast',
    'plain', or a ``tower_ops.TowerOps`` bundle. Same maths, same parameters.
    ``model.init(key, images)`` returns the parameters of all towers, stacked on
    a leading axis of size ``towers``; ``model.apply(variables, images_NHWC,
    train=False)`` returns logits ``(N, num_classes)`` computed on one device.
    To run the same parameters on a mesh, see ``alexnet_jax.parallel.apply_on_mesh``.
    """

    @nn.compact
    def __call__(self, images_NHWC: jax.Array, train: bool = False, *,
                 tower_axis_mapped: bool = False, data_axis: str | None = None,
                 gather_batch_axis: str | None = None, units_axis: str | None = None,
                 keep_tower_axis: bool = False) -> jax.Array:
        """Logits ``(N, num_classes)``; class ``tower * (num_classes // towers) + j`` is tower's j-th score.

        The keywords are layout, set by ``alexnet_jax.parallel`` inside ``shard_map``:
        ``tower_axis_mapped``, the ``'tower'`` axis is the mesh's (this call runs
        one tower); ``data_axis``, the FC layers' batch is split over that mesh axis;
        ``gather_batch_axis``, the conv layers' batch is, and is gathered before fc6;
        ``units_axis``, the FC layers' units are split over that mesh axis;
        ``keep_tower_axis``, return ``(N, towers here, classes here)``.
        """
        s = self.image_size
        if images_NHWC.shape[1:] != (s, s, 3):
            raise ValueError(f"AlexNet expects NHWC images of shape (N, {s}, {s}, 3) "
                             f"(model.image_size={s}); got {images_NHWC.shape}.")
        tower_widths(self.towers, self.width, self.num_classes, self.conv_widths, self.fc_widths)  # validate early
        key = self.make_rng("dropout") if (train and self.dropout > 0) else None
        # On one device vmap creates the 'tower' axis; inside shard_map it already
        # exists, and a vmap of size 1 only keeps the stacked parameter layout.
        towers = nn.vmap(Tower, variable_axes={"params": 0, "intermediates": 0}, split_rngs={"params": True},
                         in_axes=(None, None), out_axes=1, axis_size=1 if tower_axis_mapped else self.towers,
                         axis_name=None if tower_axis_mapped else TOWER_AXIS)
        fields = {name: getattr(self, name) for name in CONFIG_FIELDS}
        tower = towers(**fields, deterministic=not train, data_axis=data_axis, gather_batch_axis=gather_batch_axis,
                       units_axis=units_axis, name="towers")
        scores_NTK = tower(images_NHWC, key)
        return scores_NTK if keep_tower_axis else scores_NTK.reshape(scores_NTK.shape[0], -1)


def default_config() -> ml_collections.ConfigDict:
    """The ``model`` section of a run config: the paper's net."""
    return ml_collections.ConfigDict({name: getattr(AlexNet(), name) for name in CONFIG_FIELDS})


def from_config(cfg: ml_collections.ConfigDict | dict) -> AlexNet:
    """Build the network from a ``model`` config section, checking every field.

    Unknown keys and impossible values raise ``ConfigError`` naming the field.
    """
    items = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
    unknown = sorted(set(items) - set(CONFIG_FIELDS))
    if unknown:
        raise ConfigError(f"Unknown model config key(s) {unknown}; known keys: {list(CONFIG_FIELDS)}.")
    for field in ("conv_widths", "fc_widths"):  # lists from JSON (a saved config) hash as tuples
        if field in items:
            items[field] = tuple(items[field])
    model = AlexNet(**items)
    widths = tower_widths(model.towers, model.width, model.num_classes, model.conv_widths, model.fc_widths)
    for field, allowed in _CHOICES.items():
        if getattr(model, field) not in allowed:
            raise ConfigError(f"model.{field} must be {' or '.join(map(repr, allowed))}, "
                              f"got {getattr(model, field)!r}.")
    if not model.lrn_k > 0:
        raise ConfigError(f"model.lrn_k must be > 0, got {model.lrn_k}.")
    if model.lrn_scope == "layer" and model.towers > 1 and min(widths[k] for k in ("conv1", "conv2")) < 2:
        raise ConfigError("model.lrn_scope='layer' needs at least 2 conv1/conv2 maps per tower; raise model.width.")
    if not 0.0 <= model.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {model.dropout}.")
    if model.pool_window < 1 or model.pool_stride < 1:
        raise ConfigError(f"model.pool_window and pool_stride must be >= 1, got "
                          f"{model.pool_window}/{model.pool_stride}.")
    size = (model.image_size + sum(conv1_padding(model.image_size, pad=model.conv1_pad)[0]) - 11) // 4 + 1
    for _ in ("after conv1", "after conv2", "after conv5"):  # convs 2-5 keep the size
        if size < model.pool_window:
            raise ConfigError(f"model.image_size={model.image_size} is too small: a feature map shrinks "
                              f"below the {model.pool_window}x{model.pool_window} pooling window.")
        size = (size - model.pool_window) // model.pool_stride + 1
    return model


def count_params(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def layer_param_counts(params: Any) -> dict[str, int]:
    """Parameters per layer, summed over towers."""
    tower_params = params["params"]["towers"] if "params" in params else params["towers"]
    return {name: count_params(tower_params[name]) for name in LAYERS}
