"""Bad input: every readable image used with its own label, unreadable ones skipped and named."""

import io
import logging
import warnings

import numpy as np
import pytest
from PIL import Image

from alexnet_jax.data import layout as LA
from alexnet_jax.data import locate as LO
from alexnet_jax.data import pipeline as PL
from alexnet_jax.data import prepare as P
from alexnet_jax.errors import DatasetError

SIZE = 16
# Each class is one flat colour whose grey level is distinct too, so a grayscale file still tells its label.
COLOURS = [(230, 40, 40), (40, 200, 60), (50, 70, 220)]


def grey(rgb):
    r, g, b = rgb
    return round((r * 299 + g * 587 + b * 114) / 1000)


def jpeg_bytes(arr, mode="RGB"):
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def flat(colour, h=SIZE + 4, w=SIZE + 8):
    return np.broadcast_to(np.array(colour, np.uint8), (h, w, 3)).copy()


@pytest.fixture()
def bad_folder(tmp_path):
    """3 classes + 1 empty class folder; good files plus one of each kind of bad file."""
    root = tmp_path / "bad"
    bad_names = []
    for split in ("train", "val"):
        for c, col in enumerate(COLOURS):
            d = root / split / f"n0000000{c}"
            d.mkdir(parents=True)
            for i in range(3):
                (d / f"good_{i}.JPEG").write_bytes(jpeg_bytes(flat(col)))
        d0, d1, d2 = (root / split / f"n0000000{c}" for c in range(3))
        (d0 / "cmyk.JPEG").write_bytes(jpeg_bytes(flat(COLOURS[0]), "CMYK"))
        png = io.BytesIO()
        Image.fromarray(flat(COLOURS[1])).save(png, format="PNG")
        (d1 / "png_named.JPEG").write_bytes(png.getvalue())
        (d2 / "grey.JPEG").write_bytes(jpeg_bytes(flat(COLOURS[2]), "L"))
        good = jpeg_bytes(flat(COLOURS[1], 64, 64))
        (d1 / "truncated.JPEG").write_bytes(good[: len(good) // 2])
        (d2 / "garbage.JPEG").write_bytes(b"this is not an image at all" * 10)
        (d0 / "empty.JPEG").write_bytes(b"")
        (d0 / "notes.txt").write_text("not an image")
        bad_names += [str(d1 / "truncated.JPEG"), str(d2 / "garbage.JPEG"), str(d0 / "empty.JPEG")]
    (root / "train" / "n00000009").mkdir()  # empty class folder
    return root, bad_names


def cfg_for(root, **kw):
    cfg = PL.default_data_config()
    cfg.name, cfg.root, cfg.format = "imagenet", str(root), "folder"
    cfg.resize_size, cfg.crop_size = SIZE, SIZE
    cfg.mean_subtraction, cfg.pca_lighting_std, cfg.flip = False, 0.0, False
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def assert_colour_matches_label(img, label):
    """The image is its label's colour (or that colour's grey), and no other label's."""
    pix = img.reshape(-1, 3).mean(0)
    cands = []
    for c, col in enumerate(COLOURS):
        cands.append((np.abs(pix - np.array(col)).max(), c))
        cands.append((np.abs(pix - grey(col)).max(), c))
    err, best = min(cands)
    assert err < 12 and best == label, (pix, label)


def test_eval_pass_completes_masks_and_names_bad_files(bad_folder, caplog):
    root, bad_names = bad_folder
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        data = LO.resolve(cfg_for(root))
    msgs = " ".join(str(x.message) for x in w)
    assert "empty class folder" in msgs and "n00000009" in msgs
    assert data.classes == ["n00000000", "n00000001", "n00000002", "n00000009"]
    for split in ("train", "val"):
        n_files = len(data.records[split])
        assert n_files == 3 * 3 + 6  # notes.txt is not listed
        caplog.clear()
        seen, masked = 0, 0
        with caplog.at_level(logging.WARNING):
            for batch in PL.build_eval_iter(cfg_for(root), batch_size=4, split=split, num_workers=0, data=data):
                for img, label, m in zip(batch["image"], batch["label"], batch["mask"]):
                    if m:
                        seen += 1
                        assert_colour_matches_label(img, label)
                    else:
                        masked += 1
        assert seen == 12  # 9 good + CMYK + PNG-as-JPEG + grayscale
        assert seen + masked == 16  # 15 files padded to 4 batches of 4
        logged = caplog.text
        for name in bad_names:
            if f"/{split}/" in name:
                assert name in logged


def test_train_pass_substitutes_without_wrong_labels(bad_folder, caplog):
    root, _ = bad_folder
    cfg = cfg_for(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = LO.resolve(cfg)
    it = PL.build_train_iter(cfg, batch_size=5, seed=3, num_workers=0, data=data)
    with caplog.at_level(logging.WARNING):
        for _ in range(9):  # three epochs of 15 files
            batch = next(it)
            assert batch["mask"].all() and batch["image"].shape == (5, SIZE, SIZE, 3)
            for img, label in zip(batch["image"], batch["label"]):
                assert_colour_matches_label(img, label)
    assert "truncated.JPEG" in caplog.text and "garbage.JPEG" in caplog.text


def test_prepare_skips_and_reports_bad_files(bad_folder):
    root, bad_names = bad_folder
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dst = P.prepare(root, root.parent / "packed", size=SIZE, workers=0, progress=False)
    meta = P.read_metadata(dst)
    tr = meta["splits"]["train"]
    assert tr["num_examples"] == 12 and tr["per_class"] == [4, 4, 4, 0]
    skipped = {s[0] for s in tr["skipped"]}
    assert {n for n in bad_names if "/train/" in n} | {str(root / "train" / "n00000000" / "notes.txt")} == skipped
    # The packed form then reads cleanly, labels intact.
    cfg = cfg_for(root, format="packed", packed_dir=str(dst))
    data = LO.resolve(cfg)
    n = 0
    for batch in PL.build_eval_iter(cfg, batch_size=5, split="train", num_workers=0, data=data):
        for img, label, m in zip(batch["image"], batch["label"], batch["mask"]):
            if m:
                n += 1
                assert_colour_matches_label(img, label)
    assert n == 12


def test_missing_and_empty_folders_say_what_was_expected(tmp_path):
    with pytest.raises(DatasetError, match="expected the ImageNet layout"):
        LO.resolve(cfg_for(tmp_path / "does_not_exist"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="training folder"):
        LO.resolve(cfg_for(tmp_path / "empty"))
    (tmp_path / "empty" / "train").mkdir()
    with pytest.raises(DatasetError, match="no class folders"):
        LO.resolve(cfg_for(tmp_path / "empty"))
    (tmp_path / "empty" / "train" / "n01").mkdir()
    with pytest.raises(DatasetError, match="no images found"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        LO.resolve(cfg_for(tmp_path / "empty"))
    with pytest.raises(DatasetError, match="prepare"):
        LO.resolve(cfg_for(tmp_path / "empty", format="packed", packed_dir=str(tmp_path / "nothing")))
    assert issubclass(DatasetError, ValueError)


def make_flat_val(tmp_path, n=6):
    root = tmp_path / "flat"
    for c in range(2):
        d = root / "train" / f"n0{c}"
        d.mkdir(parents=True)
        (d / "a.JPEG").write_bytes(jpeg_bytes(flat(COLOURS[c])))
    (root / "val").mkdir()
    for i in range(n):
        (root / "val" / f"v{i}.JPEG").write_bytes(jpeg_bytes(flat(COLOURS[i % 2])))
    return root


def test_labels_file_that_does_not_match(tmp_path):
    root = make_flat_val(tmp_path)
    # v5 has no label, v4's wnid is unknown, a listed file does not exist.
    lines = [f"v{i}.JPEG n0{i % 2}" for i in range(4)] + ["v4.JPEG n99", "ghost.JPEG n00"]
    (root / "val_labels.txt").write_text("\n".join(lines))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        files = LA.scan_split(root, "val")
    assert files.rel_paths == ["v0.JPEG", "v1.JPEG", "v2.JPEG", "v3.JPEG"]
    assert files.labels.tolist() == [0, 1, 0, 1]
    reasons = dict(files.skipped)
    assert reasons[str(root / "val" / "v5.JPEG")] == "no entry in labels file"
    assert "not a training class" in reasons[str(root / "val" / "v4.JPEG")]
    assert reasons[str(root / "val" / "ghost.JPEG")] == "in labels file but no such image"
    assert any("left out" in str(x.message) for x in w)


def test_labels_file_ambiguous_forms_are_refused(tmp_path):
    root = make_flat_val(tmp_path)
    (root / "val_labels.txt").write_text("\n".join(["1", "2", "1", "2", "1", "2"]))
    with pytest.raises(DatasetError, match="integer class ids"):
        LA.scan_split(root, "val")
    (root / "val_labels.txt").write_text("\n".join(["n00", "n01", "n00"]))
    with pytest.raises(DatasetError, match="cannot pair"):
        LA.scan_split(root, "val")
    (root / "val_labels.txt").write_text("\n".join(["n00", "n01"] * 3))  # one wnid per sorted file
    files = LA.scan_split(root, "val")
    assert files.labels.tolist() == [0, 1, 0, 1, 0, 1]
    (root / "val_labels.txt").unlink()
    with pytest.raises(DatasetError, match="no labels file"):
        LA.scan_split(root, "val")


def test_kaggle_csv_labels(tmp_path):
    root = make_flat_val(tmp_path, n=2)
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\nv0,n00 1 2 3 4 n00 5 6 7 8\nv1,n01 1 2 3 4\n")
    files = LA.scan_split(root, "val")
    assert files.rel_paths == ["v0.JPEG", "v1.JPEG"] and files.labels.tolist() == [0, 1]
