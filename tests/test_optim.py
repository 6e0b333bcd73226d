"""The Optax chain against the paper's update rule, written out in NumPy."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from alexnet_jax import optim


def optim_cfg(**kw):
    c = ml_collections.ConfigDict(
        dict(
            lr=0.01,
            momentum=0.9,
            weight_decay=5e-4,
            decay_biases=False,
            drop_epochs=[],
            plateau_patience=0,
            plateau_min_delta=0.0,
            plateau_max_drops=3,
        )
    )
    c.update(kw)
    return c


def numpy_paper_rule(w, grads, lrs, decay_mask, momentum=0.9, wd=5e-4):
    """v <- 0.9 v - 0.0005 eps w - eps g ; w <- w + v  (Section 5), float64."""
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    v = {k: np.zeros_like(x) for k, x in w.items()}
    for g, eps in zip(grads, lrs):
        for k in w:
            d = wd if decay_mask[k] else 0.0
            v[k] = momentum * v[k] - d * eps * w[k] - eps * np.asarray(g[k], np.float64)
            w[k] = w[k] + v[k]
    return w, v


@pytest.mark.parametrize("decay_biases", [False, True])
def test_chain_matches_paper_rule_across_an_lr_drop(decay_biases):
    rng = np.random.default_rng(0)
    params = {"kernel": rng.normal(size=(3, 4)).astype(np.float32), "bias": rng.normal(size=(4,)).astype(np.float32)}
    steps = 8
    grads = [{k: rng.normal(size=p.shape).astype(np.float32) for k, p in params.items()} for _ in range(steps)]
    lrs = [0.5] * 4 + [0.05] * 4  # an LR drop after step 4 (big LRs make a rescaled momentum obvious)

    tx = optim.make_optimizer(optim_cfg(lr=0.5, decay_biases=decay_biases, weight_decay=0.05))
    state = tx.init({k: jnp.asarray(v) for k, v in params.items()})
    p = {k: jnp.asarray(v) for k, v in params.items()}
    for i, g in enumerate(grads):
        if i == 4:
            state = optim.set_lr(state, 0.05)
        upd, state = tx.update({k: jnp.asarray(v) for k, v in g.items()}, state, p)
        p = jax.tree_util.tree_map(lambda a, b: a + b, p, upd)
    mask = {"kernel": True, "bias": decay_biases}
    want_w, want_v = numpy_paper_rule(params, grads, lrs, mask, wd=0.05)
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), want_w[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(state.inner_state[2].trace[k]), want_v[k], rtol=1e-5, atol=1e-6)
    assert optim.get_lr(state) == pytest.approx(0.05)


def test_common_trace_then_scale_order_would_differ():
    # Guards the test above: with LR scaling after the momentum, a drop rescales old momentum.
    rng = np.random.default_rng(1)
    params = {"kernel": rng.normal(size=(5,)).astype(np.float32)}
    grads = [{"kernel": rng.normal(size=(5,)).astype(np.float32)} for _ in range(4)]
    import optax

    sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=0.5, momentum=0.9)
    s = sgd.init(params)
    p = dict(params)
    for i, g in enumerate(grads):
        if i == 2:
            s.hyperparams["learning_rate"] = jnp.asarray(0.05)
        u, s = sgd.update(g, s, p)
        p = {"kernel": p["kernel"] + u["kernel"]}
    want, _ = numpy_paper_rule(params, grads, [0.5, 0.5, 0.05, 0.05], {"kernel": False})
    assert not np.allclose(p["kernel"], want["kernel"], rtol=1e-3)


def test_scheduled_drops():
    cfg = optim_cfg(drop_epochs=[30, 60])
    assert not optim.scheduled_drop(cfg, 29.0, 29.9)
    assert optim.scheduled_drop(cfg, 29.9, 30.0)
    assert not optim.scheduled_drop(cfg, 30.0, 30.1)
    assert optim.scheduled_drop(cfg, 59.99, 60.2)


def test_plateau_rule():
    cfg = optim_cfg(plateau_patience=2, plateau_min_delta=0.01, plateau_max_drops=1)
    history = optim.DropHistory()
    errs = [0.9, 0.8, 0.795, 0.799, 0.7, 0.75, 0.76, 0.77, 0.78]
    decisions = []
    for i, e in enumerate(errs):
        decisions.append(history.plateau(cfg, e))
        if decisions[-1]:
            history.drops.append({"step": i, "epoch": i, "from": 1.0, "to": 0.1, "reason": "plateau"})
    # 0.795 and 0.799 do not beat 0.8 by 0.01: drop on the second; later stalls exceed max_drops.
    assert decisions == [False, False, False, True, False, False, False, False, False]
    assert history.num_plateau_drops == 1
    assert optim.DropHistory.from_json(history.to_json()) == history


class _State:
    """What LearningRate needs of a train state: ``opt_state`` and ``replace``."""

    def __init__(self, opt_state):
        self.opt_state = opt_state

    def replace(self, opt_state):
        return _State(opt_state)


def test_learning_rate_owns_every_drop_and_applies_it():
    """Hand-worked: 10 steps an epoch, a drop scheduled at epoch 2, a DROP_LR request read at step 15,
    a manual LR at resume; each applied to the optimizer state, recorded once, in precedence order."""
    cfg = optim_cfg(lr=0.01, drop_epochs=[2])
    params = {"kernel": jnp.ones((2, 2))}
    state = _State(optim.make_optimizer(cfg).init(params))
    requests = {15: 4.0}
    step_now = [0]
    seen = []
    lr = optim.LearningRate(
        cfg,
        optim.DropHistory(),
        lr=0.01,
        step=0,
        steps_per_epoch=10,
        request_every=5,
        read_request=lambda: requests.pop(step_now[0], None),
        manual_lr=0.02,
        on_drop=seen.append,
    )
    for step in range(26):
        step_now[0] = step
        state = lr(state, step)
    assert [(d["step"], d["to"], d["reason"]) for d in seen] == [
        (0, 0.02, optim.MANUAL_LR_REASON),
        (15, pytest.approx(0.005), "requested (DROP_LR)"),
        (20, pytest.approx(0.0005), "scheduled (optim.drop_epochs)"),
    ]
    assert lr.history.drops == seen
    assert optim.get_lr(state.opt_state) == pytest.approx(0.0005)
    # Resumed with the same --config.optim.lr again: no new drop (a requeue keeping the flag).
    again = optim.LearningRate(
        cfg,
        lr.history,
        lr=0.0005,
        step=25,
        steps_per_epoch=10,
        request_every=5,
        read_request=lambda: None,
        manual_lr=0.02,
    )
    assert again(state, 26) is state


def test_requested_drop_file(tmp_path):
    assert optim.requested_drop(tmp_path) is None
    (tmp_path / optim.DROP_FILE).write_text("")
    assert optim.requested_drop(tmp_path) == 10.0
    assert not (tmp_path / optim.DROP_FILE).exists()
    (tmp_path / optim.DROP_FILE).write_text("3\n")
    assert optim.requested_drop(tmp_path) == 3.0
    (tmp_path / optim.DROP_FILE).write_text("fast")
    with pytest.raises(ValueError, match="hold a number"):
        optim.requested_drop(tmp_path)
