"""Where each of the network's axes goes, and every exchange along them, in one place.

An ``Axes`` value says which mesh axis splits the towers, the conv and FC layers' examples and the
FC units; ``parallel.LAYOUTS`` holds one per device layout, and the network, the shardings and the
costs all read it. The network (``model.py``) is one tower's computation: where the paper's two GPUs
talked (the inputs of conv3, fc6, fc7 and fc8) it calls ``Axes.exchange``; where a layout splits
the FC layers differently from the conv layers, it calls the other methods here. ``Axes()`` is one
device. Each exchange carries a ``jax.named_scope``, so tests and profiles find it by name.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

TOWER_AXIS = "tower"  # the towers' axis inside the network: vmapped on one device, or the mesh's


@dataclasses.dataclass(frozen=True)
class Axes:
    """Which mesh axis carries each of the network's logical axes (None: not split over devices)."""

    tower: str | None = None  # one tower per device along this mesh axis; None: the towers are vmapped here
    conv_batch: str | None = None  # the examples of conv1..conv5
    fc_batch: str | None = None  # the examples of fc6..fc8; differing from conv_batch: gathered before fc6
    fc_units: str | None = None  # the FC layers' output units (kernel columns, fc8's classes)

    def spec(self, layer: str, ndim: int) -> P:
        """The PartitionSpec of a layer's kernel or bias (or its momentum): FC kernels ``(tower, in, out)``."""
        if layer.startswith("fc"):
            return P(self.tower, *([None] * (ndim - 2)), self.fc_units)
        return P(self.tower)

    @property
    def tower_name(self) -> str:
        return self.tower or TOWER_AXIS

    def exchange(self, x: jax.Array, to_layer: str) -> jax.Array:
        """Every tower gets all towers' channels (``exchange_to_<layer>``); towers=1: nothing to swap."""
        if jax.lax.axis_size(self.tower_name) == 1:
            return x
        with jax.named_scope(f"exchange_to_{to_layer}"):
            return jax.lax.all_gather(x, self.tower_name, axis=x.ndim - 1, tiled=True)

    def neighbour_channels(self, x: jax.Array, half: int, layer: str) -> tuple[jax.Array, jax.Array]:
        """The ``half`` channels either side of this tower's, from its neighbours (zeros at the layer's edges).

        Only LRN over the whole layer (Caffe's) needs it: ``2 * half`` channels from
        every tower, named ``lrn_halo_<layer>``.
        """
        with jax.named_scope(f"lrn_halo_{layer}"):
            edges = jax.lax.all_gather(jnp.concatenate([x[..., :half], x[..., -half:]], axis=-1), self.tower_name)
        t, last = jax.lax.axis_index(self.tower_name), edges.shape[0] - 1
        left = jnp.where(t > 0, edges[jnp.maximum(t - 1, 0)][..., half:], 0.0)  # the previous tower's last
        right = jnp.where(t < last, edges[jnp.minimum(t + 1, last)][..., :half], 0.0)  # the next tower's first
        return left, right

    def examples_to_fc(self, x: jax.Array) -> jax.Array:
        """The conv layers' examples regrouped as the FC layers split them (``batch_to_fc6``)."""
        if self.conv_batch == self.fc_batch:
            return x
        with jax.named_scope("batch_to_fc6"):
            return jax.lax.all_gather(x, self.conv_batch, axis=0, tiled=True)

    def units_here(self, units: int) -> int:
        """This device's share of an FC layer's ``units`` (``parallel.check_layout`` made sure it divides)."""
        return units if self.fc_units is None else units // jax.lax.axis_size(self.fc_units)

    def all_units(self, x: jax.Array, to_layer: str) -> jax.Array:
        """All devices' units of an FC layer's output, for the next layer (``units_to_<layer>``)."""
        if self.fc_units is None:
            return x
        with jax.named_scope(f"units_to_{to_layer}"):
            return jax.lax.all_gather(x, self.fc_units, axis=1, tiled=True)

    def first_example(self, n: int) -> jax.Array | int:
        """The global index of this device's first FC example, of ``n``: dropout masks follow examples."""
        return 0 if self.fc_batch is None else jax.lax.axis_index(self.fc_batch) * n

    def own_units(self, mask_NU: jax.Array, n_here: int) -> jax.Array:
        """This device's ``n_here`` columns of a mask drawn for all of a layer's units."""
        if self.fc_units is None:
            return mask_NU
        start = jax.lax.axis_index(self.fc_units) * n_here
        return jax.lax.dynamic_slice_in_dim(mask_NU, start, n_here, axis=1)
