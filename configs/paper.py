"""The paper's network (Krizhevsky, Sutskever & Hinton, 2012): two towers, 224 crops.

Run:  python launch.py --config=configs/paper.py --workdir=runs/paper
Ablations are overrides, e.g.  --config.model.lrn=False
                               --config.model.pool_window=2 --config.model.pool_stride=2
                               --config.model.towers=1
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.towers = 2  # 2: the two-GPU net; 1: the paper's one-GPU net (conv 48-128-192-192-256)
    c.model.lrn = True  # local response normalisation after conv1 and conv2 (Section 3.3)
    c.model.lrn_convention = "paper"  # 'paper': alpha as printed; 'alpha_over_n': cuda-convnet/Caffe/PyTorch
    c.model.pool_window = 3  # max-pool window z; 3 with stride 2 overlaps (Section 3.4)
    c.model.pool_stride = 2  # max-pool stride s; 2/2 is the non-overlapping ablation
    c.model.dropout = 0.5  # dropout rate in fc6 and fc7 (Section 4.2)
    c.model.activation = "relu"  # 'relu' or 'tanh' (Figure 1's comparison)
    c.model.num_classes = 1000  # ILSVRC classes; split evenly across the towers' fc8
    c.model.width = 1.0  # multiplier on every layer's width except fc8 (1.0 = paper)
    c.model.image_size = 224  # crop size fed to conv1 (55x55 after it, cuda-convnet rounding)
    c.model.init_std = 0.01  # weights ~ N(0, 0.01^2) (Section 5)
    c.model.init_bias = 1.0  # bias of conv2, conv4, conv5, fc6, fc7; the others start at 0

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # devices along the 'data' axis; -1: all devices / towers
    c.mesh.cpu_devices = 2  # virtual CPU devices to create when there is no accelerator

    c.seed = 0  # parameter initialisation and dropout
    return c
