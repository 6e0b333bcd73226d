"""Load a checkpoint on whatever devices this process has, and classify images with it.

A checkpoint folder is self-contained: its config rebuilds the network, and its
``dataset`` / ``dataset_stats`` items carry the class names and the mean image,
so a notebook needs neither ``configs/`` nor the training data. The parameters
are placed on this process's devices whatever mesh saved them (split by tower
when the device count allows, else on one device), and images get the run's
own evaluation preprocessing. How to use it: ``docs/inference.md``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from PIL import Image

from alexnet_jax import checkpoint, paths, steps
from alexnet_jax.data import sources, transforms
from alexnet_jax.errors import CheckpointError, DecodeError, ImageError
from alexnet_jax.model import AlexNet, from_config
from alexnet_jax.parallel import DATA_AXIS, TOWER_AXIS, batch_sharding, make_mesh


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A restored checkpoint: parameters on this process's devices plus what inference needs."""

    params: Any  # {'towers': {layer: {kernel, bias}}}, leading tower axis
    config: ml_collections.ConfigDict  # the run's whole config, as saved
    step: int
    path: str  # the step folder it came from
    model: AlexNet
    mesh: Any  # ('data', 'tower') Mesh over local devices, or None (one device)
    classes: list[str] | None  # class ids (ImageNet wnids, embedded folder names)
    class_names: list[str] | None  # readable names, where the dataset has them
    stats: dict | None  # mean_image (HWC float32), eigval, eigvec


# ---------------------------------------------------------------------------
# Finding and reading a checkpoint


def _model_from(config: ml_collections.ConfigDict, model, step_dir) -> AlexNet:
    if isinstance(model, AlexNet):
        return model
    if model is not None:
        return from_config(model)
    if "model" not in config:
        raise CheckpointError(
            f"The config saved in {str(step_dir)!r} has no model section: not an "
            "alexnet_jax checkpoint, or a damaged one."
        )
    return from_config(config.model)


def _flat_shapes(tree) -> dict[str, tuple]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(k): tuple(v.shape) for k, v in flat}


def _check_shapes(saved_params, model: AlexNet, step_dir, override: bool) -> None:
    """Refuse, naming layers and shapes, a checkpoint whose arrays belong to another network."""
    x = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
    expected = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    have, want = _flat_shapes(saved_params), _flat_shapes(expected)
    diffs = [
        f"{k}: checkpoint {have.get(k)}, model {want.get(k)}"
        for k in sorted(set(have) | set(want))
        if have.get(k) != want.get(k)
    ]
    if diffs:
        fields = {f: getattr(model, f) for f in ("towers", "width", "num_classes", "image_size")}
        fix = (
            "Omit model= to use the config saved with the checkpoint, or give the model config it was trained with."
            if override
            else "Its saved config does not describe its parameters: the "
            "folder mixes two runs. Pass model=<the model config it was trained with>."
        )
        raise CheckpointError(
            f"The parameters in {str(step_dir)!r} are from another model size than {fields}: "
            + "; ".join(diffs[:3])
            + (f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else "")
            + ". "
            + fix
        )


def _placement(model: AlexNet, devices) -> tuple[Any, Any]:
    """(mesh or None, sharding of every parameter): towers split over devices when they can be."""
    devices = list(devices)
    if len(devices) >= model.towers and len(devices) % model.towers == 0 and len(devices) > 1:
        mesh = make_mesh(towers=model.towers, data=len(devices) // model.towers, devices=devices)
        return mesh, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(TOWER_AXIS))  # the towers layout
    return None, jax.sharding.SingleDeviceSharding(devices[0])


