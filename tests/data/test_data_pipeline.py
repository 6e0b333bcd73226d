"""Loader: determinism, exact resume, host sharding, one-pass evaluation, on a tiny embedded set."""

import hashlib
from pathlib import Path

import _reference as R
import numpy as np
import pytest

from alexnet_jax.data import embedded
from alexnet_jax.data import locate as LO
from alexnet_jax.data import pipeline as PL

N_TRAIN, N_VAL = 12, 5  # per class; 10 classes


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    c = PL.default_data_config()
    c.root = str(tmp_path_factory.mktemp("embedded"))
    c.embedded.num_train_per_class, c.embedded.num_val_per_class = N_TRAIN, N_VAL
    c.embedded.image_size = 40
    c.resize_size, c.crop_size = 36, 32
    c.prepare_workers = 0
    return c


@pytest.fixture(scope="module")
def data(cfg):
    return LO.resolve(cfg)


def take(it, n):
    out = [next(it) for _ in range(n)]
    if hasattr(it, "close"):
        it.close()
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def digest(img):
    return hashlib.sha1(np.ascontiguousarray(img).tobytes()).hexdigest()


def test_train_batches_shape_dtype_and_normalisation(cfg, data):
    (b,) = take(PL.build_train_iter(cfg, batch_size=16, seed=0, num_workers=0, data=data), 1)
    assert b["image"].shape == (16, 32, 32, 3) and b["image"].dtype == np.uint8  # normalised on the device
    assert b["crop_yx"].shape == (16, 2) and b["flip"].shape == (16,) and b["alpha"].shape == (16, 3)
    assert b["label"].dtype == np.int32 and b["mask"].all()
    x = R.normalize_batch(b, data.stats["mean_image"], data.stats["eigval"], data.stats["eigvec"], with_lighting=True)
    assert abs(float(x.mean())) < 20 < float(b["image"].mean())  # what the mean image's subtraction leaves
    assert set(b["label"].tolist()) <= set(range(10))
    assert data.stats["mean_image"].shape == (36, 36, 3)
    assert len(data.class_names) == 10 and len(data.records["train"]) == 10 * N_TRAIN


def test_same_seed_same_batches_other_seed_differs(cfg, data):
    a = take(PL.build_train_iter(cfg, batch_size=16, seed=5, num_workers=0, data=data), 4)
    b = take(PL.build_train_iter(cfg, batch_size=16, seed=5, num_workers=0, data=data), 4)
    c = take(PL.build_train_iter(cfg, batch_size=16, seed=6, num_workers=0, data=data), 4)
    assert_same(a, b)
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_resume_mid_epoch_matches_uninterrupted(cfg, data):
    ref = take(PL.build_train_iter(cfg, batch_size=16, seed=1, num_workers=0, data=data), 12)  # 1.6 epochs
    it = PL.build_train_iter(cfg, batch_size=16, seed=1, num_workers=0, data=data)
    for _ in range(5):
        next(it)
    state = it.get_state()
    resumed = PL.build_train_iter(cfg, batch_size=16, seed=1, num_workers=0, data=LO.resolve(cfg))
    resumed.set_state(state)
    assert_same(take(resumed, 7), ref[5:])


def test_two_workers_same_batches_and_state_portable_across_worker_counts(cfg, data):
    ref = take(PL.build_train_iter(cfg, batch_size=16, seed=2, num_workers=0, data=data), 6)
    it = PL.build_train_iter(cfg, batch_size=16, seed=2, num_workers=2, data=data)
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    it.set_state(state)  # restoring in place (restarts the workers at batch 3)
    again = next(it)
    it.close()
    assert_same(first, ref[:3])  # the worker count does not change the data
    assert_same([again], ref[3:4])
    resumed = PL.build_train_iter(cfg, batch_size=16, seed=2, num_workers=0, data=data)
    resumed.set_state(state)
    assert_same(take(resumed, 3), ref[3:])


def test_state_portable_across_host_counts_and_checked(cfg, data):
    glob = PL.build_train_iter(cfg, batch_size=16, seed=4, num_workers=0, data=data)
    ref = take(glob, 5)
    state = {**glob.get_state(), "next_batch": 2}
    for h in range(2):
        it = PL.build_train_iter(cfg, batch_size=16, seed=4, shard_index=h, shard_count=2, num_workers=0, data=data)
        it.set_state(state)
        assert it.get_state() == state
        part = take(it, 3)
        for t in range(3):
            ours = {digest(x) for x in part[t]["image"]}
            assert ours <= {digest(x) for x in ref[2 + t]["image"]}
    other = PL.build_train_iter(cfg, batch_size=32, seed=4, num_workers=0, data=data)
    with pytest.raises(ValueError, match="saved for"):
        other.set_state(state)


