"""The net of "One weird trick for parallelizing convolutional neural networks" (Krizhevsky 2014).

Run:  python launch.py --config=configs/owt.py --config.data.root=/path/to/imagenet --workdir=runs/owt
      (on several devices, that paper's layout: --config.mesh.parallelism=hybrid)
Its costs per layout: python -m alexnet_jax.costs --config=configs/owt.py --devices=8 --config.mesh.parallelism=hybrid

One tower, conv 64-192-384-256-256, FC 4096-4096-1000, no LRN, conv1 padded by 2
(61,100,840 parameters): the network torchvision ships as ``alexnet``, which
``python -m alexnet_jax.convert --torchvision FILE.pth`` reads. Everything else
is the 2012 paper's recipe (configs/paper.py).
"""

import ml_collections

from configs import paper


def get_config() -> ml_collections.ConfigDict:
    c = paper.get_config()
    c.model.towers = 1  # one tower: its FC layers are split by the hybrid layout instead
    c.model.conv_widths = (64, 192, 384, 256, 256)  # conv1..conv5 maps
    c.model.fc_widths = (4096, 4096)  # fc6, fc7 units
    c.model.lrn = False  # no local response normalisation
    c.model.conv1_pad = 2  # 2 zeros on every side: 224 -> 55x55, as torchvision
    return c
