"""scripts/write_digits.py: scikit-learn's digits as an ImageNet-layout folder, and launch.py reading it."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_train import TINY

sklearn_datasets = pytest.importorskip("sklearn.datasets")  # in the test extra
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "digits"
    r = subprocess.run(
        [sys.executable, "scripts/write_digits.py", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "wrote 1497 training and 300 validation JPEGs of 10 digit classes" in r.stdout
    return out


def test_the_folder_holds_every_digit_once_in_the_imagenet_layout(digits):
    ref = sklearn_datasets.load_digits()
    train = sorted(digits.glob("train/digit_*/*.JPEG"))
    labels = dict(line.split() for line in (digits / "val" / "val_labels.txt").read_text().splitlines())
    assert len(train) == 1497 and len(labels) == 300 == len(list(digits.glob("val/*.JPEG")))
    assert sorted(p.name for p in (digits / "train").iterdir()) == [f"digit_{k}" for k in range(10)]
    assert {v: list(labels.values()).count(v) for v in set(labels.values())} == {f"digit_{k}": 30 for k in range(10)}
    seen = {}
    for p in train:  # digit_<k>_<index>.JPEG: its class folder is the dataset's label of that index
        k, i = int(p.parent.name.split("_")[1]), int(p.stem.rsplit("_", 1)[1])
        assert ref.target[i] == k
        seen[i] = p
    for name, wnid in labels.items():
        i = int(Path(name).stem)
        assert ref.target[i] == int(wnid.split("_")[1])
        seen[i] = digits / "val" / name
    assert sorted(seen) == list(range(1797))
    for i in (0, 500, 1796):  # the pixels are the digit's, upscaled 8x (bicubic blur and JPEG aside)
        with Image.open(seen[i]) as im:
            assert im.mode == "L" and im.size == (64, 64)
            got = np.asarray(im, np.float64)
        small = got.reshape(8, 8, 8, 8).mean(axis=(1, 3)) * 16 / 255
        assert np.corrcoef(small.ravel(), ref.images[i].ravel())[0, 1] > 0.97, i
        assert np.abs(small - ref.images[i]).mean() < 1.2, i  # of 0..16


@pytest.mark.slow  # a launch.py run; the reader itself is tested on ImageNet-layout folders in tests/data
def test_launch_trains_on_it_through_the_imagenet_reader(digits, tmp_path):
    """The README's ablation overrides, on two steps: classes from train/, labels of the flat val/."""
    r = subprocess.run(
        [
            sys.executable,
            "launch.py",
            "--config=configs/demo.py",
            f"--workdir={tmp_path}",
            "--config.data.name=imagenet",
            f"--config.data.root={digits}",
            "--config.model.num_classes=10",
            *TINY,
            "--config.total_steps=2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "1,497 training images" in r.stdout and "Done at step 2" in r.stdout


def test_an_existing_folder_is_not_overwritten(digits):
    r = subprocess.run(
        [sys.executable, "scripts/write_digits.py", "--out", str(digits)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1 and "already holds train/ or val/" in r.stderr
