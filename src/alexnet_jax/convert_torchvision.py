"""torchvision's trained ``alexnet`` as an alexnet_jax checkpoint (``python -m alexnet_jax.convert --torchvision``).

torchvision's net is "one weird trick"'s (Krizhevsky 2014, ``configs/owt.py``), not the 2012 paper's
(docs/pretrained.md). Kernels go from OIHW to HWIO and FC weights from (out, in) to (in, out), on a
tower axis of size 1; fc6's inputs from PyTorch's C,H,W flatten to our H,W,C. torchvision's input
``(x / 255 - mean) / std`` becomes a ``255 * mean`` mean image and conv1's input channel c divided by
``255 * std[c]``: exact, since conv1 is linear and its zero padding is zero in both forms (``origin``
records both). torchvision's dropout sits before fc6 and fc7, ours after: it matters only for training.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from alexnet_jax.checkpoint import write_weights_only
from alexnet_jax.data.labels import imagenet_classes
from alexnet_jax.errors import CheckpointError, ConvertError
from alexnet_jax.model import LAYERS

MEAN_RGB = (0.485, 0.456, 0.406)
STD_RGB = (0.229, 0.224, 0.225)
KEYS = {
    "conv1": "features.0",
    "conv2": "features.3",
    "conv3": "features.6",
    "conv4": "features.8",
    "conv5": "features.10",
    "fc6": "classifier.1",
    "fc7": "classifier.4",
    "fc8": "classifier.6",
}
SHAPES = {
    "conv1": (64, 3, 11, 11),
    "conv2": (192, 64, 5, 5),
    "conv3": (384, 192, 3, 3),
    "conv4": (256, 384, 3, 3),
    "conv5": (256, 256, 3, 3),
    "fc6": (4096, 9216),
    "fc7": (4096, 4096),
    "fc8": (1000, 4096),
}
POOL5_CHW = (256, 6, 6)
RESIZE, CROP = 256, 224


def read_state_dict(path: str | Path) -> dict:
    """A ``.pth`` state_dict of torchvision's ``alexnet`` -> {layer: (weights, bias)} as float32 NumPy."""
    try:
        import torch
    except ImportError:
        raise ConvertError("reading a .pth file needs PyTorch: pip install torch (CPU build is enough).") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConvertError(f"{path}: not a readable PyTorch state_dict ({type(e).__name__}: {e}).") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConvertError(f"{path}: holds a {type(state).__name__}, not a state_dict.")
    found = {}
    for name in LAYERS:
        key = KEYS[name]
        if f"{key}.weight" not in state or f"{key}.bias" not in state:
            raise ConvertError(
                f"{path}: no {key}.weight/.bias ({name}); torchvision's alexnet has "
                f"{', '.join(KEYS.values())}. Keys here: {', '.join(list(state)[:8])}..."
            )
        w, b = (state[f"{key}.{k}"].detach().float().numpy() for k in ("weight", "bias"))
        if w.shape != SHAPES[name] or b.shape != (SHAPES[name][0],):
            raise ConvertError(
                f"{path}: {key} ({name}) has weights {tuple(w.shape)} and bias {tuple(b.shape)}; "
                f"torchvision's alexnet has {SHAPES[name]} and ({SHAPES[name][0]},)."
            )
        found[name] = (w, b)
    return found


def to_params(torch_layers: dict) -> dict:
    """{layer: (weights, bias)} in PyTorch's layout -> ``{'towers': {layer: {kernel, bias}}}`` with one tower."""
    towers = {}
    for name in LAYERS:
        w, b = torch_layers[name]
        if name.startswith("conv"):
            k = w.transpose(2, 3, 1, 0)  # OIHW -> HWIO
            if name == "conv1":  # (x/255 - mean)/std = (x - 255 mean) / (255 std): fold the division in
                k = k / (255.0 * np.asarray(STD_RGB, np.float32))[None, None, :, None]
        else:
            k = w.T
            if name == "fc6":  # PyTorch flattens pool5 as C,H,W; we flatten H,W,C
                k = k.reshape(*POOL5_CHW, -1).transpose(1, 2, 0, 3).reshape(k.shape)
        towers[name] = {"kernel": np.ascontiguousarray(k, np.float32)[None], "bias": b.astype(np.float32)[None]}
    return {"towers": towers}


def owt_config():
    """``configs/owt.py``: the "one weird trick" net with the paper recipe; torchvision's test-time preprocessing."""
    import importlib.util
    import sys

    root = Path(__file__).resolve().parents[2]
    path = root / "configs" / "owt.py"
    if not path.is_file():
        raise ConvertError(f"{path} not found: run the converter from the repository checkout.")
    spec = importlib.util.spec_from_file_location("_owt_config", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(root))  # it imports configs.paper
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(root))
    c = module.get_config()
    c.data.format = "folder"
    c.eval_ten_crop = False  # torchvision's published error is the centre crop's
    return c


def convert(path: str | Path, out: str | Path) -> Path:
    """Write the checkpoint folder ``out`` (weights only, step 0); returns its step folder."""
    params = to_params(read_state_dict(path))
    classes, names = imagenet_classes()
    mean = np.broadcast_to(255.0 * np.asarray(MEAN_RGB, np.float32), (RESIZE, RESIZE, 3)).astype(np.float32)
    origin = {
        "source": str(Path(path).resolve()),
        "format": "torchvision alexnet state_dict",
        "input": "RGB, 0..255",
        "normalize": {"mean": MEAN_RGB, "std": STD_RGB, "of": "x / 255"},
        "folded": "mean image = 255 * mean; conv1 kernel input channels divided by 255 * std",
        "resize": f"shorter side to {RESIZE}",
        "crop": f"{CROP}, centre",
    }
    try:
        return write_weights_only(
            out,
            0,
            params,
            config=json.loads(owt_config().to_json()),
            origin=origin,
            dataset={"classes": classes, "class_names": names},
            stats={"mean_image": mean},
        )
    except CheckpointError as e:
        raise ConvertError(str(e)) from None
