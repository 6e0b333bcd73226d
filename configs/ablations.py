"""The paper's comparisons as named variants, each once: the runner, the tests and the README read them here.

Run one:  python launch.py --config=configs/ablations.py:no_lrn --workdir=runs/no_lrn   (the demo recipe)
Run all:  python -m alexnet_jax.ablate --config=configs/demo.py --out runs/ablations --seeds 3

Each variant is a set of config overrides on a base recipe. The paper's own
effects (Section 3, ILSVRC-2012, top-1 / top-5 error) are in ``PAPER_DELTAS``.
"""

import ml_collections

from configs import demo

# name: {config field: value}. An empty dict is the recipe itself.
VARIANTS = {
    "baseline": {},
    "no_lrn": {"model.lrn": False},  # Section 3.3: LRN lowers error by 1.4% / 1.2%
    "pool_2x2": {"model.pool_window": 2, "model.pool_stride": 2},  # Section 3.4: overlap lowers it by 0.4% / 0.3%
    "one_tower": {"model.towers": 1},  # Section 3.2: two GPUs vs one lowers it by 1.7% / 1.2%
    "no_dropout": {"model.dropout": 0.0},  # Section 4.2: without dropout the net overfits
    "no_pca": {"data.pca_lighting_std": 0.0},  # Section 4.1: PCA lighting lowers top-1 error by over 1%
    "tanh": {"model.activation": "tanh"},  # Section 3.1's saturating unit (Figure 1 is CIFAR-10, not this net)
}

# Error reductions the paper reports for its design choice over the variant, (top-1, top-5), in points.
PAPER_DELTAS = {"no_lrn": (1.4, 1.2), "pool_2x2": (0.4, 0.3), "one_tower": (1.7, 1.2)}


def apply(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
    """``config`` with ``variant``'s overrides; a name that does not exist lists the valid ones."""
    if variant not in VARIANTS:
        raise KeyError(f"no ablation variant {variant!r}; the variants are {', '.join(VARIANTS)}")
    for path, value in VARIANTS[variant].items():
        node = config
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return config


def get_config(variant: str = "baseline") -> ml_collections.ConfigDict:
    return apply(demo.get_config(), variant or "baseline")
