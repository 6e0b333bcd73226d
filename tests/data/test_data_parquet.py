"""ImageNet as Hugging Face parquet shards (ILSVRC/imagenet-1k's schema), written here with pyarrow from the
same real JPEG files as an ImageNet-layout folder: prepare gives the same records, pixels and labels and
statistics from both; bad rows, bad files and stops are handled as the folder path handles them."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _folders import WNIDS, write_imagenet_folder
from array_record.python.array_record_module import ArrayRecordReader

from alexnet_jax.data import layout, sources
from alexnet_jax.data import prepare as P
from alexnet_jax.data.labels import imagenet_classes
from alexnet_jax.data.locate import resolve
from alexnet_jax.data.pipeline import default_data_config
from alexnet_jax.errors import DatasetError

SIZE = 72  # the demo recipe's resize_size: its 64-pixel crops are cut from these
SCHEMA = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_imagenet_folder(tmp_path_factory.mktemp("tree") / "imagenet", per_class=5, val_per_class=2)


def write_parquet(folder, dst, *, train_files=2, corrupt=False, in_data=True):
    """The folder's images as ILSVRC/imagenet-1k parquet shards (rows in the folder scan's order), plus a
    test split with label -1; ``corrupt``: one train row's JPEG bytes cut short."""
    out = dst / "data" if in_data else dst
    out.mkdir(parents=True)
    wnids = imagenet_classes()[0]
    for split, name in (("train", "train"), ("val", "validation")):
        files = layout.scan_split(folder, split)
        rows = [
            {
                "image": {"bytes": (folder / split / rel).read_bytes(), "path": rel.split("/")[-1]},
                "label": wnids.index(WNIDS[label]),
            }
            for rel, label in zip(files.rel_paths, files.labels)
        ]
        if corrupt and split == "train":
            rows[3]["image"]["bytes"] = rows[3]["image"]["bytes"][:200]
        n = train_files if split == "train" else 1
        for i, part in enumerate(np.array_split(np.arange(len(rows)), n)):
            pq.write_table(
                pa.Table.from_pylist([rows[j] for j in part], schema=SCHEMA),
                out / f"{name}-{i:05d}-of-{n:05d}.parquet",
                row_group_size=4,
            )
    test = [
        {
            "image": {
                "bytes": (folder / "val" / layout.scan_split(folder, "val").rel_paths[0]).read_bytes(),
                "path": "test_0.JPEG",
            },
            "label": -1,
        }
    ]
    pq.write_table(pa.Table.from_pylist(test, schema=SCHEMA), out / "test-00000-of-00001.parquet")
    return dst


def records(dst, split):
    """``[(label, decoded pixels)]`` of a packed split, in shard order."""
    meta = json.loads((dst / "metadata.json").read_text())
    out = []
    for shard in meta["splits"][split]["shards"]:
        reader = ArrayRecordReader(str(dst / shard["file"]))
        for rec in reader.read_all():
            _, label, payload = sources.unpack_record(rec)
            out.append((label, sources.decode_record_pixels(payload, SIZE, meta["records"])))
        reader.close()
    return out


@pytest.mark.parametrize("records_format", ["jpeg", "raw"])
def test_parquet_shards_give_the_folders_pixels_labels_and_statistics(folder, tmp_path, records_format):
    hub = write_parquet(folder, tmp_path / "hub")
    a = P.prepare(folder, tmp_path / "from-folder", size=SIZE, workers=0, progress=False, records=records_format)
    b = P.prepare(hub, tmp_path / "from-parquet", size=SIZE, workers=0, progress=False, records=records_format)
    ma, mb = (json.loads((d / "metadata.json").read_text()) for d in (a, b))
    assert mb["classes"] == ma["classes"] == list(WNIDS) and mb["class_names"][0] == "tench"
    for split in ("train", "val"):
        ra, rb = records(a, split), records(b, split)
        assert len(ra) == len(rb) == (20 if split == "train" else 8)
        assert [label for label, _ in ra] == [label for label, _ in rb]
        assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(ra, rb))
        assert mb["splits"][split]["per_class"] == ma["splits"][split]["per_class"]
    sa, sb = np.load(a / "stats.npz"), np.load(b / "stats.npz")
    assert all(np.array_equal(sa[k], sb[k]) for k in sa.files)
    assert len(mb["splits"]["train"]["shards"]) == 2  # one shard per parquet file; the test split left out
    assert "test" not in mb["splits"]


