"""Loading checkpoints anywhere and classifying images.

Checkpoints come from two short demo runs, on a 1 x 2 and a 2 x 2 mesh, each in
its own process, which also wrote the probabilities its own evaluation code
computes for fixed images. Fresh processes with 1 and with 8 devices load
both checkpoints and must give the same probabilities.
"""

import hashlib
import json
import shutil

import _trained
import numpy as np
import pytest
from PIL import Image

from alexnet_jax import CheckpointError, Classifier, ImageError, load_checkpoint, predict

pytestmark = pytest.mark.xdist_group("trained_runs")  # one worker trains _trained.runs for all


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return _trained.runs(tmp_path_factory)


@pytest.fixture(scope="module")
def clf(runs):
    return Classifier(runs["2x2"])


def test_checkpoints_from_two_meshes_give_the_training_probabilities_on_1_and_8_devices(runs, tmp_path):
    outs = {1: tmp_path / "one.npz", 8: tmp_path / "eight.npz"}
    _trained.predict_in_fresh_processes(outs, [runs["1x2"], runs["2x2"]])
    for devices, path in outs.items():
        got = np.load(path)
        assert int(got["devices"]) == devices
        for i, name in enumerate(["1x2", "2x2"]):
            # One device: both towers on it. Eight: towers split over a 4 x 2 mesh.
            assert list(got[f"{i}_mesh"]) == ([] if devices == 1 else [4, 2])
            ref = np.load(runs[name] / "reference.npz")
            for mode in ("center", "ten_crop"):
                want = ref[f"probs_{mode}"]
                assert want.shape == (12, 10)  # 10 validation images and 2 photographs
                assert np.ptp(want, axis=0).max() > 1e-3  # the images get different answers
                np.testing.assert_allclose(
                    got[f"{i}_probs_{mode}"],
                    want,
                    rtol=2e-5,
                    atol=1e-6,
                    err_msg=f"{name} checkpoint, {devices} device(s), {mode}",
                )
            # The README's plain-Orbax lines read the same parameters, even on one device.
            assert bool(got[f"{i}_plain_orbax_equal"])


def test_load_checkpoint_takes_workdir_checkpoints_folder_or_step_folder(runs):
    wd = runs["1x2"]
    a = load_checkpoint(wd)
    b = load_checkpoint(wd / "checkpoints")
    c = load_checkpoint(wd / "checkpoints" / str(_trained.STEPS), step=_trained.STEPS)
    assert a.step == b.step == c.step == _trained.STEPS
    assert c.config.model.width == 0.125 and c.config.model.num_classes == 10  # the saved config
    np.testing.assert_array_equal(
        np.asarray(a.params["towers"]["fc8"]["kernel"]), np.asarray(c.params["towers"]["fc8"]["kernel"])
    )
    # What inference needs travels with the checkpoint.
    assert a.classes[0] == "c00_disk_red_over_blue" and a.class_names[0] == "disk, red over blue"
    assert a.stats["mean_image"].shape == (72, 72, 3)


