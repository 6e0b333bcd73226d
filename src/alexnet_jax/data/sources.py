"""Where images come from: the ImageNet folder layout, the packed ArrayRecord
form, and robust decoding into uint8 ``size x size x 3`` arrays.

Two record forms, one interface: a record source maps an index to
``(name, label, encoded_bytes)``; :class:`DecodedSource` turns that into
``{'image': uint8 HWC, 'label': int32, 'mask': bool}``. Decoding never raises
mid-epoch: an unreadable image is either replaced by the next readable one
(training) or returned with ``mask=False`` (evaluation), and is always named
in a warning.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import struct
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')
# Files ILSVRC ships next to the images that are never images.
_DEVKIT_GROUND_TRUTH = 'ILSVRC2012_validation_ground_truth.txt'
_LABEL_FILE_CANDIDATES = (
    'val_labels.txt', 'LOC_val_solution.csv', 'val_labels.csv',
    'ILSVRC2012_validation_labels.txt', _DEVKIT_GROUND_TRUTH,
)
# Where the ILSVRC 2012 devkit puts its ground truth and meta.mat, relative to ROOT.
_DEVKIT_DATA_DIRS = ('ILSVRC2012_devkit_t12/data', 'devkit/data', 'ILSVRC2012_devkit_t12')
_CLASS_NAME_FILES = ('class_names.txt', 'LOC_synset_mapping.txt', 'synset_words.txt', 'words.txt')

EXPECTED_LAYOUT = (
    "expected the ImageNet layout:\n"
    "  ROOT/train/<wnid>/*.JPEG   one folder per class (its name is the class id)\n"
    "  ROOT/val/<wnid>/*.JPEG     same classes, or a flat ROOT/val/*.JPEG plus a labels\n"
    "                             file (lines '<file name> <wnid>', or Kaggle's\n"
    "                             LOC_val_solution.csv, or the devkit's\n"
    f"                             {_DEVKIT_GROUND_TRUTH} with its meta.mat)\n"
    "                             given as val_labels or found in ROOT/val, ROOT or\n"
    "                             ROOT/ILSVRC2012_devkit_t12/data\n"
    "or, for the packed form, the output folder of `python -m alexnet_jax.data.prepare`."
)


class DatasetError(ValueError):
    """The data on disk is not what the pipeline needs; the message says why."""


class DecodeError(Exception):
    """One image could not be decoded (it is skipped, never fatal)."""


# ---------------------------------------------------------------------------
# Decoding


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Bytes of any Pillow-readable image -> uint8 ``(size, size, 3)`` RGB.

    The paper's preprocessing: rescale so the shorter side is ``size``, keep the
    central ``size x size``. CMYK, grayscale, palette and PNG-named-JPEG inputs
    are converted to RGB; truncated or corrupt files raise :class:`DecodeError`.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format == 'JPEG':
                # Let libjpeg decode at 1/2, 1/4, 1/8 scale when the image is
                # much larger than needed: same result class, much cheaper.
                im.draft('RGB', (size, size))
            im.load()
            img_HWC = rescale_center_square(im, size)
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError...
        raise DecodeError(f'{type(e).__name__}: {e}') from e
    if img_HWC.shape != (size, size, 3):
        raise DecodeError(f'unexpected decoded shape {img_HWC.shape}')
    return img_HWC


def rescale_center_square(im: Image.Image, size: int) -> np.ndarray:
    """A loaded Pillow image -> uint8 ``(size, size, 3)`` RGB: shorter side to ``size``, central square.

    Shared by decoding and by inference on in-memory images, so both see the same pixels.
    """
    img = im.convert('RGB') if im.mode != 'RGB' else im
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def encode_jpeg(img_HWC: np.ndarray, quality: int = 95, subsampling: str = '420') -> bytes:
    """uint8 HWC -> JPEG bytes (what the packed form stores).

    ``subsampling`` '420' (half-resolution chroma, the usual JPEG choice and the
    fastest to decode) or '444' (full chroma: ~1.3x slower to decode, closer
    to the source since colour edges are not blurred a second time).
    """
    codes = {'444': 0, '422': 1, '420': 2}
    if subsampling not in codes:
        raise ValueError(f'subsampling must be one of {sorted(codes)}, got {subsampling!r}')
    buf = io.BytesIO()
    Image.fromarray(img_HWC).save(buf, format='JPEG', quality=quality, subsampling=codes[subsampling])
    return buf.getvalue()


# ---------------------------------------------------------------------------
# Folder layout


@dataclasses.dataclass
class SplitFiles:
    """The images of one split: paths relative to ``root``, labels, and what was left out."""

    root: str
    rel_paths: list[str]
    labels: np.ndarray  # int32 (N,)
    classes: list[str]  # wnids; label i is classes[i]
    skipped: list[tuple[str, str]]  # (path, reason)

    def __len__(self) -> int:
        return len(self.rel_paths)


def _is_image_file(name: str) -> bool:
    return not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS)


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DatasetError(f'{what} {str(path)!r} does not exist or is not a folder; {EXPECTED_LAYOUT}')


def list_classes(root: str | os.PathLike) -> list[str]:
    """Sorted class folder names of ``root/train``: label i is the i-th wnid."""
    train = Path(root) / 'train'
    _require_dir(Path(root), 'data folder')
    _require_dir(train, 'training folder')
    classes = sorted(d.name for d in train.iterdir() if d.is_dir() and not d.name.startswith('.'))
    if not classes:
        raise DatasetError(f'no class folders in {str(train)!r}; {EXPECTED_LAYOUT}')
    return classes


def scan_class_folders(split_dir: str | os.PathLike, classes: Sequence[str]) -> SplitFiles:
    """``split_dir/<wnid>/*`` -> files with labels from ``classes``.

    Folders not in ``classes`` are skipped (a label outside the training classes
    would be a wrong label) and empty class folders are reported.
    """
    split_dir = Path(split_dir)
    _require_dir(split_dir, 'split folder')
    index = {c: i for i, c in enumerate(classes)}
    rel_paths, labels, skipped = [], [], []
    empty, unknown = [], []
    for d in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith('.')):
        if d.name not in index:
            unknown.append(d.name)
            skipped.extend((str(f), f'class folder {d.name!r} is not a training class') for f in sorted(d.iterdir()))
            continue
        files = sorted(f.name for f in d.iterdir() if f.is_file() and _is_image_file(f.name))
        others = sorted(f.name for f in d.iterdir() if f.is_file() and not _is_image_file(f.name))
        skipped.extend((str(d / f), 'not an image file name') for f in others)
        if not files:
            empty.append(d.name)
        rel_paths.extend(f'{d.name}/{f}' for f in files)
        labels.extend([index[d.name]] * len(files))
    if empty:
        warnings.warn(f'{split_dir}: {len(empty)} empty class folder(s): {", ".join(empty[:20])}', stacklevel=2)
    if unknown:
        warnings.warn(f'{split_dir}: skipping {len(unknown)} folder(s) that are not training classes: '
                      f'{", ".join(unknown[:20])}', stacklevel=2)
    if not rel_paths:
        raise DatasetError(f'no images found under {str(split_dir)!r}; {EXPECTED_LAYOUT}')
    return SplitFiles(str(split_dir), rel_paths, np.asarray(labels, np.int32), list(classes), skipped)


def find_labels_file(root: Path, split_dir: Path) -> Path | None:
    for folder in (split_dir, root, *(root / d for d in _DEVKIT_DATA_DIRS)):
        for name in _LABEL_FILE_CANDIDATES:
            if (folder / name).is_file():
                return folder / name
    return None


def find_devkit_meta(*folders: Path) -> Path | None:
    """The devkit's ``meta.mat``: next to the ground truth, in ROOT, or in ROOT's devkit folder."""
    for folder in folders:
        for d in ('.', *_DEVKIT_DATA_DIRS):
            if (Path(folder) / d / 'meta.mat').is_file():
                return Path(folder) / d / 'meta.mat'
    return None


def read_devkit_meta(path: str | os.PathLike) -> dict[int, tuple[str, str]]:
    """The devkit's ``meta.mat`` -> ``{ILSVRC2012_ID: (wnid, words)}`` for its 1000 leaf classes.

    The ids are the devkit's own order (1 is n02119789, kit fox), not the sorted
    wnids the class folders use, so they can only be read through this table.
    """
    from scipy.io import loadmat  # a JAX dependency already

    try:
        synsets = np.atleast_1d(loadmat(str(path), squeeze_me=True)['synsets'])
        ids = [int(i) for i in synsets['ILSVRC2012_ID']]
        wnids = [str(w) for w in synsets['WNID']]
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        raise DatasetError(f"{str(path)!r} is not the ILSVRC 2012 devkit's meta.mat (a MATLAB file with a "
                           f"'synsets' struct holding ILSVRC2012_ID and WNID): {e}") from None
    words = [str(w) for w in synsets['words']] if 'words' in synsets.dtype.names else wnids
    leaf = ([int(n) == 0 for n in synsets['num_children']] if 'num_children' in synsets.dtype.names
            else [i <= 1000 for i in ids])
    return {i: (w, t) for i, w, t, is_leaf in zip(ids, wnids, words, leaf) if is_leaf}


def devkit_file_name(line: int) -> str:
    """Line ``line`` (1-based) of the devkit ground truth is this image's label."""
    return f'ILSVRC2012_val_{line:08d}.JPEG'


def _read_devkit_ground_truth(path: Path, ids: list[str], file_names: Sequence[str],
                              search: Sequence[Path]) -> dict[str, str]:
    meta_path = find_devkit_meta(path.parent, *search)
    if meta_path is None:
        raise DatasetError(
            f'labels file {str(path)!r} holds integer class ids (the ILSVRC devkit ground truth). They '
            "are the devkit's own ids, not the order of the class folders, and only its meta.mat maps "
            f"them to wnids; meta.mat was not found next to it or in {[str(p) for p in search]}. Put "
            "the devkit's data/meta.mat next to the ground truth file.")
    table = read_devkit_meta(meta_path)
    unknown = sorted({int(i) for i in ids} - set(table))
    if unknown:
        raise DatasetError(f'{str(path)!r} has class ids {unknown[:5]} that {str(meta_path)!r} does not list '
                           'as leaf classes; is it the meta.mat of the same devkit?')
    by_stem = {os.path.splitext(f)[0]: f for f in file_names}
    out = {}
    for line, i in enumerate(ids, start=1):
        name = devkit_file_name(line)
        out[by_stem.get(os.path.splitext(name)[0], name)] = table[int(i)][0]
    return out


def read_labels_file(path: str | os.PathLike, file_names: Sequence[str],
                     search: Sequence[str | os.PathLike] = ()) -> dict[str, str]:
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
        raise DatasetError(f'labels file {str(path)!r} is empty')
    if lines[0].lower().startswith('imageid,'):
        out = {}
        for row in csv.reader(lines[1:]):
            if len(row) >= 2 and row[1].split():
                stem = row[0].strip()
                out[stem] = row[1].split()[0]
        # Kaggle ids have no extension: map them onto the actual file names.
        by_stem = {os.path.splitext(f)[0]: f for f in file_names}
        return {by_stem.get(k, k): v for k, v in out.items()}
    rows = [ln.replace(',', ' ').split() for ln in lines]
    if all(len(r) == 1 for r in rows):
        if all(r[0].isdigit() for r in rows):
            return _read_devkit_ground_truth(path, [r[0] for r in rows], file_names, [Path(d) for d in search])
        names = sorted(file_names)
        if len(rows) != len(names):
            raise DatasetError(
                f'labels file {str(path)!r} has {len(rows)} labels (one per line, no file names) but '
                f'the folder has {len(names)} images; cannot pair them safely.')
        return {n: r[0] for n, r in zip(names, rows)}
    if any(len(r) < 2 for r in rows):
        bad = next(ln for ln, r in zip(lines, rows) if len(r) < 2)
        raise DatasetError(f'labels file {str(path)!r}: cannot parse line {bad!r}; expected "<file name> <wnid>"')
    return {r[0]: r[1] for r in rows}


def scan_flat_folder(split_dir: str | os.PathLike, labels_file: str | os.PathLike,
                     classes: Sequence[str], search: Sequence[str | os.PathLike] = ()) -> SplitFiles:
    """Flat ``split_dir/*.JPEG`` + labels file -> files with labels.

    Files without a label, labels without a file and wnids that are not
    training classes are all left out and reported, never guessed.
    """
    split_dir = Path(split_dir)
    files = sorted(f.name for f in split_dir.iterdir() if f.is_file() and _is_image_file(f.name))
    if not files:
        raise DatasetError(f'no images found in {str(split_dir)!r}; {EXPECTED_LAYOUT}')
    mapping = read_labels_file(labels_file, files, search)
    index = {c: i for i, c in enumerate(classes)}
    rel_paths, labels, skipped = [], [], []
    for f in files:
        wnid = mapping.get(f)
        if wnid is None:
            skipped.append((str(split_dir / f), 'no entry in labels file'))
        elif wnid not in index:
            skipped.append((str(split_dir / f), f'label {wnid!r} is not a training class'))
        else:
            rel_paths.append(f)
            labels.append(index[wnid])
    present = set(files)
    missing = [k for k in mapping if k not in present]
    for k in missing:
        skipped.append((str(split_dir / k), 'in labels file but no such image'))
    if skipped:
        warnings.warn(f'{split_dir}: {len(skipped)} file(s)/label(s) left out while matching '
                      f'{labels_file}, e.g. {skipped[:5]}', stacklevel=2)
    if not rel_paths:
        raise DatasetError(f'no image in {str(split_dir)!r} matched a label in {str(labels_file)!r}')
    return SplitFiles(str(split_dir), rel_paths, np.asarray(labels, np.int32), list(classes), skipped)


def scan_split(root: str | os.PathLike, split: str, classes: Sequence[str] | None = None,
               labels_file: str | os.PathLike | None = None) -> SplitFiles:
    """One split of an ImageNet-layout folder, whichever of the two layouts it uses."""
    root = Path(root)
    classes = list(classes) if classes is not None else list_classes(root)
    split_dir = root / split
    _require_dir(root, 'data folder')
    _require_dir(split_dir, f'{split} folder')
    has_subdirs = any(p.is_dir() and not p.name.startswith('.') for p in split_dir.iterdir())
    if has_subdirs or split == 'train':
        return scan_class_folders(split_dir, classes)
    labels_file = labels_file or find_labels_file(root, split_dir)
    if labels_file is None:
        raise DatasetError(f'{str(split_dir)!r} is a flat folder but no labels file was given or found; '
                           f'{EXPECTED_LAYOUT}')
    return scan_flat_folder(split_dir, labels_file, classes, search=(split_dir, root))


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
            warnings.warn(f'class names: {e}; using the wnids', stacklevel=2)
            table = {}
        return [table.get(c, c) for c in classes]
    return list(classes)


# ---------------------------------------------------------------------------
# Record sources: index -> (name, label, encoded bytes)

_MAGIC = b'AXJ1'


def pack_record(name: str, label: int, jpeg: bytes) -> bytes:
    """One packed example: magic, int32 label, uint16 name length, name, JPEG bytes."""
    name_b = name.encode('utf-8')
    return _MAGIC + struct.pack('<iH', label, len(name_b)) + name_b + jpeg


def unpack_record(rec: bytes) -> tuple[str, int, bytes]:
    if rec[:4] != _MAGIC:
        raise DecodeError('not an alexnet_jax packed record')
    label, n = struct.unpack_from('<iH', rec, 4)
    name = rec[10:10 + n].decode('utf-8')
    return name, label, rec[10 + n:]


class FolderRecords:
    """Index -> (path, label, file bytes) for a :class:`SplitFiles`."""

    def __init__(self, files: SplitFiles):
        self.root = files.root
        self.rel_paths = files.rel_paths
        self.labels = files.labels

    def __len__(self) -> int:
        return len(self.rel_paths)

    def __getitem__(self, i: int) -> tuple[str, int, bytes | None]:
        path = os.path.join(self.root, self.rel_paths[i])
        try:
            with open(path, 'rb') as f:
                data = f.read()
        except OSError as e:
            log.warning('cannot read %s: %s', path, e)
            data = None
        return path, int(self.labels[i]), data


class PackedRecords:
    """Index -> (name, label, JPEG bytes) from ArrayRecord shards written by ``prepare``."""

    def __init__(self, shard_paths: Sequence[str]):
        import grain  # Imported lazily: sources.py must stay importable in prepare's workers.
        if not shard_paths:
            raise DatasetError(f'no ArrayRecord shards given; {EXPECTED_LAYOUT}')
        self.shard_paths = list(shard_paths)
        self._source = grain.sources.ArrayRecordDataSource(self.shard_paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> tuple[str, int, bytes | None]:
        try:
            return unpack_record(self._source[i])
        except DecodeError as e:
            log.warning('packed record %d: %s', i, e)
            return f'record {i}', -1, None


class DecodedSource:
    """Random-access source of decoded ``{'image', 'label', 'mask'}`` examples.

    on_error='substitute' (training): an unreadable image is replaced by the next
    readable one with *that* image's label, so batches stay full and no label is
    wrong. on_error='mask' (evaluation): a zero image with ``mask=False``, so the
    example is neither counted nor replaced by a duplicate. Both log a warning
    naming the file (once per file and process); ``failures`` maps each
    unreadable file met in this process to its error.
    """

    def __init__(self, records, size: int, on_error: str = 'substitute'):
        if on_error not in ('substitute', 'mask'):
            raise ValueError(f'on_error must be substitute or mask, got {on_error!r}')
        self.records = records
        self.size = size
        self.on_error = on_error
        self.failures: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.records)

    def _try(self, i: int):
        name, label, data = self.records[i]
        if data is None or label < 0:
            err = 'unreadable record'
        else:
            try:
                return decode_image(data, self.size), label
            except DecodeError as e:
                err = str(e)
        if name not in self.failures:
            self.failures[name] = err
            log.warning('skipping unreadable image %s (%s)', name, err)
        return None, label

    def __getitem__(self, i: int) -> dict:
        n = len(self.records)
        i = int(i) % n
        img, label = self._try(i)
        if img is not None:
            return {'image': img, 'label': np.int32(label), 'mask': np.bool_(True)}
        if self.on_error == 'mask':
            return {'image': np.zeros((self.size, self.size, 3), np.uint8),
                    'label': np.int32(max(label, 0)), 'mask': np.bool_(False)}
        for k in range(1, n):
            img, label = self._try((i + k) % n)
            if img is not None:
                return {'image': img, 'label': np.int32(label), 'mask': np.bool_(True)}
        raise DatasetError('no readable image in the whole dataset')
