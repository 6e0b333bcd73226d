"""The paper's input pipeline on grain: layouts and labels, sources, transforms, preparation, embedded data.

    cfg = default_data_config()                      # every field commented
    it = build_train_iter(cfg, batch_size=128, seed=0)
    for batch in build_eval_iter(cfg, batch_size=128, mode='whole'): ...

Batches hold uint8 images; :mod:`alexnet_jax.data.device` normalises them in
the jitted step. The command ``python -m alexnet_jax.data.prepare`` is not
imported here, so running it does not load its module twice.
"""

from alexnet_jax.data.embedded import ensure_embedded_dataset
from alexnet_jax.data.locate import ResolvedData, check_config, drop_legacy_fields, resolve, split_records
from alexnet_jax.data.pipeline import (
    EvalPasses,
    build_eval_iter,
    build_train_iter,
    default_data_config,
    demo_data_config,
    release_shared_memory,
)

__all__ = [
    "EvalPasses",
    "ResolvedData",
    "build_eval_iter",
    "build_train_iter",
    "check_config",
    "default_data_config",
    "demo_data_config",
    "drop_legacy_fields",
    "ensure_embedded_dataset",
    "release_shared_memory",
    "resolve",
    "split_records",
]
