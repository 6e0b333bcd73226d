"""The paper's training run (Krizhevsky, Sutskever & Hinton, 2012) on ILSVRC-2012.

Run:  python launch.py --config=configs/paper.py --config.data.root=/path/to/imagenet --workdir=runs/paper
      (the first run computes the training set's mean image and RGB eigens, once, and caches them)
Fast: python -m alexnet_jax.data.prepare --src /path/to/imagenet --dst /path/to/packed
      python launch.py --config=configs/paper.py --config.data.packed_dir=/path/to/packed --workdir=runs/paper
Ablations are overrides: --config.model.lrn=False
                         --config.model.pool_window=2 --config.model.pool_stride=2
                         --config.model.towers=1
One GPU: the default runs both towers on it (mesh.tower=1); set --config.data.num_workers to the cores you have.
"""

import ml_collections

from alexnet_jax import model
from alexnet_jax.data import default_data_config


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # The model and data sections start from their defaults, each field commented where it is defined;
    # only what differs is set here. The optimiser, run, mesh and hosts sections have no defaults elsewhere.
    c.model = model.default_config()  # the paper's net as it is: fields and defaults in alexnet_jax/model.py

    c.data = default_data_config()  # the paper's preprocessing; fields in alexnet_jax/data/pipeline.py
    c.data.name = "imagenet"  # ILSVRC-2012 (Section 2) in its folder layout: train/<wnid>/*.JPEG, val/...
    c.data.num_workers = 8  # not the paper's: grain decoding processes an ImageNet run needs to keep up

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 0.01  # initial learning rate epsilon (Section 5); on resume, a new value is a manual drop
    c.optim.momentum = 0.9  # v <- 0.9 v - 0.0005 eps w - eps g
    c.optim.weight_decay = 5e-4  # decoupled: part of the update, not of the loss
    c.optim.decay_biases = False  # cuda-convnet decayed weights only; True decays every parameter
    c.optim.drop_epochs = ()  # fixed drop epochs, e.g. (30, 60, 80); the paper dropped by hand on plateaus
    c.optim.plateau_patience = 3  # evaluations without improvement before dividing the LR by 10; 0: off
    c.optim.plateau_min_delta = 0.001  # what counts as an improvement of validation top-1 error
    c.optim.plateau_max_drops = 3  # the paper dropped three times before stopping

    c.batch_size = 128  # global batch, split over the mesh's data axis (Section 5)
    c.num_epochs = 90  # "roughly 90 cycles through the training set"
    c.total_steps = -1  # > 0 cuts the run at this many steps whatever num_epochs says
    c.eval_batch_size = 128  # validation batch (global)
    c.eval_every = -1  # steps between evaluations; -1: once per epoch
    c.eval_ten_crop = True  # also report the paper's ten-crop averaged error
    c.checkpoint_every = -1  # steps between checkpoints; -1: once per epoch
    c.keep_checkpoints = 3  # the latest K are kept, plus the best by validation top-1 error
    c.log_every = 50  # steps between metric lines (metrics.jsonl, TensorBoard)

    c.mesh = ml_collections.ConfigDict()
    # 'towers' (the paper's split), 'data' (every device all towers)
    c.mesh.parallelism = "towers"  # or 'hybrid' (conv data-parallel, FC units split: "one weird trick")
    c.mesh.data = -1  # devices along the 'data' axis; -1: all devices / mesh.tower
    # devices along the 'tower' axis
    c.mesh.tower = -1  # -1: model.towers (one tower per device), 1: all towers on every device
    c.mesh.cpu_devices = 2  # virtual CPU devices to create (in each process) when there is no accelerator

    c.seed = 0  # parameter initialisation, dropout, data order and augmentation
    c.profile_steps = ()  # (A, B): a jax.profiler trace of steps A..B in <workdir>/profile/ (TensorBoard, Perfetto)
    c.max_bad_batches = 10  # batches with NaN/Inf inputs skipped (each reported with its step) before the run stops

    # Several processes (hosts) as one run; see README "Several hosts". Unset: one process.
    c.distributed = ml_collections.ConfigDict()
    # process 0's host:port
    c.distributed.coordinator_address = ml_collections.config_dict.placeholder(str)  # None: $JAX_COORDINATOR_ADDRESS
    c.distributed.num_processes = ml_collections.config_dict.placeholder(int)  # None: $JAX_NUM_PROCESSES
    # this process, 0..n-1
    c.distributed.process_id = ml_collections.config_dict.placeholder(int)  # None: $JAX_PROCESS_ID
    c.distributed.auto = False  # True: JAX finds all three on SLURM, Open MPI, Cloud TPU or Kubernetes
    c.distributed.timeout_s = 300  # how long to wait for all processes to join
    c.lock()  # a misspelt field is an error, not a new field nothing reads
    return c
