"""Training and evaluation iterators: grain datasets from either source form.

Training stream (all index-based ``MapDataset`` steps, so any worker count
gives the same batches and an iterator's state is just a position)::

    decoded source -> shuffle(seed) -> repeat -> random crop/flip/alpha(seed)
        -> blocks of batch_size // shard_count -> this host's blocks [shard_index::shard_count]
        -> Normalize -> worker processes (mp_prefetch)

The shuffle and the augmentation happen on the *global* stream before the
host slice, and host h's batch t is the h-th contiguous block of global batch
t: the hosts' batches, concatenated in host order, are the one-host batch,
in the same order, whatever the number of hosts (dropout masks depend on an
example's row, so the order matters). Each host yields ``batch_size //
shard_count`` examples per step; ``batch_size`` is the global batch.

Evaluation covers the split exactly once: the stream is padded to a whole
number of global batches and padding (and any unreadable image) has
``mask=False``.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import grain
import ml_collections
from ml_collections.config_dict import placeholder
import numpy as np

from alexnet_jax.data import embedded, prepare, sources, transforms
from alexnet_jax.data import stats as stats_lib

log = logging.getLogger(__name__)


def default_data_config() -> ml_collections.ConfigDict:
    """Every field of the input pipeline, with the paper's values where it has one."""
    c = ml_collections.ConfigDict()
    c.name = 'embedded'          # 'embedded' (generated on first use, no download) | 'imagenet'
    c.root = placeholder(str)    # ImageNet-layout folder (train/<wnid>/, val/...); embedded: None = ~/.cache/alexnet_jax/embedded (or $ALEXNET_JAX_DATA/embedded)
    c.format = 'auto'            # 'auto': packed if packed_dir is set (or the embedded set), else folder | 'packed' (ArrayRecord shards from prepare) | 'folder' (decode the JPEG folder directly)
    c.packed_dir = placeholder(str)  # output of `python -m alexnet_jax.data.prepare`; embedded: None = prepared automatically under root
    c.stats_path = placeholder(str)  # stats.npz (mean image, RGB eigens); None = <packed_dir>/stats.npz, or computed once for a folder and cached
    c.val_labels = placeholder(str)  # labels file for a flat val/ folder; None = look for val_labels.txt / LOC_val_solution.csv
    c.resize_size = 256          # shorter side rescaled to this, then the central square kept (paper: 256)
    c.crop_size = 224            # training crops and evaluation views (paper: 224)
    c.flip = True                # random horizontal reflections in training (paper: yes)
    c.pca_lighting_std = 0.1     # std of alpha in the PCA lighting noise (paper: 0.1); 0 turns it off
    c.mean_subtraction = True    # subtract the training-set mean image (paper: yes)
    c.seed = 0                   # shuffle and augmentation seed when build_train_iter gets none
    c.num_workers = 2            # grain worker processes; 0 = decode in the calling process
    c.worker_buffer_size = 2     # batches each worker keeps ready
    c.num_threads = 2            # threads reading/decoding inside each process (Pillow releases the GIL)
    c.prefetch_buffer_size = 4   # elements read ahead per process
    c.output = 'float32'         # 'float32': normalised on the host | 'uint8': raw crops + crop_yx/flip/alpha, normalise with data.device.normalize in the jitted step
    c.eval_mode = 'center'       # 'center' (single centre crop) | 'ten_crop' (corners + centre, and mirrors)
    c.prepare_workers = placeholder(int)  # processes for automatic preparation (embedded set, folder statistics); None = all cores
    c.cache_dir = placeholder(str)  # where folder statistics are cached; None = $ALEXNET_JAX_DATA or ~/.cache/alexnet_jax
    # Embedded dataset only.
    c.embedded = ml_collections.ConfigDict()
    c.embedded.num_train_per_class = 300  # 10 classes
    c.embedded.num_val_per_class = 50     # held-out validation images per class
    c.embedded.image_size = 96            # size the JPEG files are drawn at
    c.embedded.seed = 0                   # generation seed (the dataset is a pure function of it)
    return c


def demo_data_config() -> ml_collections.ConfigDict:
    """The embedded data at a laptop-friendly size: 72 px images, 64 px crops."""
    c = default_data_config()
    c.resize_size, c.crop_size = 72, 64
    return c


@dataclasses.dataclass
class ResolvedData:
    """Everything the iterators need, found once: record sources, statistics, class names."""

    records: dict  # split -> FolderRecords | PackedRecords
    stats: dict | None
    classes: list[str]
    class_names: list[str]


