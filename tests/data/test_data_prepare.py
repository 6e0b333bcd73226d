"""Preparation: statistics against NumPy, packed records, resuming, the flat val layout."""

import os

import numpy as np
import pytest
from PIL import Image

from alexnet_jax.data import layout as LA
from alexnet_jax.data import prepare as P
from alexnet_jax.data import sources as S
from alexnet_jax.errors import DatasetError

SIZE = 8


def write_png_folder(root, n_classes=3, n_per_class=4, seed=0):
    """Square SIZE x SIZE PNGs (lossless, no resize), so decoded pixels are known exactly."""
    rng = np.random.default_rng(seed)
    arrays = {"train": [], "val": []}
    for split, n in (("train", n_per_class), ("val", 2)):
        for c in range(n_classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
                a[..., 1] = a[..., 0] // 2 + a[..., 1] // 2  # correlated channels
                Image.fromarray(a).save(d / f"img_{c}_{i}.png")
                arrays[split].append((c, a))
    return arrays


def test_stats_match_numpy(tmp_path):
    arrays = write_png_folder(tmp_path / "src")
    dst = P.prepare(tmp_path / "src", tmp_path / "dst", size=SIZE, shard_size=5, workers=0, progress=False)
    stats = P.load_stats(dst / "stats.npz")
    imgs = np.stack([a for _, a in arrays["train"]]).astype(np.float64)
    np.testing.assert_allclose(stats["mean_image"], imgs.mean(0), atol=1e-4)
    px = imgs.reshape(-1, 3) / 255.0
    cov = np.cov(px.T, bias=True)
    np.testing.assert_allclose(stats["rgb_cov"], cov, atol=1e-6)
    lam, vec = np.linalg.eigh(cov)
    lam, vec = lam[::-1], vec[:, ::-1]
    np.testing.assert_allclose(stats["eigval"], lam, rtol=1e-4)
    for j in range(3):  # eigenvectors up to sign
        assert abs(abs(stats["eigvec"][:, j] @ vec[:, j]) - 1) < 1e-4
    np.testing.assert_allclose(stats["eigvec"] @ np.diag(stats["eigval"]) @ stats["eigvec"].T, cov, atol=1e-6)
    meta = P.read_metadata(dst)
    assert meta["splits"]["train"]["num_examples"] == 12 and meta["splits"]["val"]["num_examples"] == 6
    assert meta["splits"]["train"]["per_class"] == [4, 4, 4]
    assert len(meta["splits"]["train"]["shards"]) == 3  # 12 images, shards of <= 5


def test_packed_records_roundtrip(tmp_path):
    arrays = write_png_folder(tmp_path / "src")
    dst = P.prepare(
        tmp_path / "src", tmp_path / "dst", size=SIZE, subsampling="444", shard_size=5, workers=0, progress=False
    )
    rec = S.PackedRecords(P.shard_paths(dst, "train"))
    assert len(rec) == 12
    by_name = {}
    for i in range(len(rec)):
        name, label, jpeg = rec[i]
        by_name[name] = (label, S.decode_image(jpeg, SIZE))
    labels = sorted(v[0] for v in by_name.values())
    assert labels == sorted(c for c, _ in arrays["train"])
    for name, (label, img) in by_name.items():
        assert name.startswith(f"n{label:08d}/img_{label}_")  # the label travels with its file
        i = int(name.split("_")[-1].split(".")[0])
        src = arrays["train"][label * 4 + i][1]
        assert np.abs(img.astype(int) - src.astype(int)).mean() < 6  # JPEG q95 4:4:4 of pure noise


def test_resume_redoes_only_missing_shards(tmp_path):
    write_png_folder(tmp_path / "src")
    dst = P.prepare(tmp_path / "src", tmp_path / "dst", size=SIZE, shard_size=5, workers=0, progress=False)
    stats1 = P.load_stats(dst / "stats.npz")
    shards = sorted(p for p in os.listdir(dst) if p.endswith(".array_record"))
    mtimes = {s: os.stat(dst / s).st_mtime_ns for s in shards}
    # Simulate an interruption after shard 0 of train: its marker and the final files are missing.
    for f in ("metadata.json", "stats.npz", "train-00001-of-00003.array_record.done.json"):
        os.remove(dst / f)
    (dst / ".train-00001-of-00003.array_record.tmp99999").write_bytes(b"half a shard")  # a killed worker's
    P.prepare(tmp_path / "src", dst, size=SIZE, shard_size=5, workers=0, progress=False)
    redone = [s for s in shards if os.stat(dst / s).st_mtime_ns != mtimes[s]]
    assert redone == ["train-00001-of-00003.array_record"]
    stats2 = P.load_stats(dst / "stats.npz")
    for k in stats1:
        np.testing.assert_allclose(stats1[k], stats2[k], rtol=1e-6)
    assert not [p for p in os.listdir(dst) if ".tmp" in p]  # no temporary files left


def test_resume_refuses_different_settings(tmp_path):
    write_png_folder(tmp_path / "src")
    dst = tmp_path / "dst"
    P.prepare(tmp_path / "src", dst, size=SIZE, workers=0, progress=False)
    os.remove(dst / "metadata.json")
    with pytest.raises(DatasetError, match="different"):
        P.prepare(tmp_path / "src", dst, size=SIZE + 2, workers=0, progress=False)


def test_cli_with_worker_processes(tmp_path, capsys):
    write_png_folder(tmp_path / "src")
    rc = P.main(
        [
            "--src",
            str(tmp_path / "src"),
            "--dst",
            str(tmp_path / "dst"),
            "--size",
            str(SIZE),
            "--shard_size",
            "6",
            "--workers",
            "2",
            "--quiet",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "train: 12 images in 2 shard(s), 0 skipped" in out
    inline = P.prepare(tmp_path / "src", tmp_path / "dst0", size=SIZE, shard_size=6, workers=0, progress=False)
    a, b = P.load_stats(tmp_path / "dst" / "stats.npz"), P.load_stats(inline / "stats.npz")
    np.testing.assert_allclose(a["mean_image"], b["mean_image"])


def test_cli_missing_folder_message(tmp_path, capsys):
    rc = P.main(["--src", str(tmp_path / "nope"), "--dst", str(tmp_path / "dst"), "--quiet"])
    assert rc == 2
    assert "expected the ImageNet layout" in capsys.readouterr().err


def test_decode_rescales_shorter_side_and_centre_crops():
    # 40 wide x 20 high, red = column index * 6: after rescale to height 10 (width 20), the
    # central 10 columns are original columns ~10..30.
    x = np.arange(40)[None, :].repeat(20, 0)
    a = np.stack([x * 6, np.zeros_like(x), np.zeros_like(x)], -1).astype(np.uint8)
    import io

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    out = S.decode_image(buf.getvalue(), 10)
    assert out.shape == (10, 10, 3)
    cols = out[5, :, 0] / 6.0
    expected = 10 + 2 * np.arange(10) + 0.5  # centres of the 2-wide source pixel pairs
    np.testing.assert_allclose(cols, expected, atol=1.0)


def test_flat_val_folder_with_labels_file(tmp_path):
    write_png_folder(tmp_path / "src")
    flat = tmp_path / "src" / "val"
    names = []
    for d in sorted(p for p in flat.iterdir() if p.is_dir()):
        for f in sorted(d.iterdir()):
            new = f"ILSVRC2012_val_{len(names):08d}.png"
            f.rename(flat / new)
            names.append((new, d.name))
        d.rmdir()
    (tmp_path / "src" / "val_labels.txt").write_text("".join(f"{n} {w}\n" for n, w in names))
    files = LA.scan_split(tmp_path / "src", "val")
    assert len(files) == 6
    assert [LA.list_classes(tmp_path / "src")[label] for label in files.labels] == [w for _, w in names]
    dst = P.prepare(tmp_path / "src", tmp_path / "dst", size=SIZE, workers=0, progress=False)
    assert P.read_metadata(dst)["splits"]["val"]["per_class"] == [2, 2, 2]


def test_small_jpegs_are_stored_as_they_are(tmp_path):
    """A JPEG whose shorter side is at most the size keeps its bytes (decoded exactly as the folder form);
    a larger one is stored rescaled and re-encoded."""
    rng = np.random.default_rng(0)
    d = tmp_path / "src" / "train" / "n00000000"
    d.mkdir(parents=True)
    for name, (w, h) in {"small.JPEG": (40, 32), "exact.JPEG": (32, 32), "large.JPEG": (90, 70)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / name, quality=90)
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(d / "grey.JPEG")  # not RGB: converted
    dst = P.prepare(tmp_path / "src", tmp_path / "dst", size=32, workers=0, progress=False)
    records = S.PackedRecords(P.shard_paths(dst, "train"))
    stored = {name.split("/")[-1]: data for name, _, data in (records[i] for i in range(len(records)))}
    for name in ("small.JPEG", "exact.JPEG"):
        assert stored[name] == (d / name).read_bytes()
    for name in ("large.JPEG", "grey.JPEG"):
        assert stored[name] != (d / name).read_bytes()
        with Image.open(__import__("io").BytesIO(stored[name])) as im:
            assert im.size == (32, 32) and im.mode == "RGB"