def test_a_subset_of_labels_trains_and_evaluates(folder, tmp_path):
    """4 of the 1000 labels: the classes are the labels present; launch.py and evaluate read the output."""
    hub = write_parquet(folder, tmp_path / "hub", in_data=False)  # shards at DIR itself
    out = tmp_path / "packed"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "alexnet_jax.data.prepare",
            "--src",
            str(hub),
            "--dst",
            str(out),
            "--size",
            str(SIZE),
            "--workers",
            "0",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "left out the test split (1 file(s))" in r.stderr and "train: 20 images in 2 shard(s)" in r.stdout
    w = tmp_path / "run"
    r = subprocess.run(
        [
            sys.executable,
            "launch.py",
            "--config=configs/demo.py",
            "--config.data.name=imagenet",
            f"--config.data.packed_dir={out}",
            "--config.model.num_classes=4",
            "--config.total_steps=2",
            "--config.batch_size=8",
            "--config.eval_batch_size=8",
            "--config.data.num_workers=0",
            f"--workdir={w}",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0 and "Done at step 2" in r.stdout, r.stderr[-3000:]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "alexnet_jax.evaluate",
            f"--checkpoint={w}",
            f"--data={out}",
            "--views=center",
            f"--json={tmp_path / 'val.json'}",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "val.json").read_text())["images"] == 8


def test_a_corrupt_image_in_a_shard_is_skipped_and_counted_as_a_corrupt_file_is(folder, tmp_path):
    hub = write_parquet(folder, tmp_path / "hub", corrupt=True)
    bad_folder = tmp_path / "tree"
    import shutil

    shutil.copytree(folder, bad_folder)
    victim = bad_folder / "train" / layout.scan_split(folder, "train").rel_paths[3]
    victim.write_bytes(victim.read_bytes()[:200])
    a = P.prepare(bad_folder, tmp_path / "a", size=SIZE, workers=0, progress=False)
    b = P.prepare(hub, tmp_path / "b", size=SIZE, workers=0, progress=False)
    ma, mb = (json.loads((d / "metadata.json").read_text()) for d in (a, b))
    assert len(ma["splits"]["train"]["skipped"]) == len(mb["splits"]["train"]["skipped"]) == 1
    assert mb["splits"]["train"]["num_examples"] == ma["splits"]["train"]["num_examples"] == 19
    where = mb["splits"]["train"]["skipped"][0][0]
    assert re.search(r"train-00000-of-00002\.parquet row 3 \(.*\.JPEG\)$", where), where


def test_a_parquet_file_of_another_schema_gets_one_clear_line(tmp_path, capsys):
    (tmp_path / "hub").mkdir()
    pq.write_table(pa.table({"img": [b"x"], "cls": ["a"]}), tmp_path / "hub" / "train-00000-of-00001.parquet")
    rc = P.main(["--src", str(tmp_path / "hub"), "--dst", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert "is not an ImageNet parquet shard" in line and "img: binary" in line, err


def test_training_on_the_parquet_folder_itself_says_to_prepare(folder, tmp_path):
    hub = write_parquet(folder, tmp_path / "hub")
    cfg = default_data_config()
    cfg.name, cfg.root = "imagenet", str(hub)
    with pytest.raises(DatasetError, match=r"holds parquet shards .* python -m alexnet_jax.data.prepare --src"):
        resolve(cfg)


def test_a_stopped_prepare_resumes_to_the_same_output(folder, tmp_path):
    hub = write_parquet(folder, tmp_path / "hub", train_files=4)
    whole = P.prepare(hub, tmp_path / "whole", size=SIZE, workers=0, progress=False)
    dst = tmp_path / "stopped"
    cmd = [
        sys.executable,
        "-m",
        "alexnet_jax.data.prepare",
        "--src",
        str(hub),
        "--dst",
        str(dst),
        "--size",
        str(SIZE),
        "--workers",
        "1",
    ]
    env = {**os.environ, "ALEXNET_JAX_PROGRESS_EVERY_S": "0"}
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    deadline = time.time() + 120
    while not any(dst.glob("*.done.json")):
        assert p.poll() is None, p.communicate()
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 75 and "Traceback" not in err, err
    assert not (dst / "metadata.json").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert re.search(r"^prepare: 28/28 images \(100%\)", again.stdout, re.M), again.stdout
    for split in ("train", "val"):
        assert [label for label, _ in records(dst, split)] == [label for label, _ in records(whole, split)]
        assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(records(dst, split), records(whole, split)))
    a, b = np.load(dst / "stats.npz"), np.load(whole / "stats.npz")
    assert all(np.array_equal(a[k], b[k]) for k in a.files)