_NO_IMAGENET = (
    "This config trains on ImageNet, and no dataset folder was given. Point it at ILSVRC-2012 with "
    "--config.data.root=/path/to/imagenet (train/<wnid>/*.JPEG, and val/<wnid>/*.JPEG or a flat val/ with "
    "a labels file), or at prepared shards with --config.data.format=packed "
    "--config.data.packed_dir=/path/to/packed (python -m alexnet_jax.data.prepare --src ... --dst ...). "
    "Without ImageNet, try --config=configs/demo.py.")


def _choice(cfg, field: str, allowed: tuple) -> None:
    if cfg[field] not in allowed:
        raise sources.DatasetError(f"data.{field} must be one of {', '.join(map(repr, allowed))}, "
                                   f"got {cfg[field]!r}")


def _existing(path, field: str, what: str, is_dir: bool) -> None:
    p = Path(path)
    if not (p.is_dir() if is_dir else p.is_file()):
        raise sources.DatasetError(f'--config.data.{field}={path}: {what} {str(p)!r} does not exist or is not a '
                                   f'{"folder" if is_dir else "file"}.')


def source_form(cfg) -> str:
    """'packed' or 'folder': what ``data.format`` means for this config ('auto' follows ``packed_dir``)."""
    if cfg.format != 'auto':
        return cfg.format
    return 'packed' if cfg.packed_dir is not None or cfg.name == 'embedded' else 'folder'


def check_config(cfg) -> None:
    """Every config and path error that can be seen without scanning the data, raised at once."""
    _choice(cfg, 'name', ('embedded', 'imagenet'))
    _choice(cfg, 'format', ('auto', 'packed', 'folder'))
    _choice(cfg, 'output', ('float32', 'uint8'))
    _choice(cfg, 'eval_mode', ('center', 'ten_crop'))
    if cfg.crop_size > cfg.resize_size:
        raise sources.DatasetError(f'data.crop_size={cfg.crop_size} is larger than data.resize_size='
                                   f'{cfg.resize_size}: crops are taken from the resized image.')
    if cfg.stats_path is not None:
        _existing(cfg.stats_path, 'stats_path', 'statistics file', is_dir=False)
    if cfg.val_labels is not None:
        _existing(cfg.val_labels, 'val_labels', 'labels file', is_dir=False)
    if cfg.name == 'embedded':
        return
    if source_form(cfg) == 'packed':
        if cfg.packed_dir is None:
            raise sources.DatasetError(_NO_IMAGENET if cfg.root is None else
                                       "data.format='packed' needs --config.data.packed_dir (the --dst of "
                                       "`python -m alexnet_jax.data.prepare`), or use --config.data.format=folder")
        meta = prepare.read_metadata(cfg.packed_dir)  # a finished preparation, in a format we read
        if meta['size'] != cfg.resize_size:
            raise sources.DatasetError(
                f"{cfg.packed_dir!r} holds {meta['size']}x{meta['size']} images but data.resize_size is "
                f"{cfg.resize_size}; prepare with --size {cfg.resize_size}, or set --config.data.resize_size="
                f"{meta['size']}.")
        return
    if cfg.root is None:
        if cfg.packed_dir is not None:
            raise sources.DatasetError('data.packed_dir is set but data.format is folder; add '
                                       '--config.data.format=packed to train on the packed shards.')
        raise sources.DatasetError(_NO_IMAGENET)
    sources.list_classes(cfg.root)  # root/ and root/train/ exist and hold class folders


