"""data.prefetch.DevicePrefetch and metrics.error_rates: prefetching changes when a batch reaches the devices,
never which batch a step gets, which loader state is saved with it, or what evaluation counts."""

import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from alexnet_jax import data as data_lib
from alexnet_jax import metrics, parallel, steps
from alexnet_jax.data import prefetch
from alexnet_jax.model import from_config
from alexnet_jax.parallel import make_mesh

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import demo  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    c = demo.get_config()
    c.model.width = 0.125
    c.data.num_workers = 0
    data = data_lib.resolve(c.data)

    def make_iter():
        return data_lib.build_train_iter(c.data, batch_size=16, seed=0, image_size=64, data=data)

    return c, data, make_iter, make_mesh(towers=2, data=2)


class _Recording:
    """The real loader, with a record of which thread read it and an optional failure at read ``fail_at``."""

    def __init__(self, it, fail_at=None):
        self.it, self.fail_at, self.threads = it, fail_at, []

    def __next__(self):
        self.threads.append(threading.current_thread())
        if len(self.threads) == self.fail_at:
            raise OSError("shard unreadable (planted)")
        return next(self.it)

    def get_state(self):
        return self.it.get_state()


def _wait_for(cond, timeout=30.0):
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)
    return cond()


def test_each_batch_comes_with_the_loader_state_after_it(setup):
    """Against reading the loader in order on this thread: the same batches, in order, on the devices
    with the batch sharding; and each paired state, restored into a fresh loader, gives the next batch."""
    _, _, make_iter, mesh = setup
    ref = make_iter()
    expected = [next(ref) for _ in range(5)]
    ref.close()
    it = make_iter()
    batches = prefetch.DevicePrefetch(it, mesh, depth=2, with_state=True)
    got = [next(batches) for _ in range(4)]
    batches.close()
    it.close()
    for k, (batch, state) in enumerate(got):
        assert set(batch) == set(prefetch.BATCH_KEYS) & set(expected[k])
        for key, value in batch.items():
            assert isinstance(value, jax.Array) and value.sharding == parallel.batch_sharding(mesh)
            np.testing.assert_array_equal(np.asarray(value), expected[k][key], err_msg=f"batch {k} {key}")
        resumed = make_iter()
        resumed.set_state(state)
        np.testing.assert_array_equal(next(resumed)["image"], expected[k + 1]["image"], err_msg=f"state {k}")
        resumed.close()


def test_the_loader_is_read_ahead_off_the_training_thread_and_not_after_close(setup):
    _, _, make_iter, mesh = setup
    it = _Recording(make_iter())
    batches = prefetch.DevicePrefetch(it, mesh, depth=2, with_state=True)
    next(batches)
    # One taken, two waiting in the queue, and the thread holding the next one until there is room.
    assert _wait_for(lambda: len(it.threads) == 4), len(it.threads)
    assert all(t is not threading.main_thread() for t in it.threads)
    batches.close()
    assert not batches._thread.is_alive()
    read = len(it.threads)
    time.sleep(0.2)
    assert len(it.threads) == read  # close() stopped the reading: the loader can be closed after it
    it.it.close()


def test_a_loader_error_is_raised_by_the_next_that_would_get_that_batch(setup):
    _, _, make_iter, mesh = setup
    it = _Recording(make_iter(), fail_at=3)
    batches = prefetch.DevicePrefetch(it, mesh, depth=2, with_state=True)
    next(batches), next(batches)  # the two batches read before the failure still arrive
    with pytest.raises(OSError, match="planted"):
        next(batches)
    with pytest.raises(StopIteration):
        next(batches)
    batches.close()
    it.it.close()


def test_evaluate_counts_every_batch_once(setup):
    """metrics.error_rates (copies two batches ahead, one fetch at the end) against the same eval step fetched
    batch by batch, and ``n`` against the mask count of the host batches."""
    c, data, _, mesh = setup
    model = from_config(c.model)
    params = parallel.shard_variables(jax.jit(model.init)(jax.random.key(0), np.zeros((1, 64, 64, 3))), mesh)["params"]
    inputs = steps.make_input_fn(c.data, data.stats)
    eval_step = steps.make_eval_step(model, mesh, jax.tree.map(lambda x: x.sharding, params), inputs)
    it = data_lib.build_eval_iter(c.data, batch_size=48, mode="center", image_size=64, data=data)
    host = list(it)  # 500 images: 11 batches, the last one padded (masked)
    assert len(host) > metrics._EVAL_IN_FLIGHT + 3
    by_batch = {}
    for b in host:
        for name, count in jax.device_get(eval_step(params, prefetch.to_global(b, mesh))).items():
            by_batch[name] = by_batch.get(name, 0) + int(count)
    got = metrics.error_rates(eval_step, params, host, mesh)
    assert got["n"] == by_batch["n"] == int(sum(np.sum(b["mask"]) for b in host)) == 500
    assert got["top1_error"] == by_batch["top1_error"] / 500 and got["top5_error"] == by_batch["top5_error"] / 500


def test_whole_images_as_large_as_the_crop_still_become_ten_views():
    """resize_size == crop_size: the evaluation's whole images (no crop offsets) are cut into the ten views,
    all the image itself or its mirror, minus the mean image (it once asked for crop offsets and failed)."""
    import ml_collections

    from alexnet_jax.steps import make_input_fn

    cfg = ml_collections.ConfigDict({"crop_size": 8, "mean_subtraction": True, "pca_lighting_std": 0.1})
    rng = np.random.default_rng(0)
    mean = rng.uniform(0, 255, (8, 8, 3)).astype(np.float32)
    stats = {"mean_image": mean, "eigval": np.ones(3, np.float32), "eigvec": np.eye(3, dtype=np.float32)}
    image = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    views = np.asarray(make_input_fn(cfg, stats)({"image": image, "label": np.zeros(2, np.int32)}, False))
    assert views.shape == (2, 10, 8, 8, 3)
    plain, mirrored = image - mean, (image - mean)[:, :, ::-1]
    for v in range(10):
        assert any(np.allclose(views[:, v], want, atol=1e-4) for want in (plain, mirrored)), v
