"""alexnet_jax: AlexNet (Krizhevsky, Sutskever & Hinton, 2012) in JAX/Flax, two towers and all."""

from alexnet_jax.model import AlexNet, ConfigError, LRN, count_params, default_config, from_config
from alexnet_jax.parallel import apply_on_mesh, make_mesh, use_virtual_cpu_devices

__all__ = [
    "AlexNet", "ConfigError", "LRN", "count_params", "default_config", "from_config",
    "apply_on_mesh", "make_mesh", "use_virtual_cpu_devices",
    "Checkpoint", "CheckpointError", "Classifier", "ImageError", "Prediction", "load_checkpoint", "predict",
]

# Inference pulls in Orbax and Pillow: imported on first use, so `import alexnet_jax` stays light.
_INFERENCE = ("Checkpoint", "CheckpointError", "Classifier", "ImageError", "Prediction", "load_checkpoint",
              "predict")


def __getattr__(name):
    if name in _INFERENCE:
        from alexnet_jax import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'alexnet_jax' has no attribute {name!r}")