def test_grain_orbax_handler_saves_and_restores(cfg, data, tmp_path):
    import grain
    from etils import epath

    ref = take(PL.build_train_iter(cfg, batch_size=16, seed=7, num_workers=0, data=data), 4)
    it = PL.build_train_iter(cfg, batch_size=16, seed=7, num_workers=0, data=data)
    next(it), next(it)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), item=it)
    fresh = PL.build_train_iter(cfg, batch_size=16, seed=7, num_workers=0, data=data)
    handler.restore(epath.Path(tmp_path), item=fresh)
    assert_same(take(fresh, 2), ref[2:])


def test_first_epoch_visits_every_image_once(cfg, data):
    """With augmentation off, the first len(train) examples are the training set, each exactly once."""
    plain = cfg.copy_and_resolve_references()
    plain.crop_size, plain.flip, plain.pca_lighting_std, plain.mean_subtraction = 36, False, 0.0, False
    n = 10 * N_TRAIN
    batches = take(PL.build_train_iter(plain, batch_size=20, seed=0, num_workers=0, data=data), n // 20)
    stream = [(digest(i.astype(np.uint8)), int(label)) for b in batches for i, label in zip(b["image"], b["label"])]
    everything = []
    for b in PL.build_eval_iter(plain, batch_size=n, split="train", image_size=36, num_workers=0, data=data):
        everything += [(digest(i.astype(np.uint8)), int(label)) for i, label in zip(b["image"], b["label"])]
    assert sorted(stream) == sorted(everything)
    assert [label for _, label in stream] != sorted(label for _, label in stream)  # and shuffled


def test_host_shards_union_is_the_global_batch(cfg, data):
    glob = take(PL.build_train_iter(cfg, batch_size=16, seed=4, num_workers=0, data=data), 3)
    hosts = [
        take(PL.build_train_iter(cfg, batch_size=16, seed=4, shard_index=h, shard_count=2, num_workers=0, data=data), 3)
        for h in range(2)
    ]
    for t in range(3):
        assert hosts[0][t]["image"].shape[0] == 8
        union = sorted(digest(x) for h in hosts for x in h[t]["image"])
        assert union == sorted(digest(x) for x in glob[t]["image"])
        assert not set(map(digest, hosts[0][t]["image"])) & set(map(digest, hosts[1][t]["image"]))


def test_host_batches_in_host_order_are_the_global_batch_in_order(cfg, data):
    # Dropout masks follow an example's row in the global batch, so the order must match too.
    glob = take(PL.build_train_iter(cfg, batch_size=16, seed=4, num_workers=0, data=data), 3)
    assert set(glob[0]) == {"image", "label", "mask", "crop_yx", "flip", "alpha"}
    for hosts in (2, 4):
        parts = [
            take(
                PL.build_train_iter(
                    cfg, batch_size=16, seed=4, shard_index=h, shard_count=hosts, num_workers=0, data=data
                ),
                3,
            )
            for h in range(hosts)
        ]
        for t in range(3):
            for key in glob[t]:
                np.testing.assert_array_equal(np.concatenate([p[t][key] for p in parts]), glob[t][key])
    for mode in ("center", "whole"):
        ev = list(PL.build_eval_iter(cfg, batch_size=16, mode=mode, num_workers=0, data=data))
        ev_parts = [
            list(
                PL.build_eval_iter(
                    cfg, batch_size=16, mode=mode, shard_index=h, shard_count=2, num_workers=0, data=data
                )
            )
            for h in range(2)
        ]
        for t, b in enumerate(ev):
            for key in b:
                np.testing.assert_array_equal(np.concatenate([p[t][key] for p in ev_parts]), b[key])


@pytest.mark.parametrize("mode,shape", [("center", (32, 32, 3)), ("whole", (36, 36, 3))])
def test_eval_covers_validation_once(cfg, data, mode, shape):
    n = 10 * N_VAL  # 50, batch 16 -> 4 batches, 14 padded rows
    batches = list(PL.build_eval_iter(cfg, batch_size=16, mode=mode, num_workers=0, data=data))
    assert len(batches) == PL.eval_num_batches(n, 16) == 4
    assert all(b["image"].shape == (16,) + shape and b["image"].dtype == np.uint8 for b in batches)
    masks = np.concatenate([b["mask"] for b in batches])
    assert masks.sum() == n and not masks[n:].any()
    labels = np.concatenate([b["label"] for b in batches])[masks]
    assert np.bincount(labels, minlength=10).tolist() == [N_VAL] * 10


def test_eval_sharded_over_hosts(cfg, data):
    n = 10 * N_VAL
    per_host = [
        list(PL.build_eval_iter(cfg, batch_size=16, shard_index=h, shard_count=2, num_workers=0, data=data))
        for h in range(2)
    ]
    assert len(per_host[0]) == len(per_host[1]) == 4  # same number of steps on every host
    imgs = [digest(i) for h in per_host for b in h for i, m in zip(b["image"], b["mask"]) if m]
    assert len(imgs) == n
    single = [
        digest(i)
        for b in PL.build_eval_iter(cfg, batch_size=16, num_workers=0, data=data)
        for i, m in zip(b["image"], b["mask"])
        if m
    ]
    assert sorted(imgs) == sorted(single)


def test_folder_form_matches_packed_form_labels(cfg, data):
    folder = cfg.copy_and_resolve_references()
    folder.format = "folder"
    folder.root = str(
        embedded.ensure_embedded_dataset(cfg.root, num_train_per_class=N_TRAIN, num_val_per_class=N_VAL, image_size=40)
    )
    folder.stats_path = str(Path(cfg.root) / (Path(folder.root).name + "_packed36") / "stats.npz")
    fdata = LO.resolve(folder)
    a = list(PL.build_eval_iter(folder, batch_size=50, num_workers=0, data=fdata))[0]
    b = list(PL.build_eval_iter(cfg, batch_size=50, num_workers=0, data=data))[0]
    np.testing.assert_array_equal(a["label"], b["label"])
    # Same pixels up to one JPEG re-encoding at quality 95.
    assert np.abs(a["image"].astype(np.int16) - b["image"]).mean() < 3.0


@pytest.mark.parametrize("mode", ["train", "center"])
def test_device_normalisation_of_loader_batches_equals_the_reference(cfg, data, mode):
    from alexnet_jax.data import device

    if mode == "train":
        batches = take(PL.build_train_iter(cfg, batch_size=16, seed=3, num_workers=0, data=data), 2)
    else:
        batches = list(PL.build_eval_iter(cfg, batch_size=16, mode="center", num_workers=0, data=data))[:2]
    s = data.stats
    for b in batches:
        out = device.normalize(b, s["mean_image"], s["eigval"], s["eigvec"], lighting=mode == "train")
        ref = R.normalize_batch(b, s["mean_image"], s["eigval"], s["eigvec"], with_lighting=mode == "train")
        np.testing.assert_allclose(np.asarray(out), ref, atol=1e-3)
    assert mode != "train" or any(b["flip"].any() and (b["alpha"] != 0).all() for b in batches)


def test_whole_images_cut_into_ten_views_on_device_equal_the_papers(cfg, data):
    """Evaluation sends each image once (mode 'whole'); the device cuts the ten views the paper averages."""
    import jax

    from alexnet_jax.data import device

    mean = data.stats["mean_image"]
    whole = list(PL.build_eval_iter(cfg, batch_size=16, mode="whole", num_workers=0, data=data))[:2]
    center = list(PL.build_eval_iter(cfg, batch_size=16, mode="center", num_workers=0, data=data))[:2]
    cut = jax.jit(lambda im: device.eval_views(im, mean, cfg.crop_size))
    for w, c in zip(whole, center):
        assert w["image"].dtype == np.uint8 and w["image"].shape == (16, cfg.resize_size, cfg.resize_size, 3)
        views = np.asarray(cut(w["image"]))
        np.testing.assert_allclose(
            views, np.stack([R.ten_views(im, mean, cfg.crop_size) for im in w["image"]]), atol=1e-4
        )
        np.testing.assert_array_equal(w["label"], c["label"])
        np.testing.assert_allclose(views[:, 4], R.normalize_batch(c, mean, with_lighting=False), atol=1e-4)
    with pytest.raises(ValueError, match="'whole'.*ten .*views on the device"):
        PL.build_eval_iter(cfg, batch_size=16, mode="ten_crop", num_workers=0, data=data)


@pytest.mark.parametrize("value", ["float32", "uint8"])
def test_an_older_runs_saved_output_field_is_accepted_and_ignored(cfg, data, value):
    """Configs saved before the loader always sent uint8 carry data.output; they still load, to the same batches."""
    import json

    import ml_collections

    from alexnet_jax import data as data_lib
    from alexnet_jax.errors import DatasetError

    saved = {**json.loads(cfg.to_json()), "output": value}  # as config.json and checkpoints hold it
    old = ml_collections.ConfigDict(saved)
    LO.check_config(old)
    assert data_lib.drop_legacy_fields(saved) == json.loads(cfg.to_json())
    a = take(PL.build_train_iter(old, batch_size=16, seed=0, num_workers=0, data=data), 1)
    b = take(PL.build_train_iter(cfg, batch_size=16, seed=0, num_workers=0, data=data), 1)
    assert_same(a, b)
    old.output = "float16"  # never a value of the field: not a config we wrote
    with pytest.raises(DatasetError, match="data.output must be one of 'float32', 'uint8', got 'float16'"):
        LO.check_config(old)
    with pytest.raises(DatasetError, match="data.output"):
        data_lib.drop_legacy_fields({**saved, "output": "float16"})
