"""Validation labels in every layout ImageNet users have, read by the one reader training uses.

The reference is where each image came from: the same JPEGs are laid out as
``val/<wnid>/``, and as a flat folder of ``ILSVRC2012_val_<n>.JPEG`` files (in a
shuffled order) with ``val_labels.txt``, Kaggle's ``LOC_val_solution.csv``, or the
devkit's integer ground truth plus ``meta.mat``. Every layout must pair each image
(by its bytes) with the class folder it came from.
"""

import hashlib
import shutil
import warnings

import numpy as np
import pytest
from _folders import WNIDS, write_imagenet_folder, write_meta_mat

from alexnet_jax.data import labels as LB
from alexnet_jax.data import layout as LA
from alexnet_jax.data import locate as LO
from alexnet_jax.data import pipeline as PL
from alexnet_jax.data import prepare as P
from alexnet_jax.data import sources as S
from alexnet_jax.errors import DatasetError

# The devkit numbers its classes in its own order, not the sorted wnids the folders use: here
# id 1 is the third sorted wnid, like the real devkit (id 1 is n02119789, a kit fox).
DEVKIT_IDS = {WNIDS[2]: 1, WNIDS[0]: 2, WNIDS[3]: 3, WNIDS[1]: 4}
WORDS = {
    WNIDS[0]: "tench, Tinca tinca",
    WNIDS[1]: "goldfish, Carassius auratus",
    WNIDS[2]: "great white shark",
    WNIDS[3]: "tiger shark, Galeocerdo cuvieri",
}


def write_devkit_meta(path):
    write_meta_mat(path, DEVKIT_IDS, WORDS)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The val/<wnid>/ folder, and the truth: image digest -> wnid, from the folder each file is in."""
    root = write_imagenet_folder(tmp_path_factory.mktemp("by_class"), per_class=1, val_per_class=3)
    truth = {digest(p.read_bytes()): p.parent.name for p in sorted((root / "val").rglob("*.JPEG"))}
    assert len(truth) == 12
    return root, truth


def flat_copy(source_root, dst):
    """The same images as ILSVRC2012_val_<n>.JPEG in a shuffled order; returns [(file name, wnid)]."""
    shutil.copytree(source_root / "train", dst / "train")
    (dst / "val").mkdir()
    files = sorted((source_root / "val").rglob("*.JPEG"))
    order = np.random.default_rng(3).permutation(len(files))
    pairs = []
    for n, k in enumerate(order, start=1):
        name = LB.devkit_file_name(n)
        shutil.copy(files[k], dst / "val" / name)
        pairs.append((name, files[k].parent.name))
    return pairs


def layout(kind, source_root, dst):
    if kind == "class_folders":
        shutil.copytree(source_root, dst)
        return dst
    pairs = flat_copy(source_root, dst)
    if kind == "val_labels.txt":
        (dst / "val_labels.txt").write_text("".join(f"{f} {w}\n" for f, w in pairs))
    elif kind == "LOC_val_solution.csv":  # Kaggle: ids without extension, boxes after the wnid
        rows = [f"{f[:-5]},{w} 10 20 100 200 {w} 5 5 50 50" for f, w in reversed(pairs)]
        (dst / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    elif kind == "devkit":  # the devkit tarball unpacked into ROOT, as it ships
        data = dst / "ILSVRC2012_devkit_t12" / "data"
        data.mkdir(parents=True)
        (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{DEVKIT_IDS[w]}\n" for _, w in pairs))
        write_devkit_meta(data / "meta.mat")
    return dst


LAYOUTS = ["class_folders", "val_labels.txt", "LOC_val_solution.csv", "devkit"]


def val_config(root):
    cfg = PL.default_data_config()
    cfg.name, cfg.root, cfg.format = "imagenet", str(root), "folder"
    cfg.resize_size, cfg.crop_size = 64, 64
    cfg.mean_subtraction, cfg.pca_lighting_std = False, 0.0
    return cfg


@pytest.mark.parametrize("kind", LAYOUTS)
def test_every_layout_pairs_each_image_with_its_class(source, tmp_path, kind):
    source_root, truth = source
    root = layout(kind, source_root, tmp_path / kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may be left out or guessed
        data = LO.resolve(val_config(root))  # the reader training-time evaluation uses
    val = data.records["val"]
    assert len(val) == len(truth)
    got = {}
    for i in range(len(val)):
        _, label, jpeg = val[i]
        got[digest(jpeg)] = data.classes[label]
    assert got == truth
    assert data.classes == sorted(WNIDS)


def test_devkit_class_names_come_from_meta_mat(source, tmp_path):
    root = layout("devkit", source[0], tmp_path / "devkit")
    data = LO.resolve(val_config(root))
    assert data.class_names == [WORDS[w] for w in sorted(WNIDS)]


def test_devkit_ground_truth_as_val_labels_and_through_prepare(source, tmp_path):
    """The devkit files given explicitly (val_labels), meta.mat found next to them; prepare packs the same."""
    source_root, truth = source
    root = tmp_path / "flat"
    pairs = flat_copy(source_root, root)
    elsewhere = tmp_path / "downloads"
    elsewhere.mkdir()
    gt = elsewhere / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("".join(f"{DEVKIT_IDS[w]}\n" for _, w in pairs))
    write_devkit_meta(elsewhere / "meta.mat")
    cfg = val_config(root)
    cfg.val_labels = str(gt)
    data = LO.resolve(cfg)
    assert {
        digest(data.records["val"][i][2]): data.classes[data.records["val"][i][1]]
        for i in range(len(data.records["val"]))
    } == truth

    packed = tmp_path / "packed"
    P.prepare(root, packed, size=64, val_labels=str(gt), progress=False)
    rec = S.PackedRecords(sorted(str(p) for p in packed.glob("val-*.array_record")))
    flat_truth = dict(pairs)
    for i in range(len(rec)):
        name, label, _ = rec[i]
        assert sorted(WNIDS)[label] == flat_truth[name.rsplit("/", 1)[-1]]


def test_devkit_errors_say_what_is_missing(source, tmp_path):
    root = layout("devkit", source[0], tmp_path / "devkit")
    meta = root / "ILSVRC2012_devkit_t12" / "data" / "meta.mat"
    meta.unlink()
    with pytest.raises(DatasetError, match="meta.mat was not found"):
        LA.scan_split(root, "val")
    meta.write_bytes(b"not a MATLAB file")
    with pytest.raises(DatasetError, match="is not the ILSVRC 2012 devkit's meta.mat"):
        LA.scan_split(root, "val")
    write_devkit_meta(meta)
    gt = root / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text(gt.read_text().replace("4\n", "1001\n"))  # an inner node's id is no class
    with pytest.raises(DatasetError, match=r"class ids \[1001\]"):
        LA.scan_split(root, "val")
