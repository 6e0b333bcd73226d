"""alexnet_jax: AlexNet (Krizhevsky, Sutskever & Hinton, 2012) in JAX/Flax, two towers and all."""

from alexnet_jax.model import AlexNet, ConfigError, LRN, count_params, default_config, from_config
from alexnet_jax.parallel import apply_on_mesh, make_mesh, use_virtual_cpu_devices

__all__ = [
    "AlexNet", "ConfigError", "LRN", "count_params", "default_config", "from_config",
    "apply_on_mesh", "make_mesh", "use_virtual_cpu_devices",
]