def resolve(cfg, *, progress: bool = True) -> ResolvedData:
    """Locate (and for the embedded set, create and prepare) the data the config names.

    For a JPEG folder without ``stats_path`` the training-set statistics are
    computed on first use and cached (:mod:`alexnet_jax.data.stats`).
    """
    check_config(cfg)
    root = cfg.root
    packed_dir = cfg.packed_dir
    if cfg.name == 'embedded':
        e = cfg.embedded
        root = embedded.ensure_embedded_dataset(
            Path(root) if root is not None else None, num_train_per_class=e.num_train_per_class,
            num_val_per_class=e.num_val_per_class, image_size=e.image_size, seed=e.seed)
        if packed_dir is None:
            packed_dir = root.parent / f'{root.name}_packed{cfg.resize_size}'
            # Full-resolution chroma: at tens of pixels, 4:2:0 would visibly smear the colour halves.
            prepare.prepare(root, packed_dir, size=cfg.resize_size, subsampling='444', shard_size=512,
                            workers=cfg.prepare_workers, progress=False)
    needs_stats = cfg.mean_subtraction or cfg.pca_lighting_std > 0
    stats_path = cfg.stats_path or (Path(packed_dir) / prepare.STATS if packed_dir is not None else None)
    if source_form(cfg) == 'packed':
        meta = prepare.read_metadata(packed_dir)
        records = {s: sources.PackedRecords(prepare.shard_paths(packed_dir, s)) for s in meta['splits']}
        classes, class_names = meta['classes'], meta['class_names']
    else:
        classes = sources.list_classes(root)
        train_files = sources.scan_split(root, 'train', classes)
        records = {'train': sources.FolderRecords(train_files)}
        if (Path(root) / 'val').is_dir():
            records['val'] = _folder_split(root, 'val', classes, cfg.val_labels)
        class_names = sources.read_class_names(root, classes)
        if needs_stats and stats_path is None:
            stats_path = stats_lib.ensure_stats(train_files, cfg.resize_size, cache_dir=cfg.cache_dir,
                                                workers=cfg.prepare_workers, progress=progress)
    stats = None
    if needs_stats:
        stats = prepare.load_stats(stats_path)
        if stats['mean_image'].shape[:2] != (cfg.resize_size, cfg.resize_size):
            raise sources.DatasetError(f'{stats_path}: mean image is {stats["mean_image"].shape}, but '
                                       f'resize_size is {cfg.resize_size}')
    return ResolvedData(records, stats, list(classes), list(class_names))


def split_records(cfg, split: str, classes: list[str]):
    """One split's records, read as training reads them, for the given class list (the checkpoint's).

    The reader of training-time evaluation and of ``python -m alexnet_jax.evaluate``:
    any validation layout of :mod:`sources`, or the packed shards. The
    embedded set is made (once) if needed. The training split is not scanned.
    """
    if cfg.name == 'embedded':
        data = resolve(cfg, progress=False)
        if data.classes != list(classes) or split not in data.records:
            raise sources.DatasetError(f'the embedded set has no split {split!r} with these classes')
        return data.records[split]
    if source_form(cfg) == 'packed':
        if cfg.packed_dir is None:
            raise sources.DatasetError('data.format is packed but data.packed_dir is not set; add '
                                       '--config.data.packed_dir=DIR.')
        meta = prepare.read_metadata(cfg.packed_dir)
        if split not in meta['splits']:
            raise sources.DatasetError(f'{cfg.packed_dir!r} has no {split!r} split (it has {list(meta["splits"])}).')
        if list(meta['classes']) != list(classes):
            raise sources.DatasetError(f'{cfg.packed_dir!r} was packed with other classes than the model '
                                       f'knows ({len(meta["classes"])} vs {len(classes)}, or another order).')
        return sources.PackedRecords(prepare.shard_paths(cfg.packed_dir, split))
    if cfg.root is None:
        raise sources.DatasetError(_NO_IMAGENET)
    return _folder_split(cfg.root, split, classes, cfg.val_labels)


def _folder_split(root, split: str, classes: list[str], val_labels) -> sources.FolderRecords:
    return sources.FolderRecords(sources.scan_split(root, split, classes, val_labels if split == 'val' else None))


def _host_shard(shard_index, shard_count) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        import jax
        return jax.process_index(), jax.process_count()
    return int(shard_index), int(shard_count)


def _finish(cfg, ds: grain.MapDataset, stats, lighting: bool) -> grain.MapDataset:
    """Last step on the host: float32 normalisation, or leave uint8 for the device."""
    if cfg.output == 'uint8':
        return ds
    if cfg.output != 'float32':
        raise ValueError(f"output must be 'float32' or 'uint8', got {cfg.output!r}")
    return ds.map(_normalize(cfg, stats, lighting))


def _normalize(cfg, stats, lighting: bool) -> transforms.Normalize:
    if stats is None:
        return transforms.Normalize(None, None, None, False)
    return transforms.Normalize(stats['mean_image'] if cfg.mean_subtraction else None,
                                stats['eigval'], stats['eigvec'], lighting)


def _ensure_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside an absl app nobody parsed them."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _to_iter(cfg, ds: grain.MapDataset, num_workers: int | None):
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads,
                                                 prefetch_buffer_size=cfg.prefetch_buffer_size))
    n = cfg.num_workers if num_workers is None else num_workers
    if n > 0:
        _ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=n,
                                                               per_worker_buffer_size=cfg.worker_buffer_size))
    return it_ds