def test_predict_on_real_photographs(clf):
    photos = _trained.photo_paths()
    odd = np.asarray(Image.open(photos[0]).convert("L"))[:101, :37]  # grayscale, narrow, odd-sized
    pred = clf.predict([*photos, Image.open(photos[1]), odd])
    assert pred.probs.shape == (4, 10) and pred.probs.dtype == np.float32
    assert np.all(np.isfinite(pred.probs)) and np.all(pred.probs >= 0)
    np.testing.assert_allclose(pred.probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(pred.top_k, np.argsort(-pred.probs, axis=1, kind="stable")[:, :5])
    assert np.all(np.diff(pred.top_probs, axis=1) <= 0)
    names = clf.checkpoint.class_names
    assert pred.names[0] == [names[j] for j in pred.top_k[0]]
    assert pred.sources[0] == photos[0]
    assert photos[0] in str(pred) and pred.names[0][0] in str(pred)
    # The one-call form gives the same numbers for the same view mode.
    np.testing.assert_allclose(
        predict(clf.checkpoint, photos[:1], views=clf.views).probs, pred.probs[:1], rtol=1e-5, atol=1e-7
    )


def test_preprocessing_matches_numpy(clf):
    """Rescale, central square, centre crop or the ten crops, minus the same window of the mean image."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (72, 72, 3), dtype=np.uint8)  # already at resize_size: no resampling
    mean = clf.checkpoint.stats["mean_image"].astype(np.float32)
    centre = clf.model_inputs(img, "center")[0, 0]
    np.testing.assert_allclose(centre, img[4:68, 4:68] - mean[4:68, 4:68], atol=1e-4)
    ten = clf.model_inputs(img, "ten_crop")[0]
    corners = [(0, 0), (0, 8), (8, 0), (8, 8), (4, 4)]
    want = [img[y : y + 64, x : x + 64].astype(np.float32) - mean[y : y + 64, x : x + 64] for y, x in corners]
    want += [w[:, ::-1] for w in want]  # the mirrored views, mean mirrored with them
    np.testing.assert_allclose(ten, np.stack(want), atol=1e-4)
    # A wide image: shorter side 36 -> 72 (x2), then the central square, i.e. its columns 54..90.
    wide = np.zeros((36, 144, 3), np.uint8)
    wide[:, 54:72] = 200  # the left half of that square
    resized = clf.preprocess(wide, "center")["resized"][0]
    assert resized.shape == (72, 72, 3)
    assert resized[:, 1:35].min() == 200 and resized[:, 37:].max() == 0


def test_bad_inputs_give_clear_errors_and_leave_the_checkpoint_alone(runs, tmp_path, clf):
    wd = runs["2x2"]
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(wd.rglob("*")) if p.is_file()}

    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "no_such_run")
    with pytest.raises(CheckpointError, match="No finished checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"No checkpoint of step 3 .* steps there are \[6\]"):
        load_checkpoint(wd, step=3)
    with pytest.raises(ImageError, match="Image 1: No image file at .*missing.jpg"):
        clf.predict([_trained.photo_paths()[0], tmp_path / "missing.jpg"])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG" * 10)
    with pytest.raises(ImageError, match="Image 0: Cannot read .*garbage.jpg' as an image"):
        clf.predict(garbage)
    with pytest.raises(ImageError, match="must be uint8"):
        clf.predict(np.zeros((80, 80, 3), np.float32))
    with pytest.raises(ImageError, match="Cannot use a dict"):
        clf.predict([{"image": 1}])

    # A checkpoint of another model size: asked for explicitly, or a folder whose config says otherwise.
    with pytest.raises(CheckpointError, match=r"another model size .*'width': 0.25.*conv1"):
        load_checkpoint(wd, model={"width": 0.25, "num_classes": 10, "image_size": 64})
    mixed = tmp_path / "mixed" / "checkpoints" / "6"
    shutil.copytree(wd / "checkpoints" / "6", mixed)
    cfg_file = mixed / "config" / "metadata"
    cfg = json.loads(cfg_file.read_text())
    cfg["model"]["width"] = 0.25
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="another model size .*mixes two runs"):
        load_checkpoint(tmp_path / "mixed")

    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(wd.rglob("*")) if p.is_file()}
    assert after == before


def test_checkpoint_without_dataset_item_is_refused_clearly(runs, tmp_path):
    """A step folder missing its class names and mean image says so, and changes nothing on disk."""
    old = tmp_path / "old" / "checkpoints" / "6"
    shutil.copytree(runs["2x2"] / "checkpoints" / "6", old)
    shutil.rmtree(old / "dataset")
    with pytest.raises(CheckpointError, match="has no dataset item"):
        load_checkpoint(tmp_path / "old")
    assert (old / "state").is_dir() and (old / "dataset_stats").is_dir()
