"""The paper's input pipeline on grain: layouts and labels, sources, transforms, preparation, embedded data.

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
    'DatasetError': 'errors',
    'ResolvedData': 'locate',
    'check_config': 'locate',
    'resolve': 'locate',
    'split_records': 'locate',
    'default_data_config': 'pipeline',
    'demo_data_config': 'pipeline',
    'build_train_iter': 'pipeline',
    'build_eval_iter': 'pipeline',
    'EvalPasses': 'pipeline',
    'release_shared_memory': 'pipeline',
    'ensure_embedded_dataset': 'embedded',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    value = getattr(importlib.import_module(f'{__name__}.{_EXPORTS[name]}'), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
