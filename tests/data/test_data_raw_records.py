"""`prepare --records raw`: records that hold the decoded pixels, read by training like JPEG records."""

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
from _folders import write_imagenet_folder
from PIL import Image

from alexnet_jax.data import locate as LO
from alexnet_jax.data import pipeline as PL
from alexnet_jax.data import prepare as P
from alexnet_jax.data import sources as S
from alexnet_jax.errors import DatasetError, DecodeError

SIZE = 32


def write_mixed_folder(root):
    """2 classes of images the jpeg format keeps (small RGB JPEGs) and re-encodes (larger, grey, PNG)."""
    rng = np.random.default_rng(0)
    kept, reencoded = set(), set()
    for split in ("train", "val"):
        for c in range(2):
            d = root / split / f"n0000000{c}"
            d.mkdir(parents=True)
            for name, (w, h) in {"small.JPEG": (40, 32), "exact.JPEG": (32, 32), "large.JPEG": (90, 70)}.items():
                # Smooth colour ramps plus noise: like a photo, JPEG re-encoding changes them a little.
                yy, xx = np.mgrid[:h, :w]
                a = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 60 + 100 * c)], -1)
                a = np.clip(a + rng.normal(0, 10, a.shape), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(d / name, quality=90)
                (kept if name != "large.JPEG" else reencoded).add(f"n0000000{c}/{name}")
            Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)).save(d / "grey.JPEG")
            Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(d / "pic.png")
            reencoded |= {f"n0000000{c}/grey.JPEG", f"n0000000{c}/pic.png"}
    return kept, reencoded


def records_by_name(dst, split):
    rec = P.packed_records(dst, split)
    return rec, {name: (label, data) for name, label, data in (rec[i] for i in range(len(rec)))}


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("raw")
    kept, reencoded = write_mixed_folder(tmp / "src")
    jpeg = P.prepare(tmp / "src", tmp / "jpeg", size=SIZE, shard_size=4, workers=0, progress=False)
    raw = P.prepare(tmp / "src", tmp / "raw", size=SIZE, shard_size=4, workers=0, progress=False, records="raw")
    return tmp / "src", jpeg, raw, kept, reencoded


def test_raw_records_hold_the_decoded_pixels(both):
    src, jpeg, raw, kept, reencoded = both
    for split in ("train", "val"):
        raw_rec, raw_by = records_by_name(raw, split)
        jpeg_rec, jpeg_by = records_by_name(jpeg, split)
        assert raw_rec.record_format == "raw" and jpeg_rec.record_format == "jpeg"
        assert sorted(raw_by) == sorted(jpeg_by) == sorted(kept | reencoded)
        for name, (label, payload) in raw_by.items():
            assert label == jpeg_by[name][0] == int(name[8])
            assert len(payload) == SIZE * SIZE * 3 == S.raw_record_bytes(SIZE)
            pixels = S.decode_record_pixels(payload, SIZE, "raw")
            assert pixels.shape == (SIZE, SIZE, 3) and pixels.dtype == np.uint8
            assert not pixels.flags.writeable  # a view of the record: nothing may write into it
            original = (src / split / name).read_bytes()
            np.testing.assert_array_equal(pixels, S.decode_image(original, SIZE))
            from_jpeg = S.decode_record_pixels(jpeg_by[name][1], SIZE, "jpeg")
            if name in kept:  # the jpeg record is the file itself: the very same pixels
                assert jpeg_by[name][1] == original
                np.testing.assert_array_equal(pixels, from_jpeg)
            elif name.endswith("large.JPEG"):  # re-encoded: the jpeg record lost a little, raw nothing
                assert 0 < np.abs(pixels.astype(int) - from_jpeg).mean() < 8


