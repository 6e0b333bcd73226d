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
comparison net) the exchanges are skipped.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

TOWER_AXIS = "tower"


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


def tower_widths(towers: int, width: float, num_classes: int) -> dict[str, int]:
    """Output width of each layer within one tower."""
    if towers == 2:
        whole = _TWO_TOWER_CONV + _FC
        per_tower = [w // 2 for w in whole]
    elif towers == 1:
        per_tower = list(_ONE_TOWER_CONV + _FC)
    else:
        raise ConfigError(f"model.towers must be 1 or 2 (the paper's nets), got {towers}.")
    if not width > 0:
        raise ConfigError(f"model.width must be > 0, got {width}.")
    if num_classes % towers:
        raise ConfigError(
            f"model.num_classes={num_classes} must be divisible by model.towers={towers}: "
            "each tower's fc8 computes an equal share of the class scores."
        )
    scaled = [max(1, int(round(w * width))) for w in per_tower]
    return dict(zip(LAYERS, scaled + [num_classes // towers]))


def conv1_padding(size: int, kernel: int = 11, stride: int = 4) -> int:
    """Zeros added at the bottom/right so that conv1 covers the image as cuda-convnet did.

    cuda-convnet placed ceil((size - kernel) / stride) + 1 windows, padding the far
    edge as needed: a 224 crop gives 55x55 (as if it were 227 with no padding);
    a 227 crop needs no padding and also gives 55x55.
    """
    if size < kernel:
        raise ConfigError(f"model.image_size={size} is smaller than conv1's {kernel}x{kernel} kernel.")
    out = -(-(size - kernel) // stride) + 1
    return (out - 1) * stride + kernel - size


class LRN(nn.Module):
    """Local response normalisation across channels (Section 3.3).

    ``b[i] = a[i] / (k + alpha' * sum_{j=i-n//2}^{i+n//2} a[j]^2) ** beta`` with the sum
    clipped to existing channels. ``convention='paper'`` (default) takes the
    paper's formula literally: ``alpha' = alpha``. ``convention='alpha_over_n'``
    uses ``alpha' = alpha / n`` as cuda-convnet, Caffe and PyTorch do. The sum
    runs over the channels of the array it is given: called inside a tower it
    never reaches the other tower's maps, as on the paper's GPUs.
    """

    k: float = 2.0
    n: int = 5
    alpha: float = 1e-4
    beta: float = 0.75
    convention: str = "paper"

    @nn.compact
    def __call__(self, x_NHWC: jax.Array) -> jax.Array:
        if self.convention == "paper":
            alpha = self.alpha
        elif self.convention == "alpha_over_n":
            alpha = self.alpha / self.n
        else:
            raise ConfigError(
                f"model.lrn_convention must be 'paper' or 'alpha_over_n', got {self.convention!r}."
            )
        half = self.n // 2
        sq = jnp.square(x_NHWC)
        window_sum = jax.lax.reduce_window(
            sq, 0.0, jax.lax.add,
            window_dimensions=(1, 1, 1, 2 * half + 1),
            window_strides=(1, 1, 1, 1),
            padding=((0, 0), (0, 0), (0, 0), (half, half)),
        )
        base = self.k + alpha * window_sum
        if self.beta == 0.75:  # the paper's beta: base**-0.75 without exp/log (2-3x cheaper on CPU)
            return x_NHWC * jax.lax.rsqrt(base) * jax.lax.rsqrt(jnp.sqrt(base))
        return x_NHWC * base ** (-self.beta)


def _conv_nhwc(x, kernel, stride, padding):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def tower_conv(x_NHWC: jax.Array, kernel_HWIO: jax.Array, stride: int, padding) -> jax.Array:
    """One tower's convolution that stays dense when vmapped over the towers.

    Plain ``jax.vmap`` of a convolution over stacked kernels becomes one grouped
    convolution (``feature_group_count=towers``), which XLA:CPU runs 5-7x slower
    than the same work as dense convolutions. Under vmap this runs one dense
    convolution per tower instead (or, when the towers share the input, as
    conv1 does, one convolution with the towers' kernels side by side). The
    maths is the same; only the program XLA sees differs.
    """

    @jax.custom_batching.custom_vmap
    def conv(x, kernel):
        return _conv_nhwc(x, kernel, stride, padding)

    @conv.def_vmap
    def per_tower(axis_size, in_batched, x, kernel):
        x_batched, kernel_batched = in_batched
        if not kernel_batched:  # one kernel for all: fold the mapped axis into the batch
            xs = x if x_batched else jnp.broadcast_to(x, (axis_size,) + x.shape)
            y = _conv_nhwc(xs.reshape((-1,) + xs.shape[2:]), kernel, stride, padding)
            return y.reshape((axis_size, -1) + y.shape[1:]), True
        if not x_batched:  # shared input: concatenate kernels along the output channels
            y = _conv_nhwc(x, jnp.concatenate(list(kernel), axis=-1), stride, padding)
            return jnp.stack(jnp.split(y, axis_size, axis=-1)), True
        return jnp.stack([_conv_nhwc(x[t], kernel[t], stride, padding) for t in range(axis_size)]), True

    return conv(x_NHWC, kernel_HWIO)


@jax.custom_vjp
def _towers_matmul(x_TNI: jax.Array, kernel_TIO: jax.Array) -> jax.Array:
    """``x[t] @ kernel[t]`` for every tower t, with gradients written as plain matmuls.

    Autodiff of the einsum computes the kernel gradient transposed and then
    transposes it back (a copy of the whole kernel per step, 0.1-0.3 s for fc6
    on CPU); asking for ``x^T g`` directly gives it in the kernel's own layout.
    """
    return jnp.einsum("tni,tio->tno", x_TNI, kernel_TIO)


def _towers_matmul_fwd(x, kernel):
    return _towers_matmul(x, kernel), (x, kernel)


def _towers_matmul_bwd(residuals, g_TNO):
    x, kernel = residuals
    return jnp.einsum("tno,tio->tni", g_TNO, kernel), jnp.einsum("tni,tno->tio", x, g_TNO)


_towers_matmul.defvjp(_towers_matmul_fwd, _towers_matmul_bwd)


def _varying_alike(*arrays):
    """Inside shard_map, mark each array as varying over every mesh axis any of them varies
    over, as JAX does implicitly for built-in ops; a custom_vjp needs it done explicitly,
    so that autodiff sums the kernel's gradient over the data axis."""
    def vma(a):  # the mesh axes a value varies over (empty outside shard_map)
        return frozenset(jax.typeof(a).mat.varying)

    axes = frozenset().union(*(vma(a) for a in arrays))
    return tuple(jax.lax.pcast(a, tuple(sorted(axes - vma(a))), to="varying") for a in arrays)


def tower_dense(x_NI: jax.Array, kernel_IO: jax.Array) -> jax.Array:
    """One tower's ``x @ kernel`` that stays a batched matmul over towers when vmapped.

    Vmapped over stacked kernels with an input the towers share (after an
    exchange), XLA:CPU merges the towers into one matmul and transposes the
    whole kernel to do so, forwards and backwards: for fc6, 150 MB copied twice
    per step. Broadcasting the input keeps the kernel where it is.
    """

    @jax.custom_batching.custom_vmap
    def dense(x, kernel):
        return x @ kernel

    @dense.def_vmap
    def per_tower(axis_size, in_batched, x, kernel):
        x_batched, kernel_batched = in_batched
        if not kernel_batched:
            return x @ kernel, x_batched
        xs = x if x_batched else jnp.broadcast_to(x, (axis_size,) + x.shape)
        return _towers_matmul(*_varying_alike(xs, kernel)), True

    return dense(x_NI, kernel_IO)


class TowerDense(nn.Module):
    """A dense layer with ``nn.Dense``'s parameters, computed by ``tower_dense``."""

    features: int
    kernel_init: Any
    bias_init: Any
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32

    @nn.compact
    def __call__(self, x_NI: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x_NI.shape[-1], self.features))
        bias = self.param("bias", self.bias_init, (self.features,))
        return tower_dense(x_NI.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


class TowerConv(nn.Module):
    """A convolution with ``nn.Conv``'s parameters (``kernel`` HWIO, ``bias``), computed by ``tower_conv``."""

    features: int
    kernel_size: int
    stride: int
    padding: Any
    kernel_init: Any
    bias_init: Any
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32

    @nn.compact
    def __call__(self, x_NHWC: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, x_NHWC.shape[-1], self.features))
        bias = self.param("bias", self.bias_init, (self.features,))
        y = tower_conv(x_NHWC.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.padding)
        return y + bias.astype(self.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def max_pool(x_NHWC: jax.Array, window: int, stride: int) -> jax.Array:
    """Max-pooling (no padding) whose gradient is computed without XLA's select-and-scatter.

    The gradient is the usual one: each window sends its output gradient to its
    first maximum in row-major order (as ``jax.lax.reduce_window``'s gradient
    does, ties included). XLA:CPU lowers select-and-scatter to index arrays and
    a scatter; here it is ``window**2`` strided compares and pads, fused.
    """
    return jax.lax.reduce_window(x_NHWC, -jnp.inf, jax.lax.max, (1, window, window, 1),
                                 (1, stride, stride, 1), "VALID")


def _max_pool_fwd(x, window, stride):
    out = max_pool(x, window, stride)
    return out, (x, out)


def _max_pool_bwd(window, stride, residuals, g):
    x, out = residuals
    H, W = x.shape[1:3]
    Ho, Wo = out.shape[1:3]
    zero = jnp.zeros((), x.dtype)
    taken = jnp.zeros(out.shape, bool)  # windows whose maximum has been found
    dx = jnp.zeros_like(x)
    for i in range(window):
        for j in range(window):
            rows = slice(i, i + stride * (Ho - 1) + 1, stride)
            cols = slice(j, j + stride * (Wo - 1) + 1, stride)
            hit = (x[:, rows, cols, :] == out) & ~taken
            taken = taken | hit
            # Place each window's gradient at offset (i, j) of the window, on the input grid.
            dx = dx + jax.lax.pad(jnp.where(hit, g, zero).astype(x.dtype), zero, (
                (0, 0, 0), (i, H - rows.stop, stride - 1), (j, W - cols.stop, stride - 1), (0, 0, 0)))
    return (dx,)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def _exchange(x: jax.Array, towers: int, to_layer: str) -> jax.Array:
    """The towers swap activations: every tower gets all towers' channels.

    Named ``exchange_to_<layer>`` in the lowered program, where tests look for it.
    """
    if towers == 1:
        return x
    with jax.named_scope(f"exchange_to_{to_layer}"):
        return jax.lax.all_gather(x, TOWER_AXIS, axis=x.ndim - 1, tiled=True)


class Tower(nn.Module):
    """One tower of the network; run it under a named axis ``'tower'``.

    Returns this tower's share of the class scores, ``(N, num_classes // towers)``.
    ``dropout_key`` is the same on every tower and every data shard; masks are
    derived from it per tower and per *global* example index, so they do not
    depend on how the batch or the towers are laid out on devices.
    """

    towers: int = 2
    lrn: bool = True
    lrn_convention: str = "paper"
    pool_window: int = 3
    pool_stride: int = 2
    dropout: float = 0.5
    activation: str = "relu"
    num_classes: int = 1000
    width: float = 1.0
    init_std: float = 0.01
    init_bias: float = 1.0
    dtype: str = "float32"
    deterministic: bool = True
    data_axis: str | None = None  # set when the batch is sharded over a named axis

    def _act(self, x):
        if self.activation == "relu":
            return nn.relu(x)
        if self.activation == "tanh":
            return jnp.tanh(x)
        raise ConfigError(f"model.activation must be 'relu' or 'tanh', got {self.activation!r}.")

    def _pool(self, x):
        w, s = self.pool_window, self.pool_stride
        return max_pool(x, w, s)

    def _kernel_init(self):
        return nn.initializers.normal(stddev=self.init_std)

    def _bias_init(self, name):
        value = self.init_bias if name in BIAS_ONE_LAYERS else 0.0
        return nn.initializers.constant(value)

    def _conv(self, name, features, kernel, stride=1, padding=None):
        k = kernel
        if padding is None:
            padding = ((k // 2, k // 2), (k // 2, k // 2))
        return TowerConv(features, k, stride, padding, kernel_init=self._kernel_init(),
                         bias_init=self._bias_init(name), dtype=self.dtype, name=name)

    def _dense(self, name, features):
        return TowerDense(features, kernel_init=self._kernel_init(), bias_init=self._bias_init(name),
                          dtype=self.dtype, name=name)

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
        mask = jax.vmap(lambda k: jax.random.bernoulli(k, keep, x.shape[1:]))(keys)
        # Inverted dropout: scaling by 1/keep now equals the paper's x0.5 at test time.
        return jnp.where(mask, x / keep, 0.0).astype(x.dtype)

    @nn.compact
    def __call__(self, images_NHWC: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        w = tower_widths(self.towers, self.width, self.num_classes)
        T = self.towers
        # LRN's sum of squares and power run in float32 whatever the compute dtype.
        lrn = ((lambda x: LRN(convention=self.lrn_convention)(x.astype(jnp.float32)).astype(x.dtype))
               if self.lrn else (lambda x: x))

        pad = conv1_padding(images_NHWC.shape[1])
        x = self._conv("conv1", w["conv1"], 11, stride=4, padding=((0, pad), (0, pad)))(images_NHWC)
        x = self._pool(lrn(self._act(x)))
        self.sow("intermediates", "conv1_pooled", x)
        x = self._conv("conv2", w["conv2"], 5)(x)  # own tower only
        x = self._pool(lrn(self._act(x)))
        self.sow("intermediates", "conv2_pooled", x)
        x = _exchange(x, T, "conv3")  # conv3 sees both towers' conv2 maps
        x = self._act(self._conv("conv3", w["conv3"], 3)(x))
        x = self._act(self._conv("conv4", w["conv4"], 3)(x))  # own tower only
        x = self._pool(self._act(self._conv("conv5", w["conv5"], 3)(x)))  # own tower only
        self.sow("intermediates", "conv5_pooled", x)
        x = _exchange(x, T, "fc6").reshape(x.shape[0], -1)  # fc6 sees all conv5 features
        x = self._act(self._dense("fc6", w["fc6"])(x))
        self.sow("intermediates", "fc6_act", x)
        x = _exchange(self._dropout(x, dropout_key, 6), T, "fc7")  # fc7 sees all fc6 units
        x = self._act(self._dense("fc7", w["fc7"])(x))
        self.sow("intermediates", "fc7_act", x)  # the paper's Figure 4 features
        x = _exchange(self._dropout(x, dropout_key, 7), T, "fc8")  # fc8 sees all fc7 units
        # This tower's class scores, float32 for the softmax (taken over all towers' scores).
        return self._dense("fc8", w["fc8"])(x).astype(jnp.float32)


class AlexNet(nn.Module):
    """The paper's network. ``AlexNet()`` is the two-tower ImageNet net.

    Attributes are the ``model.*`` config fields (see ``default_config``).
    ``model.init(key, images)`` returns the parameters of all towers, stacked on
    a leading axis of size ``towers``; ``model.apply(variables, images_NHWC,
    train=False)`` returns logits ``(N, num_classes)`` computed on one device.
    To run the same parameters on a mesh, see ``alexnet_jax.parallel.apply_on_mesh``.
    """

    towers: int = 2  # 2: the paper's two-GPU net; 1: its one-GPU comparison net
    lrn: bool = True  # local response normalisation after conv1 and conv2
    lrn_convention: str = "paper"  # 'paper' (alpha as printed) or 'alpha_over_n'
    pool_window: int = 3  # max-pool window z (3: overlapping; 2 with stride 2: not)
    pool_stride: int = 2  # max-pool stride s
    dropout: float = 0.5  # dropout rate in fc6 and fc7
    activation: str = "relu"  # 'relu' or 'tanh' (the paper's Figure 1 comparison)
    num_classes: int = 1000  # split evenly between the towers' fc8
    width: float = 1.0  # multiplier on every layer's width except fc8
    image_size: int = 224  # input crops are image_size x image_size x 3
    init_std: float = 0.01  # weights ~ N(0, init_std^2)
    init_bias: float = 1.0  # bias of conv2, conv4, conv5, fc6, fc7 (others 0)
    dtype: str = "float32"  # compute dtype: 'float32', or 'bfloat16' (parameters stay float32)
    # Layout plumbing, not config: set by alexnet_jax.parallel inside shard_map.
    tower_axis_is_mapped: bool = False
    data_axis: str | None = None

    def tower_kwargs(self, train: bool) -> dict[str, Any]:
        names = [f.name for f in dataclasses.fields(Tower) if f.name not in ("parent", "name")]
        kw = {n: getattr(self, n) for n in names if hasattr(self, n)}
        kw["deterministic"] = not train
        return kw

    @nn.compact
    def __call__(self, images_NHWC: jax.Array, train: bool = False) -> jax.Array:
        n, h, w_, c = images_NHWC.shape
        if (h, w_, c) != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"AlexNet expects NHWC images of shape (N, {self.image_size}, {self.image_size}, 3) "
                f"(model.image_size={self.image_size}); got {images_NHWC.shape}."
            )
        tower_widths(self.towers, self.width, self.num_classes)  # validate early
        key = self.make_rng("dropout") if (train and self.dropout > 0) else None
        # On one device vmap creates the 'tower' axis; inside shard_map it already
        # exists, and a vmap of size 1 only keeps the stacked parameter layout.
        axis_size = 1 if self.tower_axis_is_mapped else self.towers
        axis_name = None if self.tower_axis_is_mapped else TOWER_AXIS
        towers = nn.vmap(
            Tower,
            variable_axes={"params": 0, "intermediates": 0},
            split_rngs={"params": True},
            in_axes=(None, None),
            out_axes=1,
            axis_size=axis_size,
            axis_name=axis_name,
        )
        logits_NTK = towers(name="towers", **self.tower_kwargs(train))(images_NHWC, key)
        return logits_NTK.reshape(n, -1)  # class index = tower * (num_classes/towers) + j


def default_config() -> ml_collections.ConfigDict:
    """The ``model`` section of a run config: the paper's net."""
    m = AlexNet()
    return ml_collections.ConfigDict(
        {f.name: getattr(m, f.name) for f in dataclasses.fields(AlexNet) if f.name in CONFIG_FIELDS}
    )


CONFIG_FIELDS = (
    "towers", "lrn", "lrn_convention", "pool_window", "pool_stride", "dropout",
    "activation", "num_classes", "width", "image_size", "init_std", "init_bias", "dtype",
)


def from_config(cfg: ml_collections.ConfigDict | dict) -> AlexNet:
    """Build the network from a ``model`` config section, checking every field.

    Unknown keys and impossible values raise ``ConfigError`` naming the field.
    """
    items = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
    unknown = sorted(set(items) - set(CONFIG_FIELDS))
    if unknown:
        raise ConfigError(f"Unknown model config key(s) {unknown}; known keys: {list(CONFIG_FIELDS)}.")
    model = AlexNet(**items)
    tower_widths(model.towers, model.width, model.num_classes)
    if model.activation not in ("relu", "tanh"):
        raise ConfigError(f"model.activation must be 'relu' or 'tanh', got {model.activation!r}.")
    if model.lrn_convention not in ("paper", "alpha_over_n"):
        raise ConfigError(
            f"model.lrn_convention must be 'paper' or 'alpha_over_n', got {model.lrn_convention!r}.")
    if model.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"model.dtype must be 'float32' or 'bfloat16', got {model.dtype!r}.")
    if not 0.0 <= model.dropout < 1.0:
        raise ConfigError(f"model.dropout must be in [0, 1), got {model.dropout}.")
    if model.pool_window < 1 or model.pool_stride < 1:
        raise ConfigError(f"model.pool_window and pool_stride must be >= 1, got "
                          f"{model.pool_window}/{model.pool_stride}.")
    size = (model.image_size + conv1_padding(model.image_size) - 11) // 4 + 1  # after conv1
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
