"""``configs/paper.py`` is pinned to the paper's hyperparameters, written out here by hand.

Krizhevsky, Sutskever & Hinton (2012), the section each value comes from in
the comment. A change to the paper config (or to the defaults it inherits)
that departs from the paper fails here, and so does a model whose LRN
constants drift from Section 3.3.
"""

import importlib.util
from pathlib import Path

import pytest

from alexnet_jax.model import LRN, from_config

ROOT = Path(__file__).resolve().parents[1]

PAPER = {
    # Section 3 and Figure 2: two towers, overlapping pooling, LRN after conv1/conv2, 1000 classes, 224 crops.
    "model.towers": 2,
    "model.lrn": True,
    "model.lrn_convention": "paper",  # Section 3.3's formula read literally: alpha not divided by n
    "model.lrn_k": 2.0,  # Section 3.3: k = 2
    "model.lrn_scope": "tower",  # Section 3.2: the GPUs communicate only in certain layers, not in LRN
    "model.conv_widths": (),  # (): Figure 2's 96-256-384-384-256 (Section 3.5)
    "model.fc_widths": (),  # (): Section 3.5's 4096, 4096
    "model.pool_window": 3,  # Section 3.4: z = 3
    "model.pool_stride": 2,  # Section 3.4: s = 2
    "model.activation": "relu",  # Section 3.1
    "model.num_classes": 1000,  # Section 2
    "model.width": 1.0,
    "model.image_size": 224,  # Section 4.1: 224 x 224 patches
    # Section 4.2: dropout 0.5 in the first two fully connected layers.
    "model.dropout": 0.5,
    # Section 5: weights N(0, 0.01^2); biases 1 in conv2, conv4, conv5 and the hidden fc layers.
    "model.init_std": 0.01,
    "model.init_bias": 1.0,
    "model.dtype": "float32",
    # Section 5: SGD, batch 128, momentum 0.9, weight decay 0.0005 on the weights, initial LR 0.01.
    "batch_size": 128,
    "optim.momentum": 0.9,
    "optim.weight_decay": 0.0005,
    "optim.decay_biases": False,  # cuda-convnet decayed weights only
    "optim.lr": 0.01,
    # Section 5: divided by 10 when validation error stopped improving, three times; about 90 epochs.
    "optim.plateau_max_drops": 3,
    "optim.drop_epochs": (),
    "num_epochs": 90,
    # Sections 2 and 4.1: shorter side 256, central 256 square, mean image subtracted, random 224 crops and
    # reflections, PCA lighting with alpha ~ N(0, 0.1); Section 4.1: ten-view test averaging.
    "data.name": "imagenet",
    "data.resize_size": 256,
    "data.resize_mode": "shorter_side",
    "data.stats": "computed",  # Sections 2 and 4.1: the training set's own mean image and RGB PCA
    "data.crop_size": 224,
    "data.mean_subtraction": True,
    "data.flip": True,
    "data.pca_lighting_std": 0.1,
    "eval_ten_crop": True,
}


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get(config, dotted):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


@pytest.mark.parametrize("field, value", sorted(PAPER.items()))
def test_paper_config_holds_the_papers_value(field, value):
    got = get(load("paper"), field)
    assert (tuple(got) if isinstance(value, tuple) else got) == value, field


def test_paper_config_lrn_constants_and_plateau_rule_are_on():
    config = load("paper")
    assert config.optim.plateau_patience > 0  # the hand drops on plateaus, automated
    lrn = LRN()
    assert (lrn.k, lrn.n, lrn.alpha, lrn.beta, lrn.convention) == (2.0, 5, 1e-4, 0.75, "paper")  # Section 3.3
    model = from_config(config.model)
    assert model.lrn and model.pool_window == 3 and model.towers == 2
