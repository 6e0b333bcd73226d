"""The paper's input pipeline on grain: sources, transforms, preparation, embedded data.

Public entry points::

    cfg = default_data_config()                      # every field commented
    it = build_train_iter(cfg, batch_size=128, seed=0)
    state = it.get_state(); ...; it.set_state(state)
    for batch in build_eval_iter(cfg, batch_size=128, mode='ten_crop'): ...
    ensure_embedded_dataset(root)                    # the default dataset, generated once

Names are imported on first use, so that ``python -m alexnet_jax.data.prepare``
does not import its own module twice (and worker processes stay light).
"""

import importlib

_EXPORTS = {
    'DatasetError': 'sources',
    'ResolvedData': 'pipeline',
    'build_eval_dataset': 'pipeline',
    'build_eval_iter': 'pipeline',
    'EvalPasses': 'pipeline',
    'build_train_dataset': 'pipeline',
    'build_train_iter': 'pipeline',
    'default_data_config': 'pipeline',
    'demo_data_config': 'pipeline',
    'eval_num_batches': 'pipeline',
    'resolve': 'pipeline',
    'split_records': 'pipeline',
    'check_config': 'pipeline',
    'ensure_stats': 'stats',
    'ensure_embedded_dataset': 'embedded',
    'load_stats': 'prepare',
    'read_metadata': 'prepare',
    'normalize_on_device': ('device', 'normalize'),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    target = _EXPORTS[name]
    module, attr = target if isinstance(target, tuple) else (target, name)
    value = getattr(importlib.import_module(f'{__name__}.{module}'), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
