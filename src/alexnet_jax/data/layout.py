"""The ImageNet folder layout: which image files each split holds, with their labels.

``ROOT/train/<wnid>/`` fixes the classes (label i is the i-th sorted wnid);
a split is either class folders too or a flat folder plus a labels file
(:mod:`alexnet_jax.data.labels`). Whatever is left out is reported, never guessed.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from alexnet_jax.data.jobs import stop_if_signalled
from alexnet_jax.data.labels import DEVKIT_GROUND_TRUTH, find_labels_file, read_labels_file
from alexnet_jax.errors import DatasetError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

EXPECTED_LAYOUT = (
    "expected the ImageNet layout:\n"
    "  ROOT/train/<wnid>/*.JPEG   one folder per class (its name is the class id)\n"
    "  ROOT/val/<wnid>/*.JPEG     same classes, or a flat ROOT/val/*.JPEG plus a labels\n"
    "                             file (lines '<file name> <wnid>', or Kaggle's\n"
    "                             LOC_val_solution.csv, or the devkit's\n"
    f"                             {DEVKIT_GROUND_TRUTH} with its meta.mat)\n"
    "                             given as val_labels or found in ROOT/val, ROOT or\n"
    "                             ROOT/ILSVRC2012_devkit_t12/data\n"
    "or, for the packed form, the output folder of `python -m alexnet_jax.data.prepare`."
)


@dataclasses.dataclass
class SplitFiles:
    """The images of one split: paths relative to ``root``, labels, and what was left out."""

    root: str
    rel_paths: list[str]
    labels: np.ndarray  # int32 (N,)
    skipped: list[tuple[str, str]]  # (path, reason)

    def __len__(self) -> int:
        return len(self.rel_paths)


def _is_image_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DatasetError(f"{what} {str(path)!r} does not exist or is not a folder; {EXPECTED_LAYOUT}")


def list_classes(root: str | os.PathLike) -> list[str]:
    """Sorted class folder names of ``root/train``: label i is the i-th wnid."""
    train = Path(root) / "train"
    _require_dir(Path(root), "data folder")
    from alexnet_jax.data.parquet import shard_folder

    if not train.is_dir() and shard_folder(root) is not None:
        raise DatasetError(
            f"{str(root)!r} holds parquet shards (Hugging Face's ILSVRC/imagenet-1k); training reads "
            f"them packed: python -m alexnet_jax.data.prepare --src {root} --dst OUT, then "
            "--config.data.packed_dir=OUT"
        )
    _require_dir(train, "training folder")
    classes = sorted(d.name for d in train.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DatasetError(f"no class folders in {str(train)!r}; {EXPECTED_LAYOUT}")
    return classes


def scan_class_folders(split_dir: str | os.PathLike, classes: Sequence[str]) -> SplitFiles:
    """``split_dir/<wnid>/*`` -> files with labels from ``classes``.

    Folders not in ``classes`` are skipped (a label outside the training classes
    would be a wrong label) and empty class folders are reported.
    """
    split_dir = Path(split_dir)
    _require_dir(split_dir, "split folder")
    index = {c: i for i, c in enumerate(classes)}
    rel_paths, labels, skipped = [], [], []
    empty, unknown = [], []
    for d in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        stop_if_signalled("folder scan")
        if d.name not in index:
            unknown.append(d.name)
            skipped.extend((str(f), f"class folder {d.name!r} is not a training class") for f in sorted(d.iterdir()))
            continue
        files = sorted(f.name for f in d.iterdir() if f.is_file() and _is_image_file(f.name))
        others = sorted(f.name for f in d.iterdir() if f.is_file() and not _is_image_file(f.name))
        skipped.extend((str(d / f), "not an image file name") for f in others)
        if not files:
            empty.append(d.name)
        rel_paths.extend(f"{d.name}/{f}" for f in files)
        labels.extend([index[d.name]] * len(files))
    if empty:
        warnings.warn(f"{split_dir}: {len(empty)} empty class folder(s): {', '.join(empty[:20])}", stacklevel=2)
    if unknown and not rel_paths:  # nothing usable: one clear error, not a warning and a layout lecture
        raise DatasetError(
            f"{str(split_dir)!r} holds no folder of the {len(classes)} known classes; its folders "
            f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''} are class ids the "
            f"model does not know (its classes run {classes[0]} ... {classes[-1]})."
        )
    if unknown:
        warnings.warn(
            f"{split_dir}: skipping {len(unknown)} folder(s) that are not training classes: {', '.join(unknown[:20])}",
            stacklevel=2,
        )
    if not rel_paths:
        raise DatasetError(f"no images found under {str(split_dir)!r}; {EXPECTED_LAYOUT}")
    return SplitFiles(str(split_dir), rel_paths, np.asarray(labels, np.int32), skipped)


def scan_flat_folder(
    split_dir: str | os.PathLike,
    labels_file: str | os.PathLike,
    classes: Sequence[str],
    search: Sequence[str | os.PathLike] = (),
) -> SplitFiles:
    """Flat ``split_dir/*.JPEG`` + labels file -> files with labels.

    Files without a label, labels without a file and wnids that are not
    training classes are all left out and reported, never guessed.
    """
    split_dir = Path(split_dir)
    files = sorted(f.name for f in split_dir.iterdir() if f.is_file() and _is_image_file(f.name))
    stop_if_signalled("folder scan")
    if not files:
        raise DatasetError(f"no images found in {str(split_dir)!r}; {EXPECTED_LAYOUT}")
    mapping = read_labels_file(labels_file, files, search)
    index = {c: i for i, c in enumerate(classes)}
    rel_paths, labels, skipped = [], [], []
    for f in files:
        wnid = mapping.get(f)
        if wnid is None:
            skipped.append((str(split_dir / f), "no entry in labels file"))
        elif wnid not in index:
            skipped.append((str(split_dir / f), f"label {wnid!r} is not a training class"))
        else:
            rel_paths.append(f)
            labels.append(index[wnid])
    present = set(files)
    missing = [k for k in mapping if k not in present]
    for k in missing:
        skipped.append((str(split_dir / k), "in labels file but no such image"))
    if skipped:
        warnings.warn(
            f"{split_dir}: {len(skipped)} file(s)/label(s) left out while matching {labels_file}, e.g. {skipped[:5]}",
            stacklevel=2,
        )
    if not rel_paths:
        raise DatasetError(f"no image in {str(split_dir)!r} matched a label in {str(labels_file)!r}")
    return SplitFiles(str(split_dir), rel_paths, np.asarray(labels, np.int32), skipped)


def scan_split(
    root: str | os.PathLike,
    split: str,
    classes: Sequence[str] | None = None,
    labels_file: str | os.PathLike | None = None,
) -> SplitFiles:
    """One split of an ImageNet-layout folder, whichever of the two layouts it uses."""
    root = Path(root)
    classes = list(classes) if classes is not None else list_classes(root)
    split_dir = root / split
    _require_dir(root, "data folder")
    _require_dir(split_dir, f"{split} folder")
    has_subdirs = any(p.is_dir() and not p.name.startswith(".") for p in split_dir.iterdir())
    if has_subdirs or split == "train":
        return scan_class_folders(split_dir, classes)
    labels_file = labels_file or find_labels_file(root, split_dir)
    if labels_file is None:
        raise DatasetError(
            f"{str(split_dir)!r} is a flat folder but no labels file was given or found; {EXPECTED_LAYOUT}"
        )
    return scan_flat_folder(split_dir, labels_file, classes, search=(split_dir, root))