def test_same_statistics_and_format_recorded(both):
    from array_record.python.array_record_module import ArrayRecordReader

    _, jpeg, raw, _, _ = both
    for dst, compression in ((jpeg, "zstd:3"), (raw, "uncompressed")):  # raw: no decompression either
        reader = ArrayRecordReader(P.shard_paths(dst, "train")[0])
        assert compression in reader.writer_options_string()
        reader.close()
    a, b = P.load_stats(jpeg / "stats.npz"), P.load_stats(raw / "stats.npz")
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    mj, mr = P.read_metadata(jpeg), P.read_metadata(raw)
    assert (mj["records"], mj["format"]) == ("jpeg", "alexnet_jax.packed/1")  # jpeg folders: format as before
    assert (mr["records"], mr["format"]) == ("raw", P.FORMAT_RAW)
    assert json.loads((raw / "metadata.json").read_text())["records"] == "raw"
    assert (
        json.loads((raw / "plan.json").read_text())["digest"] != json.loads((jpeg / "plan.json").read_text())["digest"]
    )
    assert dict(mj["splits"].items()) == dict(mr["splits"].items())


def test_folder_without_records_key_reads_as_jpeg(both, tmp_path):
    _, jpeg, _, _, _ = both
    import shutil

    old = tmp_path / "old"
    shutil.copytree(jpeg, old)
    meta = json.loads((old / "metadata.json").read_text())
    del meta["records"]
    (old / "metadata.json").write_text(json.dumps(meta))
    assert P.read_metadata(old)["records"] == "jpeg"
    assert P.packed_records(old, "train").record_format == "jpeg"
    assert P.prepare("unused", old, size=SIZE) == old  # finished, same format: used as it is
    # An interrupted preparation from before --records (no 'records' in plan.json) still resumes.
    plan = json.loads((old / "plan.json").read_text())
    del plan["records"]
    (old / "plan.json").write_text(json.dumps(plan))
    for f in ("metadata.json", "stats.npz", "train-00000-of-00003.array_record.done.json"):
        (old / f).unlink()
    P.prepare(plan["src"], old, size=SIZE, shard_size=4, workers=0, progress=False)
    assert P.read_metadata(old)["records"] == "jpeg"
    for k, v in P.load_stats(jpeg / "stats.npz").items():
        np.testing.assert_array_equal(P.load_stats(old / "stats.npz")[k], v)


def test_other_format_refused_finished_and_unfinished(both, tmp_path):
    src, jpeg, raw, _, _ = both
    with pytest.raises(DatasetError, match=r"finished preparation with --records jpeg"):
        P.prepare(src, jpeg, size=SIZE, shard_size=4, workers=0, progress=False, records="raw")
    # An interrupted raw preparation: shard 0 done, no metadata yet.
    part = tmp_path / "part"
    P.prepare(src, part, size=SIZE, shard_size=4, workers=0, progress=False, records="raw")
    for f in ("metadata.json", "stats.npz", "train-00001-of-00003.array_record.done.json"):
        (part / f).unlink()
    with pytest.raises(DatasetError, match=r"unfinished preparation with --records raw.*resume it with --records raw"):
        P.prepare(src, part, size=SIZE, shard_size=4, workers=0, progress=False)
    P.prepare(src, part, size=SIZE, shard_size=4, workers=0, progress=False, records="raw")  # resumes
    assert P.read_metadata(part)["records"] == "raw"


