"""Which data a config names: its checks, and the record sources, statistics and classes it finds.

:func:`check_config` raises every error visible without scanning the data;
:func:`resolve` then finds (for the embedded set, makes and packs) the data and
returns a :class:`ResolvedData` that :mod:`alexnet_jax.data.pipeline` streams from.
:func:`split_records` opens one split for evaluation against a checkpoint's classes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from alexnet_jax.data import embedded, labels, layout, packed, packing, sources
from alexnet_jax.data import stats as stats_lib
from alexnet_jax.errors import DatasetError


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
    "Without ImageNet, try --config=configs/demo.py."
)


def _choice(cfg, field: str, allowed: tuple) -> None:
    if cfg[field] not in allowed:
        raise DatasetError(f"data.{field} must be one of {', '.join(map(repr, allowed))}, got {cfg[field]!r}")


def _existing(path, field: str, what: str, is_dir: bool) -> None:
    p = Path(path)
    if not (p.is_dir() if is_dir else p.is_file()):
        raise DatasetError(
            f"--config.data.{field}={path}: {what} {str(p)!r} does not exist or is not a "
            f"{'folder' if is_dir else 'file'}."
        )


def source_form(cfg) -> str:
    """'packed' or 'folder': what ``data.format`` means for this config ('auto' follows ``packed_dir``)."""
    if cfg.format != "auto":
        return cfg.format
    return "packed" if cfg.packed_dir is not None or cfg.name == "embedded" else "folder"


# Fields that older versions wrote into a run's data config, with every value they could hold. `output`
# chose where images were normalised ('float32': on the host, 'uint8': in the jitted step); both gave the
# same numbers, and the loader now always sends uint8. A config.json or checkpoint saved with it must still
# load (evaluate, predict, resume), so the field is accepted with one of its old values and then ignored.
LEGACY_FIELDS = {"output": ("float32", "uint8")}


def _check_legacy_fields(cfg) -> None:
    for field, allowed in LEGACY_FIELDS.items():
        if field in cfg:
            _choice(cfg, field, allowed)


def drop_legacy_fields(data: dict) -> dict:
    """A saved data section (a dict, from config.json or a checkpoint) without its :data:`LEGACY_FIELDS`."""
    _check_legacy_fields(data)
    return {k: v for k, v in data.items() if k not in LEGACY_FIELDS}


def check_config(cfg) -> None:
    """Every config and path error that can be seen without scanning the data, raised at once."""
    _choice(cfg, "name", ("embedded", "imagenet"))
    _choice(cfg, "format", ("auto", "packed", "folder"))
    _check_legacy_fields(cfg)  # an older run's saved config: checked, then ignored
    _choice(cfg, "resize_mode", ("shorter_side", "warp"))
    if cfg.resize_mode == "warp" and (cfg.name == "embedded" or source_form(cfg) == "packed"):
        raise DatasetError(
            "data.resize_mode='warp' needs the JPEG folder (--config.data.format=folder): packed "
            "shards hold shorter-side squares, and the warp needs the whole image."
        )
    if cfg.crop_size > cfg.resize_size:
        raise DatasetError(
            f"data.crop_size={cfg.crop_size} is larger than data.resize_size="
            f"{cfg.resize_size}: crops are taken from the resized image."
        )
    _choice(cfg, "stats", ("computed", "published"))
    if cfg.stats == "published" and cfg.stats_path is not None:
        raise DatasetError(
            f"data.stats='published' uses ImageNet's published mean and PCA eigens, and "
            f"data.stats_path={cfg.stats_path!r} names a statistics file: give one or the other "
            "(--config.data.stats=computed to use the file)."
        )
    if cfg.stats_path is not None:
        _existing(cfg.stats_path, "stats_path", "statistics file", is_dir=False)
    if cfg.val_labels is not None:
        _existing(cfg.val_labels, "val_labels", "labels file", is_dir=False)
    if cfg.name == "embedded":
        return
    if source_form(cfg) == "packed":
        if cfg.packed_dir is None:
            raise DatasetError(
                _NO_IMAGENET
                if cfg.root is None
                else "data.format='packed' needs --config.data.packed_dir (the --dst of "
                "`python -m alexnet_jax.data.prepare`), or use --config.data.format=folder"
            )
        meta = packed.read_metadata(cfg.packed_dir)  # a finished preparation, in a format we read
        if meta["size"] != cfg.resize_size:
            raise DatasetError(
                f"{cfg.packed_dir!r} holds {meta['size']}x{meta['size']} images but data.resize_size is "
                f"{cfg.resize_size}; prepare with --size {cfg.resize_size}, or set --config.data.resize_size="
                f"{meta['size']}."
            )
        return
    if cfg.root is None:
        if cfg.packed_dir is not None:
            raise DatasetError(
                "data.packed_dir is set but data.format is folder; add "
                "--config.data.format=packed to train on the packed shards."
            )
        raise DatasetError(_NO_IMAGENET)
    layout.list_classes(cfg.root)  # root/ and root/train/ exist and hold class folders


def resolve(cfg, *, progress: bool = True) -> ResolvedData:
    """Locate (and for the embedded set, create and prepare) the data the config names.

    For a JPEG folder without ``stats_path`` the training-set statistics are
    computed on first use and cached (:mod:`alexnet_jax.data.stats`);
    ``data.stats='published'`` takes ImageNet's published ones instead, for
    any source, with no pass and no file.
    """
    check_config(cfg)
    root = cfg.root
    packed_dir = cfg.packed_dir
    if cfg.name == "embedded":
        e = cfg.embedded
        root = embedded.ensure_embedded_dataset(
            Path(root) if root is not None else None,
            num_train_per_class=e.num_train_per_class,
            num_val_per_class=e.num_val_per_class,
            image_size=e.image_size,
            seed=e.seed,
        )
        if packed_dir is None:
            packed_dir = root.parent / f"{root.name}_packed{cfg.resize_size}"
            # Full-resolution chroma: at tens of pixels, 4:2:0 would visibly smear the colour halves.
            packing.prepare(
                root,
                packed_dir,
                size=cfg.resize_size,
                subsampling="444",
                shard_size=512,
                workers=cfg.prepare_workers,
                progress=False,
            )
    published = cfg.stats == "published"  # no pass and no file: ImageNet's published statistics
    needs_stats = cfg.mean_subtraction or cfg.pca_lighting_std > 0
    stats_path = cfg.stats_path or (Path(packed_dir) / packed.STATS if packed_dir is not None else None)
    if source_form(cfg) == "packed":
        meta = packed.read_metadata(packed_dir)
        records = {s: packed.packed_records(packed_dir, s) for s in meta["splits"]}  # jpeg or raw, per metadata
        classes, class_names = meta["classes"], meta["class_names"]
    else:
        classes = layout.list_classes(root)
        train_files = layout.scan_split(root, "train", classes)
        records = {"train": sources.FolderRecords(train_files)}
        if (Path(root) / "val").is_dir():
            records["val"] = _folder_split(root, "val", classes, cfg.val_labels)
        class_names = labels.read_class_names(root, classes)
        if needs_stats and stats_path is None and not published:
            stats_path = stats_lib.ensure_stats(
                train_files,
                cfg.resize_size,
                warp=cfg.resize_mode == "warp",
                cache_dir=cfg.cache_dir,
                workers=cfg.prepare_workers,
                progress=progress,
            )
    stats = None
    if needs_stats and published:
        stats = stats_lib.published_stats(cfg.resize_size)
    elif needs_stats:
        stats = stats_lib.load_stats(stats_path)
        if stats["mean_image"].shape[:2] != (cfg.resize_size, cfg.resize_size):
            raise DatasetError(
                f"{stats_path}: mean image is {stats['mean_image'].shape}, but resize_size is {cfg.resize_size}"
            )
    return ResolvedData(records, stats, list(classes), list(class_names))


def split_records(cfg, split: str, classes: list[str]):
    """One split's records, read as training reads them, for the given class list (the checkpoint's).

    The reader of training-time evaluation and of ``python -m alexnet_jax.evaluate``:
    any validation layout of :mod:`layout`, or the packed shards. The
    embedded set is made (once) if needed. The training split is not scanned.
    """
    if cfg.name == "embedded":
        data = resolve(cfg, progress=False)
        if data.classes != list(classes) or split not in data.records:
            raise DatasetError(f"the embedded set has no split {split!r} with these classes")
        return data.records[split]
    if source_form(cfg) == "packed":
        if cfg.packed_dir is None:
            raise DatasetError(
                "data.format is packed but data.packed_dir is not set; add --config.data.packed_dir=DIR."
            )
        meta = packed.read_metadata(cfg.packed_dir)
        if split not in meta["splits"]:
            raise DatasetError(f"{cfg.packed_dir!r} has no {split!r} split (it has {list(meta['splits'])}).")
        if list(meta["classes"]) != list(classes):
            raise DatasetError(
                f"{cfg.packed_dir!r} was packed with other classes than the model "
                f"knows ({len(meta['classes'])} vs {len(classes)}, or another order)."
            )
        return packed.packed_records(cfg.packed_dir, split)
    if cfg.root is None:
        raise DatasetError(_NO_IMAGENET)
    return _folder_split(cfg.root, split, classes, cfg.val_labels)


def _folder_split(root, split: str, classes: list[str], val_labels) -> sources.FolderRecords:
    return sources.FolderRecords(layout.scan_split(root, split, classes, val_labels if split == "val" else None))
