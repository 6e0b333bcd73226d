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

from alexnet_jax.data import default_data_config


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    # 2: the two-GPU net; 1: the paper's one-GPU net (conv 48-128-192-192-256)
    c.model.towers = 2  # K: the widths split K ways
    # conv1..conv5 maps of the whole net
    c.model.conv_widths = ()  # (): the paper's (96-256-384-384-256; one tower: footnote 2's)
    c.model.fc_widths = ()  # fc6, fc7 units of the whole net; (): 4096, 4096
    c.model.conv1_pad = -1  # conv1 zero padding: -1 as cuda-convnet (far edge, 224 -> 55x55); 2: torchvision's
    c.model.lrn = True  # local response normalisation after conv1 and conv2 (Section 3.3)
    c.model.lrn_convention = "paper"  # 'paper': alpha as printed; 'alpha_over_n': cuda-convnet/Caffe/PyTorch
    c.model.lrn_k = 2.0  # LRN's k (Section 3.3); Caffe's bvlc_alexnet uses 1
    c.model.lrn_scope = "tower"  # LRN's window stays within a tower (each GPU's maps); 'layer': across both, as Caffe
    c.model.pool_window = 3  # max-pool window z; 3 with stride 2 overlaps (Section 3.4)
    c.model.pool_stride = 2  # max-pool stride s; 2/2 is the non-overlapping ablation
    c.model.dropout = 0.5  # dropout rate in fc6 and fc7 (Section 4.2)
    c.model.activation = "relu"  # 'relu' (Section 3.1) or 'tanh', the saturating unit it replaced
    c.model.num_classes = 1000  # ILSVRC classes; split evenly across the towers' fc8
    c.model.width = 1.0  # multiplier on every layer's width except fc8 (1.0 = paper)
    c.model.image_size = 224  # crop size fed to conv1 (55x55 after it, cuda-convnet rounding)
    c.model.init_std = 0.01  # weights ~ N(0, 0.01^2) (Section 5)
    c.model.init_bias = 1.0  # bias of conv2, conv4, conv5, fc6, fc7; the others start at 0
    c.model.dtype = "float32"  # compute dtype; 'bfloat16' for accelerators (parameters, optimizer stay float32)
    # how convs/pooling/LRN are computed: 'auto' = 'fast' forms on CPU,
    c.model.ops = "auto"  # 'plain' (grouped convs, select-and-scatter) elsewhere

    c.data = default_data_config()  # every field is commented in alexnet_jax/data/pipeline.py
    c.data.name = "imagenet"  # ILSVRC-2012 in its folder layout: train/<wnid>/*.JPEG, val/...
    c.data.root = ml_collections.config_dict.placeholder(str)  # set --config.data.root=/path/to/imagenet
    c.data.format = "auto"  # 'auto': the packed shards if packed_dir is set, else the JPEG folder; or 'folder'/'packed'
    c.data.num_workers = 8  # grain worker processes decoding and augmenting
    # 'computed' (Section 4.1): the training set's own mean image and RGB eigens, one cached pass over a folder
    # (~50 min); 'published': ImageNet's published RGB mean and fb.resnet.torch's PCA, no pass.
    c.data.stats = "computed"  # the mean image and lighting eigens: 'computed' or 'published' (above)

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
