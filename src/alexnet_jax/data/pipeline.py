"""The data config's fields (:func:`default_data_config`), and the grain iterators built from them.

Every step is an index-based ``MapDataset``, so any worker count gives the same batches and a state is a
position: source -> epoch shuffle -> crop/flip/alpha -> blocks of ``batch_size // shard_count`` (the
batch is global) -> this host's blocks -> workers. Shuffle and augmentation run before the host slice,
so the hosts' batches, concatenated in host order, are the one-host batch in its order (dropout masks
follow an example's row). Batches stay uint8 (a quarter of the bytes, no float work on the host); the
jitted step applies mean and lighting (:mod:`alexnet_jax.data.device`). Evaluation covers the split
once, padded to whole global batches with ``mask=False``; 'whole' mode sends each image once.
"""

from __future__ import annotations

import sys

import grain
import ml_collections
import numpy as np
from ml_collections.config_dict import placeholder

from alexnet_jax.data import sources, transforms
from alexnet_jax.data.locate import ResolvedData, resolve
from alexnet_jax.errors import DatasetError


def default_data_config() -> ml_collections.ConfigDict:
    """Every field of the input pipeline, with the paper's values where it has one."""
    c = ml_collections.ConfigDict()
    c.name = "embedded"  # 'embedded' (generated on first use, no download) | 'imagenet'
    # ImageNet-layout folder (train/<wnid>/, val/...)
    c.root = placeholder(str)  # embedded: None = ~/.cache/alexnet_jax/embedded (or $ALEXNET_JAX_DATA/embedded)
    # 'auto': packed if packed_dir is set (or the embedded set), else folder
    # | 'packed' (ArrayRecord shards from prepare) | 'folder' (decode the JPEG folder directly)
    c.format = "auto"
    # output of `python -m alexnet_jax.data.prepare`
    c.packed_dir = placeholder(str)  # embedded: None = prepared automatically under root
    # stats.npz (mean image, RGB eigens)
    c.stats_path = placeholder(str)  # None = <packed_dir>/stats.npz, or computed once for a folder and cached
    # 'computed': the training set's own mean image and RGB eigens (the paper; one pass over a folder, cached)
    # | 'published': no pass: ImageNet's published RGB mean (0.485, 0.456, 0.406)x255 as a constant image
    # and fb.resnet.torch's PCA eigens; not with stats_path
    c.stats = "computed"
    # labels file for a flat val/ folder
    c.val_labels = placeholder(str)  # None = look for val_labels.txt / LOC_val_solution.csv
    c.resize_size = 256  # shorter side rescaled to this, then the central square kept (paper: 256)
    # 'shorter_side' (the paper) | 'warp': whole image to resize_size^2, aspect ignored (Caffe's bvlc_alexnet)
    c.resize_mode = "shorter_side"
    c.crop_size = 224  # training crops and evaluation views (paper: 224)
    c.flip = True  # random horizontal reflections in training (paper: yes)
    c.pca_lighting_std = 0.1  # std of alpha in the PCA lighting noise (paper: 0.1); 0 turns it off
    c.mean_subtraction = True  # subtract the training-set mean image (paper: yes)
    c.num_workers = 2  # grain worker processes; 0 = decode in the calling process
    c.worker_buffer_size = 2  # batches each worker keeps ready
    c.num_threads = 2  # threads reading/decoding inside each process (Pillow releases the GIL)
    c.prefetch_buffer_size = 4  # elements read ahead per process
    # processes for automatic preparation (embedded set, folder statistics)
    c.prepare_workers = placeholder(int)  # None = all cores
    # where folder statistics are cached
    c.cache_dir = placeholder(str)  # None = $ALEXNET_JAX_DATA or ~/.cache/alexnet_jax
    # Embedded dataset only.
    c.embedded = ml_collections.ConfigDict()
    c.embedded.num_train_per_class = 300  # 10 classes
    c.embedded.num_val_per_class = 50  # held-out validation images per class
    c.embedded.image_size = 96  # size the JPEG files are drawn at
    c.embedded.seed = 0  # generation seed (the dataset is a pure function of it)
    return c


def demo_data_config() -> ml_collections.ConfigDict:
    """The embedded data at a laptop-friendly size: 72 px images, 64 px crops."""
    c = default_data_config()
    c.resize_size, c.crop_size = 72, 64
    return c


def _host_shard(shard_index, shard_count) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        import jax

        return jax.process_index(), jax.process_count()
    return int(shard_index), int(shard_count)


def _host_batches(ds: grain.MapDataset, batch_size: int, shard_index, shard_count) -> grain.MapDataset:
    """The last step on the host: the stream in blocks of ``batch_size // shard_count``, this host's blocks."""
    shard_index, shard_count = _host_shard(shard_index, shard_count)
    if batch_size % shard_count:
        raise ValueError(f"global batch {batch_size} is not divisible by {shard_count} hosts")
    return ds.batch(batch_size // shard_count, drop_remainder=True)[shard_index::shard_count]


def _ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside an absl app nobody parsed them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _to_iter(cfg, ds: grain.MapDataset, num_workers: int | None):
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch_buffer_size)
    )
    n = cfg.num_workers if num_workers is None else num_workers
    if n > 0:
        _ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=n, per_worker_buffer_size=cfg.worker_buffer_size),
            worker_init_fn=_worker_init,
        )
    return it_ds


