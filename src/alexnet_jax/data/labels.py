"""Which class each image is, and what each class is called.

Labels files for a flat ``val/`` folder (``<file name> <wnid>`` lines, Kaggle's
``LOC_val_solution.csv``, or the ILSVRC devkit's ground truth read through its
``meta.mat``) and the human-readable class names. Layout scanning that uses
them is in :mod:`alexnet_jax.data.layout`.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from alexnet_jax.errors import DatasetError

DEVKIT_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
_LABEL_FILE_CANDIDATES = (
    "val_labels.txt",
    "LOC_val_solution.csv",
    "val_labels.csv",
    "ILSVRC2012_validation_labels.txt",
    DEVKIT_GROUND_TRUTH,
)
# Where the ILSVRC 2012 devkit puts its ground truth and meta.mat, relative to ROOT.
_DEVKIT_DATA_DIRS = ("ILSVRC2012_devkit_t12/data", "devkit/data", "ILSVRC2012_devkit_t12")
_CLASS_NAME_FILES = ("class_names.txt", "LOC_synset_mapping.txt", "synset_words.txt", "words.txt")


def find_labels_file(root: Path, split_dir: Path) -> Path | None:
    """The first known labels file in ``split_dir``, ``root`` or ROOT's devkit folders."""
    for folder in (split_dir, root, *(root / d for d in _DEVKIT_DATA_DIRS)):
        for name in _LABEL_FILE_CANDIDATES:
            if (folder / name).is_file():
                return folder / name
    return None


def find_devkit_meta(*folders: Path) -> Path | None:
    """The devkit's ``meta.mat``: next to the ground truth, in ROOT, or in ROOT's devkit folder."""
    for folder in folders:
        for d in (".", *_DEVKIT_DATA_DIRS):
            if (Path(folder) / d / "meta.mat").is_file():
                return Path(folder) / d / "meta.mat"
    return None


def read_devkit_meta(path: str | os.PathLike) -> dict[int, tuple[str, str]]:
    """The devkit's ``meta.mat`` -> ``{ILSVRC2012_ID: (wnid, words)}`` for its 1000 leaf classes.

    The ids are the devkit's own order (1 is n02119789, kit fox), not the sorted
    wnids the class folders use, so they can only be read through this table.
    """
    from scipy.io import loadmat  # a JAX dependency already

    try:
        synsets = np.atleast_1d(loadmat(str(path), squeeze_me=True)["synsets"])
        ids = [int(i) for i in synsets["ILSVRC2012_ID"]]
        wnids = [str(w) for w in synsets["WNID"]]
    except Exception as e:
        raise DatasetError(
            f"{str(path)!r} is not the ILSVRC 2012 devkit's meta.mat (a MATLAB file with a "
            f"'synsets' struct holding ILSVRC2012_ID and WNID): {e}"
        ) from None
    words = [str(w) for w in synsets["words"]] if "words" in synsets.dtype.names else wnids
    leaf = (
        [int(n) == 0 for n in synsets["num_children"]]
        if "num_children" in synsets.dtype.names
        else [i <= 1000 for i in ids]
    )
    return {i: (w, t) for i, w, t, is_leaf in zip(ids, wnids, words, leaf) if is_leaf}


def devkit_file_name(line: int) -> str:
    """Line ``line`` (1-based) of the devkit ground truth is this image's label."""
    return f"ILSVRC2012_val_{line:08d}.JPEG"


def _read_devkit_ground_truth(
    path: Path, ids: list[str], file_names: Sequence[str], search: Sequence[Path]
) -> dict[str, str]:
    meta_path = find_devkit_meta(path.parent, *search)
    if meta_path is None:
        raise DatasetError(
            f"labels file {str(path)!r} holds integer class ids (the ILSVRC devkit ground truth). They "
            "are the devkit's own ids, not the order of the class folders, and only its meta.mat maps "
            f"them to wnids; meta.mat was not found next to it or in {[str(p) for p in search]}. Put "
            "the devkit's data/meta.mat next to the ground truth file."
        )
    table = read_devkit_meta(meta_path)
    unknown = sorted({int(i) for i in ids} - set(table))
    if unknown:
        raise DatasetError(
            f"{str(path)!r} has class ids {unknown[:5]} that {str(meta_path)!r} does not list "
            "as leaf classes; is it the meta.mat of the same devkit?"
        )
    by_stem = {os.path.splitext(f)[0]: f for f in file_names}
    out = {}
    for line, i in enumerate(ids, start=1):
        name = devkit_file_name(line)
        out[by_stem.get(os.path.splitext(name)[0], name)] = table[int(i)][0]
    return out


