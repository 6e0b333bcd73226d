"""The paper's recipe on the embedded default dataset, small enough for a 2-core CPU.

Run:  python launch.py --config=configs/demo.py --workdir=runs/demo
The dataset (10 classes of coloured shapes as real JPEGs) is generated on first use.
"""

import ml_collections

from alexnet_jax.data import demo_data_config
from configs import paper


def get_config() -> ml_collections.ConfigDict:
    c = paper.get_config()
    c.model.width = 0.25  # a quarter of every layer's width
    c.model.image_size = 64  # 64x64 crops of 72x72 images
    c.model.num_classes = 10  # classes of the embedded dataset
    # The paper's N(0, 0.01) with biases 1 stalls at chance for a net this narrow
    # (known to train slowly; Caffe changed it too); larger weights and Caffe's small bias train in minutes.
    c.model.init_std = 0.05  # weights ~ N(0, 0.05^2)
    c.model.init_bias = 0.1  # bias of conv2, conv4, conv5, fc6, fc7 (Caffe's choice)
    c.data = demo_data_config()  # embedded dataset, resized to 72, cropped to 64
    c.data.num_workers = 1  # one decoding process beside the training process
    c.batch_size = 64  # smaller batches, more steps per epoch on 3,000 images
    c.num_epochs = 15  # epochs over the embedded training set
    c.eval_batch_size = 100  # 500 validation images in 5 batches
    c.eval_ten_crop = True  # report the paper's ten-crop protocol too
    c.optim.plateau_patience = 0  # a short run: drop by schedule instead
    c.optim.drop_epochs = (12,)  # divide the LR by 10 for the last epochs
    c.log_every = 10  # steps between metric lines
    c.data.lock()  # the new data section, as paper.py locks the rest
    return c