def _worker_init(worker_index: int, worker_count: int) -> None:
    """In each loader worker: ignore SIGINT/SIGTERM (they reach every process of the job), and end with the parent.

    The main process needs the workers' batches to finish its step and save, and stops them itself (grain
    sets an event, then SIGKILLs); a worker whose main process died without doing so ends within a second.
    """
    import os
    import signal
    import threading
    import time

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = os.getppid()

    def end_with_parent():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=end_with_parent, daemon=True, name="end-with-parent").start()


def release_shared_memory() -> None:
    """Unlink the shared memory of the workers' batches before exit; call after the iterators are closed.

    grain frees it from a thread pool when an array is collected, a pool that never runs at exit, so the
    resource tracker reports every block as leaked. The pool is a private attribute: if it moves, this
    does nothing and the warning returns.
    """
    import gc

    from grain._src.python.ipc.shared_memory_array import SharedMemoryArray

    gc.collect()
    pool = getattr(SharedMemoryArray, "_del_thread_pool", None)
    if pool is not None:
        SharedMemoryArray._del_thread_pool = None  # later arrays are freed at once
        pool.close()
        pool.join()


class EpochShuffle(grain.MapDataset):
    """``parent`` repeated forever, each epoch in its own random order, drawn from ``(seed, epoch)``.

    ``shuffle(seed).repeat()`` with each epoch's permutation drawn once by NumPy: grain's per-element
    ``index_shuffle`` cost ~130 us an image, a tenth of decoding a 256x256 JPEG.
    """

    def __init__(self, parent: grain.MapDataset, *, seed: int):
        super().__init__(parent)
        self._n, self._seed = len(parent), int(seed)
        self._epoch, self._order = -1, None

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return f"EpochShuffle(seed={self._seed})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, i = divmod(int(index), self._n)
        if epoch != self._epoch:  # elements are asked for in order, so this happens once an epoch
            self._order = np.random.default_rng([self._seed, epoch]).permutation(self._n)
            self._epoch = epoch
        return self._parent[int(self._order[i])]


def build_train_dataset(
    cfg,
    *,
    batch_size: int,
    seed: int,
    image_size: int | None = None,
    shard_index: int | None = 0,
    shard_count: int | None = 1,
    data: ResolvedData | None = None,
) -> grain.MapDataset:
    """The infinite training stream as a ``MapDataset`` of this host's batches (before workers)."""
    data = data or resolve(cfg)
    crop = image_size or cfg.crop_size
    src = sources.DecodedSource(
        data.records["train"], cfg.resize_size, on_error="substitute", warp=cfg.resize_mode == "warp"
    )
    ds = EpochShuffle(grain.MapDataset.source(src), seed=seed)
    ds = ds.random_map(transforms.RandomCropFlip(crop, cfg.flip, cfg.pca_lighting_std), seed=seed + 1)
    return _host_batches(ds, batch_size, shard_index, shard_count)


class TrainIterator(grain.DatasetIterator):
    """Training batches whose saved state is the next batch number plus a fingerprint of the stream.

    Resuming at batch n is building the pipeline on ``ds[n:]``, so the state holds for any worker or host
    count. A state from another seed, global batch, crop or dataset raises instead of giving other data.
    A ``grain.DatasetIterator``, so grain's Orbax checkpoint handler saves it as it is.
    """

    def __init__(self, ds: grain.MapDataset, make_iter, fingerprint: dict):
        super().__init__()
        self._ds, self._make_iter, self._fingerprint = ds, make_iter, dict(fingerprint)
        self._next_batch = 0
        self._it = None  # built on first use, so set_state right after construction costs nothing

    def _ensure(self):
        if self._it is None:
            self._it = self._make_iter(self._ds[self._next_batch :])
        return self._it

    def __next__(self):
        self._assert_not_closed()
        batch = next(self._ensure())
        self._next_batch += 1
        return batch

    def get_state(self) -> dict:
        return {"next_batch": self._next_batch, **self._fingerprint}

    def set_state(self, state: dict) -> None:
        theirs = {k: v for k, v in state.items() if k != "next_batch"}
        if theirs != self._fingerprint:
            raise ValueError(f"iterator state was saved for {theirs}, this iterator is {self._fingerprint}")
        if self._it is not None:
            self._it.close()
            self._it = None
        self._next_batch = int(state["next_batch"])

    def close(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None
        super().close()

    def __str__(self) -> str:
        return f"TrainIterator(next_batch={self._next_batch}, {self._fingerprint})"


def build_train_iter(
    cfg,
    *,
    batch_size: int,
    seed: int,
    image_size: int | None = None,
    shard_index: int | None = 0,
    shard_count: int | None = 1,
    num_workers: int | None = None,
    data: ResolvedData | None = None,
) -> TrainIterator:
    """Endless iterator of ``{'image': uint8 (B, crop, crop, 3), 'label': int32 (B,), 'mask': bool (B,),
    'crop_yx', 'flip', 'alpha'}``, the last three for :func:`alexnet_jax.data.device.normalize`.

    ``batch_size`` is global; this host gets ``batch_size // shard_count`` (None: JAX's process index and
    count). ``get_state()`` is a small JSON-able dict for ``set_state`` on a fresh iterator with the same
    config and seed; ``close()`` stops the workers.
    """
    data = data or resolve(cfg)
    ds = build_train_dataset(
        cfg,
        batch_size=batch_size,
        seed=seed,
        image_size=image_size,
        shard_index=shard_index,
        shard_count=shard_count,
        data=data,
    )
    fingerprint = {
        "seed": seed,
        "global_batch_size": batch_size,
        "crop_size": image_size or cfg.crop_size,
        "resize_size": cfg.resize_size,
        "num_train_examples": len(data.records["train"]),
    }
    return TrainIterator(ds, lambda d: iter(_to_iter(cfg, d, num_workers)), fingerprint)


class _Padded:
    """Source of length ``total`` >= len(src): real examples, then masked-out zeros."""

    def __init__(self, src: sources.DecodedSource, total: int):
        self.src, self.total = src, total

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, i: int) -> dict:
        if i < len(self.src):
            return self.src[i]
        return {
            "image": np.zeros((self.src.size, self.src.size, 3), np.uint8),
            "label": np.int32(0),
            "mask": np.bool_(False),
        }