def read_labels_file(
    path: str | os.PathLike, file_names: Sequence[str], search: Sequence[str | os.PathLike] = ()
) -> dict[str, str]:
    """Labels file -> ``{file name: wnid}``.

    Accepted: lines ``<file name> <wnid>`` (space, tab or comma separated);
    Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString`` whose first
    token is the wnid); the devkit's ``ILSVRC2012_validation_ground_truth.txt``
    (line i is the id of ``ILSVRC2012_val_<i:08d>.JPEG``, mapped to a wnid by the
    devkit's ``meta.mat``, looked for next to it and in ``search``); or one wnid
    per line in sorted file-name order (only if the line count equals the number
    of files, else the pairing is ambiguous).
    """
    path = Path(path)
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not lines:
        raise DatasetError(f"labels file {str(path)!r} is empty")
    if lines[0].lower().startswith("imageid,"):
        out = {}
        for row in csv.reader(lines[1:]):
            if len(row) >= 2 and row[1].split():
                stem = row[0].strip()
                out[stem] = row[1].split()[0]
        # Kaggle ids have no extension: map them onto the actual file names.
        by_stem = {os.path.splitext(f)[0]: f for f in file_names}
        return {by_stem.get(k, k): v for k, v in out.items()}
    rows = [ln.replace(",", " ").split() for ln in lines]
    if all(len(r) == 1 for r in rows):
        if all(r[0].isdigit() for r in rows):
            return _read_devkit_ground_truth(path, [r[0] for r in rows], file_names, [Path(d) for d in search])
        names = sorted(file_names)
        if len(rows) != len(names):
            raise DatasetError(
                f"labels file {str(path)!r} has {len(rows)} labels (one per line, no file names) but "
                f"the folder has {len(names)} images; cannot pair them safely."
            )
        return {n: r[0] for n, r in zip(names, rows)}
    if any(len(r) < 2 for r in rows):
        bad = next(ln for ln, r in zip(lines, rows) if len(r) < 2)
        raise DatasetError(f'labels file {str(path)!r}: cannot parse line {bad!r}; expected "<file name> <wnid>"')
    return {r[0]: r[1] for r in rows}


def read_class_names(root: str | os.PathLike, classes: Sequence[str]) -> list[str]:
    """Human-readable names (``class_names.txt``, ``LOC_synset_mapping.txt``..., or the devkit's
    meta.mat) or, failing those, the wnids."""
    root = Path(root)
    for name in _CLASS_NAME_FILES:
        p = root / name
        if p.is_file():
            table = {}
            for ln in p.read_text().splitlines():
                parts = ln.strip().split(None, 1)
                if len(parts) == 2:
                    table[parts[0]] = parts[1]
            return [table.get(c, c) for c in classes]
    meta = find_devkit_meta(root)
    if meta is not None:
        try:
            table = dict(read_devkit_meta(meta).values())
        except DatasetError as e:
            warnings.warn(f"class names: {e}; using the wnids", stacklevel=2)
            table = {}
        return [table.get(c, c) for c in classes]
    return list(classes)


def imagenet_classes() -> tuple[list[str], list[str]]:
    """The 1000 ILSVRC-2012 classes in sorted-wnid order (the class index of every public AlexNet):
    ``(wnids, readable names)``, from the package's ``imagenet_classes.tsv``."""
    from importlib import resources

    text = resources.files("alexnet_jax.data").joinpath("imagenet_classes.tsv").read_text()
    rows = [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]
    return [w for w, _ in rows], [n for _, n in rows]