def test_cli_raw_then_mismatch(tmp_path):
    src = tmp_path / "src"
    write_imagenet_folder(src, per_class=2, val_per_class=1, size=(64, 48), wnids=("n01440764", "n01443537"))
    dst = tmp_path / "dst"
    cmd = [sys.executable, "-m", "alexnet_jax.data.prepare", "--src", str(src), "--dst", str(dst)]
    r = subprocess.run(cmd + ["--records", "raw", "--quiet"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "train: 4 images in 1 shard(s), 0 skipped" in r.stdout and "records: raw" in r.stdout
    _, by_name = records_by_name(dst, "train")
    assert {len(payload) for _, payload in by_name.values()} == {256 * 256 * 3}  # the default --size 256
    r = subprocess.run(cmd + ["--records", "jpeg", "--quiet"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert err and "--records raw" in err[0] and "not --records jpeg" in err[0], r.stderr


@pytest.fixture(scope="module")
def kept_only(tmp_path_factory):
    """A folder whose images the jpeg format all keeps (RGB JPEGs, shorter side == SIZE), prepared both ways."""
    tmp = tmp_path_factory.mktemp("kept")
    src = write_imagenet_folder(tmp / "src", per_class=4, val_per_class=3, size=(44, SIZE))
    out = {
        r: P.prepare(src, tmp / r, size=SIZE, shard_size=5, workers=0, progress=False, records=r)
        for r in ("jpeg", "raw")
    }
    _, by_name = records_by_name(out["jpeg"], "train")
    assert all(data == (src / "train" / name).read_bytes() for name, (_, data) in by_name.items())
    return out


def packed_cfg(packed_dir):
    cfg = PL.default_data_config()
    cfg.name, cfg.format, cfg.packed_dir = "imagenet", "packed", str(packed_dir)
    cfg.resize_size, cfg.crop_size = SIZE, 24
    return cfg


def test_training_batches_equal_for_both_formats(kept_only):
    batches = {}
    for r, dst in kept_only.items():
        cfg = packed_cfg(dst)
        data = LO.resolve(cfg)
        assert {s: rec.record_format for s, rec in data.records.items()} == {"train": r, "val": r}
        ev = list(PL.build_eval_iter(cfg, batch_size=5, num_workers=0, data=data))
        tc = list(PL.build_eval_iter(cfg, batch_size=6, mode="whole", num_workers=0, data=data))
        it = PL.build_train_iter(cfg, batch_size=8, seed=3, num_workers=0, data=data)
        tr = [next(it) for _ in range(3)]
        it.close()
        batches[r] = (ev, tc, tr)
        assert sum(int(b["mask"].sum()) for b in ev) == 12  # 4 classes x 3, padded to 3 batches of 5
    for a_list, b_list in zip(batches["jpeg"], batches["raw"]):
        assert len(a_list) == len(b_list)
        for a, b in zip(a_list, b_list):
            for k in ("image", "label", "mask"):
                np.testing.assert_array_equal(a[k], b[k])
    # The evaluation reader (split_records) reads the format from the metadata too.
    rec = LO.split_records(packed_cfg(kept_only["raw"]), "val", LO.resolve(packed_cfg(kept_only["raw"])).classes)
    assert rec.record_format == "raw"


def test_truncated_raw_record_goes_through_decode_error(tmp_path, caplog):
    from array_record.python.array_record_module import ArrayRecordWriter

    imgs = [np.full((SIZE, SIZE, 3), 40 * (i + 1), np.uint8) for i in range(3)]
    shard = tmp_path / "train-00000-of-00001.array_record"
    w = ArrayRecordWriter(str(shard), "group_size:1")
    for i, img in enumerate(imgs):
        payload = S.encode_raw(img)
        w.write(S.pack_record(f"n0/img{i}.JPEG", i, payload[:-100] if i == 1 else payload))
    w.close()
    records = S.PackedRecords([str(shard)], records="raw")
    with pytest.raises(DecodeError, match=r"raw record 'n0/img1.JPEG' holds 2972 bytes, expected 3072"):
        S.decode_record_pixels(records[1][2], SIZE, "raw", name=records[1][0])
    train = S.DecodedSource(records, SIZE, on_error="substitute")
    with caplog.at_level(logging.WARNING):
        ex = train[1]  # replaced by the next readable image, with that image's label
    assert int(ex["label"]) == 2 and ex["mask"] and (ex["image"] == 120).all()
    assert list(train.failures) == ["n0/img1.JPEG"] and "expected 3072" in train.failures["n0/img1.JPEG"]
    assert "n0/img1.JPEG" in caplog.text and "2972 bytes" in caplog.text
    ev = S.DecodedSource(records, SIZE, on_error="mask")
    assert not ev[1]["mask"] and ev[0]["mask"] and (ev[0]["image"] == 40).all()
    with pytest.raises(ValueError, match="records must be one of"):
        S.decode_record_pixels(b"", SIZE, "png")