def eval_num_batches(num_examples: int, batch_size: int) -> int:
    """Batches in one evaluation pass: the last one padded, never dropped."""
    return -(-num_examples // batch_size)


def build_eval_dataset(
    cfg,
    *,
    batch_size: int,
    mode: str = "center",
    split: str = "val",
    image_size: int | None = None,
    shard_index: int | None = 0,
    shard_count: int | None = 1,
    data: ResolvedData | None = None,
) -> grain.MapDataset:
    if mode == "center":
        view = transforms.CenterCrop(image_size or cfg.crop_size)
    elif mode == "whole":
        view = transforms.Whole()
    else:  # 'ten_crop', the host's ten views, is gone: 'whole' gives the same views, cut on the device
        raise ValueError(
            f"mode must be 'center' (the centre crop) or 'whole' (whole images, cut into the ten "
            f"views on the device by data.device.eval_views), got {mode!r}"
        )
    data = data or resolve(cfg)
    if split not in data.records:
        raise DatasetError(f"no {split!r} split in the data ({sorted(data.records)})")
    src = sources.DecodedSource(data.records[split], cfg.resize_size, on_error="mask", warp=cfg.resize_mode == "warp")
    total = eval_num_batches(len(src), batch_size) * batch_size
    ds = grain.MapDataset.source(_Padded(src, total)).map(view)
    return _host_batches(ds, batch_size, shard_index, shard_count)


def build_eval_iter(
    cfg,
    *,
    batch_size: int,
    mode: str = "center",
    split: str = "val",
    image_size: int | None = None,
    shard_index: int | None = 0,
    shard_count: int | None = 1,
    num_workers: int | None = None,
    data: ResolvedData | None = None,
):
    """One pass over ``split``: ``{'image': uint8 (B, crop, crop, 3) ('center', with ``crop_yx``, ``flip``,
    ``alpha``) or (B, resize, resize, 3) ('whole'), 'label': int32 (B,), 'mask': bool (B,)}``; count only
    ``mask`` rows. Every host yields as many batches, so a collective eval step never waits on one.
    """
    ds = build_eval_dataset(
        cfg,
        batch_size=batch_size,
        mode=mode,
        split=split,
        image_size=image_size,
        shard_index=shard_index,
        shard_count=shard_count,
        data=data,
    )
    return iter(_to_iter(cfg, ds, num_workers))


class EvalPasses:
    """Each call yields one exact pass over a split (as :func:`build_eval_iter`), from the same workers.

    The stream underneath is the pass repeated, so the workers start once per run, not once per
    evaluation (about 3 s each), and decode the next pass's first batches while training runs.
    """

    def __init__(
        self,
        cfg,
        *,
        batch_size: int,
        mode: str = "center",
        split: str = "val",
        image_size: int | None = None,
        shard_index: int | None = 0,
        shard_count: int | None = 1,
        num_workers: int | None = None,
        data: ResolvedData | None = None,
    ):
        ds = build_eval_dataset(
            cfg,
            batch_size=batch_size,
            mode=mode,
            split=split,
            image_size=image_size,
            shard_index=shard_index,
            shard_count=shard_count,
            data=data,
        )
        self.num_batches = len(ds)
        self._make = lambda: iter(_to_iter(cfg, ds.repeat(), num_workers))
        self._it, self._taken = None, 0

    def __call__(self):
        if self._it is None:
            self._it = self._make()
        while self._taken % self.num_batches:  # a pass left unfinished (an error mid-evaluation)
            next(self._it)
            self._taken += 1
        for _ in range(self.num_batches):
            batch = next(self._it)
            self._taken += 1
            yield batch

    def close(self) -> None:
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it = None
