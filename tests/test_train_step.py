"""The jitted train step as a program: bfloat16 compute tracks float32 on real batches, and
nothing in the step makes the host wait for the devices."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax import data as data_lib
from alexnet_jax import optim
from alexnet_jax.data.prefetch import to_global
from alexnet_jax.model import from_config
from alexnet_jax.parallel import make_mesh
from alexnet_jax.steps import create_train_state, make_input_fn, make_train_step

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import demo  # noqa: E402

STEPS = 12


def _setup(dtype):
    c = demo.get_config()
    c.model.width = 0.125
    c.model.dtype = dtype
    c.data.num_workers = 0
    model = from_config(c.model)
    mesh = make_mesh(towers=2, data=2)
    tx = optim.make_optimizer(c.optim)
    state, shardings = create_train_state(model, tx, 0, mesh)
    data = data_lib.resolve(c.data)
    step = make_train_step(model, tx, mesh, shardings, make_input_fn(c.data, data.stats))
    it = data_lib.build_train_iter(c.data, batch_size=32, seed=0, image_size=64, data=data)
    batches = [to_global(next(it), mesh) for _ in range(STEPS)]
    return state, step, batches


def _losses(dtype, guard_after_first):
    state, step, batches = _setup(dtype)
    out = []
    for i, b in enumerate(batches):
        # After the first call (which compiles), forbid every implicit host<->device copy.
        with jax.transfer_guard("disallow" if guard_after_first and i > 0 else "allow"):
            state, m = step(state, b)
        out.append(m["train/loss"])
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state.params))
    return np.asarray(jax.device_get(out))


@pytest.fixture(scope="module")
def float32_losses():
    return _losses("float32", guard_after_first=True)


def test_train_step_makes_no_host_transfer(float32_losses):
    """State and batches on the devices: 11 steps ran under ``transfer_guard('disallow')``
    (it raises on any implicit copy), so the step has no hidden sync point."""
    assert len(float32_losses) == STEPS and np.all(np.isfinite(float32_losses))


@pytest.mark.slow  # bfloat16 compiles slowly on CPU
def test_bfloat16_training_loss_tracks_float32(float32_losses):
    """The same 12 real batches, same initial parameters: per-step losses agree within 2%
    (bf16 keeps ~3 significant digits; parameters and momentum stay float32)."""
    f32, bf16 = float32_losses, _losses("bfloat16", guard_after_first=False)
    assert np.all(np.isfinite(bf16))
    assert f32[-1] < f32[0]  # it is learning, so the comparison covers a moving trajectory
    rel = np.abs(bf16 - f32) / f32
    print("bf16 vs f32 relative loss difference per step:", np.round(rel, 4))
    assert rel.max() < 0.02, rel


def test_lr_change_needs_no_recompilation():
    """The LR lives in the optimizer state: after ``optim.set_lr`` the same compiled step runs (one
    cache entry), and the new LR is the one it applies."""
    state, step, batches = _setup("float32")
    state, m0 = step(state, batches[0])
    state = state.replace(opt_state=optim.set_lr(state.opt_state, 0.001))
    state, m1 = step(state, batches[1])
    assert float(m0["train/lr"]) == pytest.approx(0.01) and float(m1["train/lr"]) == pytest.approx(0.001)
    assert step._cache_size() == 1  # a second entry would mean the drop recompiled the step