def load_checkpoint(
    path: str | os.PathLike, step: int | None = None, *, model=None, devices: Sequence[Any] | None = None
) -> Checkpoint:
    """Restore the parameters and config of a checkpoint onto this process's devices.

    ``path``: a workdir, its ``checkpoints/`` folder or one ``checkpoints/<step>``
    folder, local or any filesystem etils/Orbax reads (``gs://...``). ``step``:
    which step (default: the newest finished one). ``model``: a model config
    (or ``AlexNet``) to use instead of the saved one. ``devices``: default
    ``jax.local_devices()``. Only the parameters are read; the optimizer state stays on disk.
    """
    step_dir, number = paths.find_step_dir(path, step)
    config = ml_collections.ConfigDict(checkpoint.read(step_dir, "config")["config"])
    net = _model_from(config, model, step_dir)
    mesh, sharding = _placement(net, devices or jax.local_devices())
    items = checkpoint.read_weights(
        step_dir, sharding, lambda saved: _check_shapes(saved, net, step_dir, model is not None)
    )
    params, dataset, stats = items["state"]["params"], items["dataset"], items["dataset_stats"]
    return Checkpoint(
        params=params,
        config=config,
        step=int(items["state"]["step"]) if number is None else number,  # a step folder renamed: the state's
        path=str(step_dir),
        model=net,
        mesh=mesh,
        classes=dataset["classes"],
        class_names=dataset["class_names"],
        stats=stats and {k: np.asarray(v) for k, v in stats.items()},
    )


# ---------------------------------------------------------------------------
# Images in, model inputs out


def _describe(image, i: int) -> str:
    if isinstance(image, (str, os.PathLike, epath.Path)):
        return str(image)
    return f"<{type(image).__name__} #{i}>"


def load_image(image, size: int, warp: bool = False) -> np.ndarray:
    """A path, PIL image or uint8 array (HxW, HxWx3 or HxWx4) -> uint8 ``(size, size, 3)``.

    Shorter side rescaled to ``size``, central square kept: the paper's (and the
    training pipeline's) first step; ``warp``: resized to ``size x size`` (Caffe's).
    Files are decoded exactly as training decoded them.
    """
    if isinstance(image, (str, os.PathLike, epath.Path)):
        p = paths.absolute(image)
        if not p.is_file():
            raise ImageError(
                f"No image file at {str(image)!r}. Give the path of a JPEG/PNG file, "
                "a PIL image or a uint8 HxWx3 array."
            )
        try:
            return sources.decode_image(p.read_bytes(), size, warp)
        except DecodeError as e:
            raise ImageError(
                f"Cannot read {str(image)!r} as an image ({e}). Give a readable JPEG/PNG "
                "file, a PIL image or a uint8 HxWx3 array."
            ) from None
    if isinstance(image, Image.Image):
        return sources.rescale_center_square(image, size, warp)
    if isinstance(image, np.ndarray) or hasattr(image, "__array__"):
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            raise ImageError(
                f"Image arrays must be uint8 (0..255), got {arr.dtype}. For floats in [0, 1] "
                "pass (x * 255).round().astype(np.uint8)."
            )
        if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 3, 4))):
            raise ImageError(
                f"Image arrays must be HxW, HxWx3 or HxWx4 (RGB, channels last), got shape "
                f"{arr.shape}; a batch goes in as an (N, H, W, 3) array or a list."
            )
        if min(arr.shape[:2]) < 1:
            raise ImageError(f"Empty image array of shape {arr.shape}.")
        return sources.rescale_center_square(
            Image.fromarray(arr.squeeze(-1) if arr.ndim == 3 and arr.shape[-1] == 1 else arr), size, warp
        )
    raise ImageError(
        f"Cannot use a {type(image).__name__} as an image: give a file path, a PIL image or a uint8 HxWx3 array."
    )


def _as_list(images) -> list:
    if isinstance(images, (str, os.PathLike, epath.Path, Image.Image)):
        return [images]
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    return list(images)


# ---------------------------------------------------------------------------
# The classifier


