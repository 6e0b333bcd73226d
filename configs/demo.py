"""The paper's recipe shrunk to run in minutes on a 2-core CPU: narrow, 64x64 crops.

Run:  python launch.py --config=configs/demo.py --workdir=runs/demo
"""

import ml_collections

from configs import paper


def get_config() -> ml_collections.ConfigDict:
    c = paper.get_config()
    c.model.width = 0.25  # a quarter of every layer's width
    c.model.image_size = 64  # 64x64 crops (conv1: 15x15, fc6 input 1x1 per tower)
    c.model.num_classes = 10  # classes of the embedded default dataset
    return c
