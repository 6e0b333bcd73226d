"""How the towers' operations are computed (``model.ops``): ``'auto'`` (per device), ``FAST`` or ``PLAIN``.

``model.py`` says *what* each layer computes, this module *how*; every bundle computes the same maths
with the same parameters (``nn.Conv``/``nn.Dense``'s ``kernel`` and ``bias``), so one tree serves all.
``PLAIN`` is the textbook form (vmapped: grouped convolutions, which cuDNN runs natively, and
select-and-scatter). ``FAST`` rewrites it to avoid XLA:CPU's slow paths under the tower vmap (each change
measured in ``benchmarks/bench_speed_changes.py``). ``'auto'`` is decided by the devices the program
runs on (:func:`for_devices`): ``FAST`` on CPU devices, ``ACCELERATOR`` (``PLAIN`` with ``FAST``'s max-pool
gradient) on any other, a compile-only CUDA device included, so a step compiled for an H100 on a CPU-only
machine holds the GPU's form. ``AlexNet(ops=...)``
also takes a bundle (:class:`TowerOps`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ModuleDef = Any  # a flax Module class (or a functools.partial of one)


def _conv_nhwc(x, kernel, strides, padding):
    return jax.lax.conv_general_dilated(x, kernel, tuple(strides), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def tower_conv(x_NHWC: jax.Array, kernel_HWIO: jax.Array, strides, padding) -> jax.Array:
    """One tower's convolution that stays dense when vmapped over the towers.

    A plain vmap over stacked kernels is one grouped convolution, which XLA:CPU runs 5-7x slower than
    the same work as dense ones. Under vmap this is one dense convolution per tower (with a shared input,
    as conv1's, one convolution over the kernels side by side): the same maths, another program.
    """

    @jax.custom_batching.custom_vmap
    def conv(x, kernel):
        return _conv_nhwc(x, kernel, strides, padding)

    @conv.def_vmap
    def per_tower(axis_size, in_batched, x, kernel):
        x_batched, kernel_batched = in_batched
        if not kernel_batched:  # one kernel for all: fold the mapped axis into the batch
            xs = x if x_batched else jnp.broadcast_to(x, (axis_size,) + x.shape)
            y = _conv_nhwc(xs.reshape((-1,) + xs.shape[2:]), kernel, strides, padding)
            return y.reshape((axis_size, -1) + y.shape[1:]), True
        if not x_batched:  # shared input: concatenate kernels along the output channels
            y = _conv_nhwc(x, jnp.concatenate(list(kernel), axis=-1), strides, padding)
            return jnp.stack(jnp.split(y, axis_size, axis=-1)), True
        return jnp.stack([_conv_nhwc(x[t], kernel[t], strides, padding) for t in range(axis_size)]), True

    return conv(x_NHWC, kernel_HWIO)


@jax.custom_vjp
def _towers_matmul(x_TNI: jax.Array, kernel_TIO: jax.Array) -> jax.Array:
    """``x[t] @ kernel[t]`` for every tower t, with gradients written as plain matmuls.

    Autodiff of the einsum computes the kernel gradient transposed, then transposes it back (a copy of
    the whole kernel, 0.1-0.3 s for fc6 on CPU); ``x^T g`` directly is already in the kernel's layout.
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

    With an input the towers share (after an exchange), XLA:CPU merges the towers into one matmul by
    transposing the whole kernel, forwards and backwards (fc6: 150 MB copied twice a step). Broadcasting
    the input keeps the kernel in place; the gradients are ``_towers_matmul``'s.
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


class TowerConv(nn.Module):
    """``nn.Conv`` (the fields used here, the same parameters), computed by ``tower_conv``."""

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: Any = ((0, 0), (0, 0))  # explicit (low, high) pairs
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32

    @nn.compact
    def __call__(self, x_NHWC: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (*self.kernel_size, x_NHWC.shape[-1], self.features))
        bias = self.param("bias", self.bias_init, (self.features,))
        y = self.conv(x_NHWC.astype(self.dtype), kernel.astype(self.dtype), self.strides, self.padding)
        return y + bias.astype(self.dtype)

    conv = staticmethod(tower_conv)


class TowerDense(nn.Module):
    """``nn.Dense`` (the fields used here, the same parameters), computed by ``tower_dense``."""

    features: int
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32

    @nn.compact
    def __call__(self, x_NI: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x_NI.shape[-1], self.features))
        bias = self.param("bias", self.bias_init, (self.features,))
        y = self.matmul(x_NI.astype(self.dtype), kernel.astype(self.dtype))
        return y + bias.astype(self.dtype)

    matmul = staticmethod(tower_dense)