@dataclasses.dataclass
class Prediction:
    """Class probabilities of N images and their top-k classes, most probable first."""

    probs: np.ndarray  # (N, num_classes) float32, rows sum to 1
    top_k: np.ndarray  # (N, k) class indices
    top_probs: np.ndarray  # (N, k)
    classes: list[list[str]]  # (N, k) class ids (wnids), or str(index) when unknown
    names: list[list[str]]  # (N, k) readable names, or the ids
    sources: list[str]  # what each row came from

    def __str__(self) -> str:
        lines = []
        for src, names, ps in zip(self.sources, self.names, self.top_probs):
            lines.append(src)
            lines += [f"  {p:7.2%}  {n}" for n, p in zip(names, ps)]
        return "\n".join(lines)


_INPUT_KEYS = ("image", "crop_yx", "flip")  # what the input function reads in evaluation


def _next_bucket(n: int, multiple: int, cap: int) -> int:
    """Batch sizes come from a few values (powers of two), so jit compiles a few programs, not one per call."""
    b = multiple
    while b < min(n, cap):
        b *= 2
    return b


class Classifier:
    """Probabilities, top-k classes and fc7 features for images, with the run's evaluation preprocessing.

    ``views``: ``'center'`` or ``'ten_crop'`` (softmax averaged over the ten
    views, as in the paper); default: ten crops if the run evaluated them, else
    the centre crop.
    """

    def __init__(
        self,
        checkpoint: Checkpoint | str | os.PathLike,
        *,
        step: int | None = None,
        views: str | None = None,
        batch_size: int = 32,
    ):
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint, step)
        cfg = ckpt.config
        if cfg is None or "data" not in cfg:
            raise CheckpointError(
                f"{ckpt.path!r} has no data config: the preprocessing it was trained with is unknown."
            )
        self.checkpoint, self.model = ckpt, ckpt.model
        self.resize, self.crop = int(cfg.data.resize_size), int(cfg.data.crop_size)
        self.warp = cfg.data.get("resize_mode", "shorter_side") == "warp"
        if self.crop != self.model.image_size:
            raise CheckpointError(
                f"data.crop_size={self.crop} differs from model.image_size={self.model.image_size} in {ckpt.path!r}."
            )
        self.views = views or ("ten_crop" if cfg.eval_ten_crop else "center")
        if self.views not in ("center", "ten_crop"):
            raise ValueError(f"views must be 'center' or 'ten_crop', got {self.views!r}.")
        self.mean = None
        if cfg.data.mean_subtraction:
            if ckpt.stats is None:
                raise CheckpointError(
                    f"The run subtracted the training mean image, but {ckpt.path!r} does not "
                    "carry it: the checkpoint is damaged (its dataset_stats item is missing)."
                )
            self.mean = np.asarray(ckpt.stats["mean_image"], np.float32)
            if self.mean.shape[:2] != (self.resize, self.resize):
                raise CheckpointError(
                    f"The mean image in {ckpt.path!r} is {self.mean.shape}, but the run "
                    f"rescaled images to {self.resize}."
                )
        self.batch_size = batch_size
        self.num_classes = self.model.num_classes
        # The evaluation's own pieces: its input function (the ten views cut on the device from whole
        # images) and the eval step's forward, which also returns fc7.
        mesh = self.checkpoint.mesh
        if mesh is None:  # parameters on one device: a 1x1 mesh of it, both towers there
            device = next(iter(jax.tree_util.tree_leaves(self.checkpoint.params)[0].devices()))
            mesh = make_mesh(towers=1, data=1, devices=[device])
        inputs = steps.make_input_fn(cfg.data, ckpt.stats)
        self._inputs = jax.jit(lambda batch: inputs(batch, False))  # what the network sees (model_inputs)
        self._view_probs = jax.jit(steps.make_view_probs(self.model, mesh, inputs, features=True))

    def preprocess(self, images, views: str | None = None) -> dict:
        """Images -> ``{'image', 'resized', 'sources'}`` (+ ``'crop_yx', 'flip'`` for the centre view).

        ``image``: the centre crops, uint8 ``(N, 1, crop, crop, 3)``; for ten crops the whole resized images
        ``(N, resize, resize, 3)``, cut into the views on the device as evaluation does."""
        items = _as_list(images)
        if not items:
            raise ImageError("No images given.")
        views = views or self.views
        view = transforms.CenterCrop(self.crop) if views == "center" else transforms.Whole()
        resized, out = [], []
        for i, image in enumerate(items):
            try:
                img = load_image(image, self.resize, self.warp)
            except ImageError as e:
                raise ImageError(f"Image {i}: {e}") from None
            resized.append(img)
            out.append(view.map({"image": img, "label": np.int32(0), "mask": np.bool_(True)}))
        batch = {k: np.stack([o[k] for o in out]) for k in ("image", "crop_yx", "flip") if k in out[0]}
        if views == "center":  # one view: give it its own axis like ten_crop's
            batch = {k: v[:, None] for k, v in batch.items()}
        return {**batch, "resized": np.stack(resized), "sources": [_describe(x, i) for i, x in enumerate(items)]}

    def model_inputs(self, images, views: str | None = None) -> np.ndarray:
        """What the network sees: float32 ``(N, V, crop, crop, 3)``, the mean image's windows subtracted."""
        b = self.preprocess(images, views)
        return np.asarray(self._inputs({k: b[k] for k in _INPUT_KEYS if k in b}))

    def _run(self, batch: dict) -> tuple[np.ndarray, np.ndarray]:
        n = batch["image"].shape[0]
        multiple = 1 if self.checkpoint.mesh is None else self.checkpoint.mesh.shape[DATA_AXIS]
        chunk = _next_bucket(n, multiple, max(self.batch_size, multiple))
        sharding = None if self.checkpoint.mesh is None else batch_sharding(self.checkpoint.mesh)
        probs, feats = [], []
        for start in range(0, n, chunk):
            part = {k: batch[k][start : start + chunk] for k in _INPUT_KEYS if k in batch}
            m = part["image"].shape[0]
            part = {k: np.concatenate([v, np.zeros((chunk - m,) + v.shape[1:], v.dtype)]) for k, v in part.items()}
            if sharding is not None:
                part = {k: jax.device_put(v, sharding) for k, v in part.items()}
            p, f = jax.device_get(self._view_probs(self.checkpoint.params, part))
            p = steps.average_views(p)
            probs.append(p[:m])
            feats.append(f[:m])
        return np.concatenate(probs), np.concatenate(feats)

    # -- public ---------------------------------------------------------------

    def predict(self, images, *, top_k: int = 5, views: str | None = None) -> Prediction:
        """Probabilities and the ``top_k`` classes of each image (paths, PIL images, uint8 arrays)."""
        batch = self.preprocess(images, views)
        probs, _ = self._run(batch)
        k = min(top_k, self.num_classes)
        top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        ids = self.checkpoint.classes or [str(i) for i in range(self.num_classes)]
        names = self.checkpoint.class_names or ids
        return Prediction(
            probs=probs,
            top_k=top,
            top_probs=np.take_along_axis(probs, top, axis=1),
            classes=[[ids[j] for j in row] for row in top],
            names=[[names[j] for j in row] for row in top],
            sources=batch["sources"],
        )

    def features(self, images, *, views: str = "center") -> np.ndarray:
        """fc7 activations ``(N, 4096 * width)`` (both towers), the paper's Figure 4 features.

        With ``views='ten_crop'`` the ten views' features are averaged.
        """
        _, feats = self._run(self.preprocess(images, views))
        return feats.mean(axis=1)

    def class_name(self, index: int) -> str:
        names = self.checkpoint.class_names or self.checkpoint.classes
        return names[index] if names else str(index)


def predict(
    checkpoint: Checkpoint | str | os.PathLike, images, *, top_k: int = 5, views: str | None = None
) -> Prediction:
    """One-off classification: ``predict("runs/demo", ["a.jpg", "b.png"])``. Reuse a ``Classifier`` for more."""
    return Classifier(checkpoint, views=views).predict(images, top_k=top_k)


__all__ = [
    "Checkpoint",
    "CheckpointError",
    "Classifier",
    "ImageError",
    "Prediction",
    "load_checkpoint",
    "load_image",
    "predict",
]
