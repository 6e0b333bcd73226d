"""The pure, jitted pieces of training and evaluation: ``train_step(state, batch) -> (state, metrics)``
and ``eval_step(params, batch) -> error counts``, each compiled once with its shardings.

Dropout keys come from ``(state.rng, state.step)``, so a resumed run draws the
masks it would have drawn. The batch arrives as the loader made it (uint8 crops
with their crop offsets, flips and lighting draws); the mean image and PCA
lighting are applied inside the step (``make_input_fn``).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from alexnet_jax import parallel
from alexnet_jax.data.device import eval_views, normalize
from alexnet_jax.model import AlexNet
from alexnet_jax.parallel import mesh_forward

CENTER_VIEW = 4  # the centre crop's place among the ten views (transforms.ten_crop_params)


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: steps taken
    params: Any  # {'towers': {...}}: every leaf has a leading tower axis
    opt_state: Any  # optax state, learning rate included
    rng: jax.Array  # uint32 key data of the dropout key


def create_train_state(
    model: AlexNet, tx: optax.GradientTransformation, seed: int, mesh, layout: str = parallel.DEFAULT_LAYOUT
):
    """Initialise straight onto the mesh, laid out as ``layout`` says. Returns ``(state, shardings)``."""

    def init():
        k_init, k_drop = jax.random.split(jax.random.key(seed))
        x = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
        params = model.init(k_init, x)["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=jax.random.key_data(k_drop)
        )

    shardings = parallel.state_shardings(jax.eval_shape(init), mesh, layout)
    return jax.jit(init, out_shardings=shardings)(), shardings


def abstract_state(state: TrainState, shardings: TrainState) -> TrainState:
    """Shapes, dtypes and shardings only: what a checkpoint is restored into."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def cross_entropy(logits, labels, mask):
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1)


def average_views(probs_NVK: jax.Array) -> jax.Array:
    """The paper's ten-crop prediction: the softmax averaged over an image's views."""
    return probs_NVK.mean(axis=1)


def make_input_fn(data_cfg, stats):
    """``inputs(batch, train) -> float32 images``: the loader's uint8 crops, normalised here in the step.

    The loader sends raw crops (a quarter of the bytes of float32) with their crop
    offsets, flips and lighting draws; the mean image and PCA lighting are applied
    on the device. Whole ``resize_size`` evaluation images become the ten test
    views, ``(B, 10, crop, crop, 3)``.
    """
    mean = stats["mean_image"] if (stats is not None and data_cfg.mean_subtraction) else None
    eigval = None if stats is None else stats.get("eigval")  # imported weights carry only the mean
    eigvec = None if stats is None else stats.get("eigvec")
    lighting = eigval is not None and data_cfg.pca_lighting_std > 0
    crop = data_cfg.crop_size

    def inputs(batch, train):
        if not train and "crop_yx" not in batch:  # whole images (even when resize_size == crop_size)
            return eval_views(batch["image"], mean, crop)
        return normalize(batch, mean, eigval, eigvec, lighting=lighting and train)

    return inputs


def _images_as_given(batch, train):
    """No ``inputs``: the batch's images are already what the network takes (float, normalised)."""
    return batch["image"]


def make_train_step(
    model: AlexNet, tx, mesh, shardings: TrainState, inputs=None, layout: str = parallel.DEFAULT_LAYOUT
):
    """``train_step(state, batch) -> (state, metrics)``, jitted once, the state donated.

    A batch with NaN/Inf inputs leaves the state unchanged but for the step count
    (``train/nonfinite_inputs`` says how many values were bad).
    """
    forward = mesh_forward(model, mesh, train=True, layout=layout)
    inputs = inputs or _images_as_given

    def train_step(state: TrainState, batch: dict):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        mask = batch["mask"].astype(jnp.float32)
        images = inputs(batch, True)
        nonfinite = jnp.sum(~jnp.isfinite(images))

        def loss_fn(params):
            logits = forward({"params": params}, images, key)
            return cross_entropy(logits, batch["label"], mask), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params, opt_state = jax.tree.map(
            lambda new, old: jnp.where(nonfinite == 0, new, old), (params, opt_state), (state.params, state.opt_state)
        )
        wrong = (jnp.argmax(logits, -1) != batch["label"]).astype(jnp.float32)
        metrics = {
            "train/loss": loss,
            "train/top1_error": jnp.sum(wrong * mask) / jnp.maximum(jnp.sum(mask), 1),
            "train/lr": state.opt_state.hyperparams["learning_rate"],
            "train/grad_norm": optax.tree.norm(grads),
            "train/nonfinite_inputs": nonfinite,
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng), metrics

    return jax.jit(
        train_step,
        in_shardings=(shardings, parallel.batch_sharding(mesh)),
        out_shardings=(shardings, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())),
        donate_argnums=0,
    )


def make_view_probs(
    model: AlexNet, mesh, inputs=None, layout: str = parallel.DEFAULT_LAYOUT, *, features: bool = False
):
    """``view_probs(params, batch) -> softmax (N, V, classes)``, V views per image (1 or the ten);
    ``features``: also fc7's activations ``(N, V, units)``. The eval step and the ``Classifier`` both run it."""
    forward = mesh_forward(model, mesh, train=False, features=features, layout=layout)
    inputs = inputs or _images_as_given

    def view_probs(params, batch):
        images = inputs(batch, False)
        n, views = batch["image"].shape[0], images.shape[1] if images.ndim == 5 else 1
        out = forward({"params": params}, images.reshape((-1,) + images.shape[-3:]), None)
        logits, fc7 = out if features else (out, None)
        probs = jax.nn.softmax(logits.astype(jnp.float32)).reshape(n, views, -1)
        return (probs, fc7.reshape(n, views, -1)) if features else probs

    return view_probs


def make_eval_step(model: AlexNet, mesh, param_shardings, inputs=None, layout: str = parallel.DEFAULT_LAYOUT):
    """Counts of top-1/top-5 errors on a batch, masked rows left out, under the names of their rates.

    A batch of single views gives ``n``, ``top1_error``, ``top5_error`` (counts; a pass divides them by
    ``n``). A batch of the ten views gives those for the centre view and ``top1_error_ten_crop``,
    ``top5_error_ten_crop`` for the softmax averaged over the ten (the paper's protocol): both
    protocols from one pass over the data.
    """
    view_probs = make_view_probs(model, mesh, inputs, layout)
    k = min(5, model.num_classes)

    def eval_step(params, batch):
        probs = view_probs(params, batch)
        label, mask = batch["label"], batch["mask"]

        def wrong(p):
            _, top = jax.lax.top_k(p, k)
            return (jnp.sum((top[:, 0] != label) & mask), jnp.sum(~jnp.any(top == label[:, None], axis=1) & mask))

        views = probs.shape[1]
        out = {"n": jnp.sum(mask)}
        out["top1_error"], out["top5_error"] = wrong(probs[:, CENTER_VIEW if views == 10 else 0])
        if views == 10:
            out["top1_error_ten_crop"], out["top5_error_ten_crop"] = wrong(average_views(probs))
        return out

    return jax.jit(eval_step, in_shardings=(param_shardings, parallel.batch_sharding(mesh)))