def plain_max_pool(x_NHWC: jax.Array, window: int, stride: int) -> jax.Array:
    """Max-pooling, no padding; its gradient is XLA's select-and-scatter."""
    return jax.lax.reduce_window(x_NHWC, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1), "VALID")


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def max_pool(x_NHWC: jax.Array, window: int, stride: int) -> jax.Array:
    """Max-pooling (no padding) whose gradient is computed without XLA's select-and-scatter.

    The usual gradient, ties included: each window's goes to its first maximum in row-major order, as
    ``reduce_window``'s does. XLA:CPU lowers select-and-scatter to index arrays and a scatter; here it is
    ``window**2`` strided compares and pads, fused.
    """
    return plain_max_pool(x_NHWC, window, stride)


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
            dx = dx + jax.lax.pad(
                jnp.where(hit, g, zero).astype(x.dtype),
                zero,
                ((0, 0, 0), (i, H - rows.stop, stride - 1), (j, W - cols.stop, stride - 1), (0, 0, 0)),
            )
    return (dx,)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def plain_divide_by_power(x: jax.Array, base: jax.Array, beta: float) -> jax.Array:
    """``x / base**beta``, LRN's last step, through a general power."""
    return x * base ** (-beta)


def divide_by_power(x: jax.Array, base: jax.Array, beta: float) -> jax.Array:
    """``x / base**beta``; the paper's beta=0.75 as rsqrt products, 2-3x cheaper on CPU than exp/log."""
    if beta == 0.75:
        return x * jax.lax.rsqrt(base) * jax.lax.rsqrt(jnp.sqrt(base))
    return plain_divide_by_power(x, base, beta)


@dataclasses.dataclass(frozen=True)
class TowerOps:
    """The implementation of each operation a tower runs. Frozen and hashable: a module field."""

    conv: ModuleDef  # called with nn.Conv's fields; parameters kernel (HWIO) and bias
    dense: ModuleDef  # called with nn.Dense's fields; parameters kernel (in, out) and bias
    max_pool: Callable[[jax.Array, int, int], jax.Array]  # (x_NHWC, window, stride), no padding
    lrn_divide: Callable[[jax.Array, jax.Array, float], jax.Array]  # (x, base, beta) -> x / base**beta


FAST = TowerOps(conv=TowerConv, dense=TowerDense, max_pool=max_pool, lrn_divide=divide_by_power)
PLAIN = TowerOps(conv=nn.Conv, dense=nn.Dense, max_pool=plain_max_pool, lrn_divide=plain_divide_by_power)
# 'auto' off the CPU: the plain forms, but max-pooling's gradient as FAST computes it. On an H100 that
# moves 16% fewer bytes per image than select-and-scatter, which XLA:GPU turns into a scatter of five
# int32 index arrays per pooled tensor (benchmarks/NOTES.md, section 5).
ACCELERATOR = dataclasses.replace(PLAIN, max_pool=max_pool, dense=TowerDense)
OPS = {"fast": FAST, "plain": PLAIN}  # the bundles model.ops names (and 'auto')


def for_devices(ops: str | TowerOps, devices) -> str | TowerOps:
    """``'auto'`` -> ``'fast'`` when every device is a CPU, else ``ACCELERATOR``; anything else as it is."""
    if not (isinstance(ops, str) and ops == "auto"):
        return ops
    return "fast" if all(d.platform == "cpu" for d in devices) else ACCELERATOR


def resolve(ops: str | TowerOps) -> TowerOps:
    """A ``model.ops`` name (or a bundle, returned as it is) -> the bundle. ``'auto'`` outside a mesh
    (``parallel.mesh_forward`` decides it by the mesh's devices) goes by JAX's default devices."""
    if isinstance(ops, str) and ops == "auto":
        ops = for_devices(ops, jax.devices()[:1])
    return OPS[ops] if isinstance(ops, str) else ops
