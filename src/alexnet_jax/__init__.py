"""alexnet_jax: AlexNet (Krizhevsky, Sutskever & Hinton, 2012) in JAX/Flax, two towers and all.

The names a notebook needs, imported plainly so that go-to-definition finds them. Inference
(Orbax, Pillow) adds about a quarter to the import of JAX and Flax that the model costs anyway.
"""

from alexnet_jax.devices import use_virtual_cpu_devices
from alexnet_jax.errors import CheckpointError, ConfigError, ImageError
from alexnet_jax.inference import (
    Checkpoint,
    Classifier,
    Prediction,
    load_checkpoint,
    predict,
)
from alexnet_jax.model import LRN, AlexNet, count_params, default_config, from_config
from alexnet_jax.parallel import apply_on_mesh, make_mesh

__all__ = [
    "AlexNet",
    "ConfigError",
    "LRN",
    "count_params",
    "default_config",
    "from_config",
    "apply_on_mesh",
    "make_mesh",
    "use_virtual_cpu_devices",
    "Checkpoint",
    "CheckpointError",
    "Classifier",
    "ImageError",
    "Prediction",
    "load_checkpoint",
    "predict",
]