class EpochShuffle(grain.MapDataset):
    """``parent`` repeated forever, each epoch in its own random order, drawn from ``(seed, epoch)``.

    What ``shuffle(seed).repeat()`` gives, but with the epoch's permutation
    drawn once by NumPy and kept: grain's per-element ``index_shuffle`` cost
    ~130 us an image, a tenth of decoding a 256x256 JPEG.
    """

    def __init__(self, parent: grain.MapDataset, *, seed: int):
        super().__init__(parent)
        self._n, self._seed = len(parent), int(seed)
        self._epoch, self._order = -1, None

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return f'EpochShuffle(seed={self._seed})'

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, i = divmod(int(index), self._n)
        if epoch != self._epoch:  # elements are asked for in order, so this happens once an epoch
            self._order = np.random.default_rng([self._seed, epoch]).permutation(self._n)
            self._epoch = epoch
        return self._parent[int(self._order[i])]


def build_train_dataset(cfg, *, batch_size: int, seed: int | None = None, image_size: int | None = None,
                        shard_index: int | None = 0, shard_count: int | None = 1,
                        data: ResolvedData | None = None) -> grain.MapDataset:
    """The infinite training stream as a ``MapDataset`` of this host's batches (before workers)."""
    data = data or resolve(cfg)
    shard_index, shard_count = _host_shard(shard_index, shard_count)
    if batch_size % shard_count:
        raise ValueError(f'global batch {batch_size} is not divisible by {shard_count} hosts')
    seed = cfg.seed if seed is None else seed
    crop = image_size or cfg.crop_size
    src = sources.DecodedSource(data.records['train'], cfg.resize_size, on_error='substitute')
    ds = EpochShuffle(grain.MapDataset.source(src), seed=seed)
    ds = ds.random_map(transforms.RandomCropFlip(crop, cfg.flip, cfg.pca_lighting_std), seed=seed + 1)
    ds = ds.batch(batch_size // shard_count, drop_remainder=True)[shard_index::shard_count]
    return _finish(cfg, ds, data.stats, lighting=cfg.pca_lighting_std > 0)


class TrainIterator(grain.DatasetIterator):
    """Training batches whose saved state is just the next batch number (plus a fingerprint).

    Every batch is an element of a batch-indexed ``MapDataset``, so resuming at
    batch n is building the pipeline on ``ds[n:]``: the state does not depend
    on the number of worker processes, nor on the number of hosts (host h's
    batch n is always its slice of global batch n). Restoring a state made with
    another seed, global batch, crop or dataset raises instead of silently
    giving different data. A ``grain.DatasetIterator``, so grain's Orbax
    checkpoint handler saves it as it is.
    """

    def __init__(self, ds: grain.MapDataset, make_iter, fingerprint: dict):
        super().__init__()
        self._ds, self._make_iter, self._fingerprint = ds, make_iter, dict(fingerprint)
        self._next_batch = 0
        self._it = None  # built on first use, so set_state right after construction costs nothing

    def _ensure(self):
        if self._it is None:
            self._it = self._make_iter(self._ds[self._next_batch:])
        return self._it

    def __next__(self):
        self._assert_not_closed()
        batch = next(self._ensure())
        self._next_batch += 1
        return batch

    def get_state(self) -> dict:
        return {'next_batch': self._next_batch, **self._fingerprint}

    def set_state(self, state: dict) -> None:
        theirs = {k: v for k, v in state.items() if k != 'next_batch'}
        if theirs != self._fingerprint:
            raise ValueError(f'iterator state was saved for {theirs}, this iterator is {self._fingerprint}')
        if self._it is not None:
            self._it.close()
            self._it = None
        self._next_batch = int(state['next_batch'])

    def close(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None
        super().close()

    def __str__(self) -> str:
        return f'TrainIterator(next_batch={self._next_batch}, {self._fingerprint})'


def build_train_iter(cfg, *, batch_size: int, seed: int | None = None, image_size: int | None = None,
                     shard_index: int | None = 0, shard_count: int | None = 1,
                     num_workers: int | None = None, data: ResolvedData | None = None) -> TrainIterator:
    """Endless iterator of ``{'image': float32 (B, crop, crop, 3), 'label': int32 (B,), 'mask': bool (B,)}``.

    With ``cfg.output = 'uint8'`` the image stays uint8 and ``crop_yx``, ``flip``,
    ``alpha`` come along for :func:`alexnet_jax.data.device.normalize`.
    ``batch_size`` is global; this host gets ``batch_size // shard_count``.
    ``shard_index``/``shard_count`` None means ``jax.process_index()/process_count()``.
    Save with ``it.get_state()`` (a small JSON-able dict) and continue with
    ``it.set_state(state)`` on a freshly built iterator with the same config and
    seed (any worker count, any host count). Call ``it.close()`` to stop the
    worker processes.
    """
    data = data or resolve(cfg)
    ds = build_train_dataset(cfg, batch_size=batch_size, seed=seed, image_size=image_size,
                             shard_index=shard_index, shard_count=shard_count, data=data)
    fingerprint = {'seed': cfg.seed if seed is None else seed, 'global_batch_size': batch_size,
                   'crop_size': image_size or cfg.crop_size, 'resize_size': cfg.resize_size,
                   'num_train_examples': len(data.records['train'])}
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
        return {'image': np.zeros((self.src.size, self.src.size, 3), np.uint8),
                'label': np.int32(0), 'mask': np.bool_(False)}


def eval_num_batches(num_examples: int, batch_size: int) -> int:
    return -(-num_examples // batch_size)


def build_eval_dataset(cfg, *, batch_size: int, mode: str | None = None, split: str = 'val',
                       image_size: int | None = None, shard_index: int | None = 0,
                       shard_count: int | None = 1, data: ResolvedData | None = None) -> grain.MapDataset:
    data = data or resolve(cfg)
    if split not in data.records:
        raise sources.DatasetError(f'no {split!r} split in the data ({sorted(data.records)})')
    shard_index, shard_count = _host_shard(shard_index, shard_count)
    if batch_size % shard_count:
        raise ValueError(f'global batch {batch_size} is not divisible by {shard_count} hosts')
    mode = mode or cfg.eval_mode
    crop = image_size or cfg.crop_size
    view = {'center': transforms.CenterCrop, 'ten_crop': transforms.TenCrop, 'whole': lambda crop: transforms.Whole()}
    if mode not in view:
        raise ValueError(f"mode must be 'center', 'ten_crop' or 'whole', got {mode!r}")
    if mode == 'whole' and cfg.output != 'uint8':
        raise ValueError("mode 'whole' sends uint8 images for views cut on the device: it needs output='uint8'")
    src = sources.DecodedSource(data.records[split], cfg.resize_size, on_error='mask')
    total = eval_num_batches(len(src), batch_size) * batch_size
    ds = grain.MapDataset.source(_Padded(src, total)).map(view[mode](crop))
    ds = ds.batch(batch_size // shard_count, drop_remainder=True)[shard_index::shard_count]
    return _finish(cfg, ds, data.stats, lighting=False)


def build_eval_iter(cfg, *, batch_size: int, mode: str | None = None, split: str = 'val',
                    image_size: int | None = None, shard_index: int | None = 0, shard_count: int | None = 1,
                    num_workers: int | None = None, data: ResolvedData | None = None):
    """One pass over ``split``: ``{'image': float32 (B, crop, crop, 3) or (B, 10, crop, crop, 3),
    'label': int32 (B,), 'mask': bool (B,)}``; count only ``mask`` rows.

    Every host yields the same number of batches (padding included), so a
    collective eval step never waits on a host that has run out.
    """
    ds = build_eval_dataset(cfg, batch_size=batch_size, mode=mode, split=split, image_size=image_size,
                            shard_index=shard_index, shard_count=shard_count, data=data)
    return iter(_to_iter(cfg, ds, num_workers))


class EvalPasses:
    """Evaluation over a split again and again, with the same worker processes every time.

    Each call yields one exact pass (padding masked out, as
    :func:`build_eval_iter`). The stream underneath is the pass repeated, so
    the workers start once per run rather than once per evaluation (about 3 s
    each), and they decode the next pass's first batches while training runs.
    """

    def __init__(self, cfg, *, batch_size: int, mode: str | None = None, split: str = 'val',
                 image_size: int | None = None, shard_index: int | None = 0, shard_count: int | None = 1,
                 num_workers: int | None = None, data: ResolvedData | None = None):
        ds = build_eval_dataset(cfg, batch_size=batch_size, mode=mode, split=split, image_size=image_size,
                                shard_index=shard_index, shard_count=shard_count, data=data)
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
        if self._it is not None and hasattr(self._it, 'close'):
            self._it.close()
        self._it = None
