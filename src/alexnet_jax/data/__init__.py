"""The paper's input pipeline on grain: sources, transforms, preparation, embedded data.

Public entry points::

    cfg = default_data_config()                      # every field commented
    it = build_train_iter(cfg, batch_size=128, seed=0)
    state = it.get_state(); ...; it.set_state(state)
    for batch in build_eval_iter(cfg, batch_size=128, mode='ten_crop'): ...
    ensure_embedded_dataset(root)                    # the default dataset, generated once
"""

from alexnet_jax.data.embedded import ensure_embedded_dataset
from alexnet_jax.data.pipeline import (
    ResolvedData,
    build_eval_dataset,
    build_eval_iter,
    build_train_dataset,
    build_train_iter,
    default_data_config,
    demo_data_config,
    eval_num_batches,
    resolve,
)
from alexnet_jax.data.prepare import load_stats, read_metadata
from alexnet_jax.data.sources import DatasetError

__all__ = [
    "DatasetError", "ResolvedData", "build_eval_dataset", "build_eval_iter", "build_train_dataset",
    "build_train_iter", "default_data_config", "demo_data_config", "ensure_embedded_dataset",
    "eval_num_batches", "load_stats", "read_metadata", "resolve",
]
