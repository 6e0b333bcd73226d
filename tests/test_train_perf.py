"""Where a run's time goes: the share spent waiting for input, step, evaluation and checkpoint times, and
the profiler window. The share is checked both ways on the loop's own parts: a loader slowed on purpose
must read as input-bound, device-resident batches behind a slow step must not."""

import io
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rich.console import Console
from test_train import tiny_config

from alexnet_jax import parallel, train
from alexnet_jax.data import prefetch
from alexnet_jax.metrics import DivergenceGuard, MetricWriter, PendingMetrics
from alexnet_jax.progress import TrainProgress


def run_loop(tmp_path, loader_sleep: float, step_work: int, n: int = 24):
    """The training loop's input path (DevicePrefetch -> a jitted step -> PendingMetrics), ``n`` steps."""
    mesh = parallel.make_mesh(towers=1, data=1, devices=jax.devices()[:1])

    def loader():
        for i in range(n):
            time.sleep(loader_sleep)
            yield {"image": np.full((4, 8, 8, 3), i, np.uint8), "label": np.zeros(4, np.int32)}

    class Source:  # what DevicePrefetch reads: an iterator with get_state()
        def __init__(self):
            self.it, self.i = loader(), 0

        def __next__(self):
            self.i += 1
            return next(self.it)

        def get_state(self):
            return {"i": self.i}

    @jax.jit
    def step(x, batch):  # step_work: how many dependent matmuls the "device" runs per step
        m = x
        for _ in range(step_work):
            m = jnp.tanh(m @ x)
        return m, {
            "train/loss": jnp.mean(m) + jnp.mean(batch["image"]) * 0,
            "train/lr": jnp.float32(0.01),
            "train/nonfinite_inputs": jnp.int32(0),
        }

    x = jnp.eye(384) * 0.5
    jax.block_until_ready(step(x, prefetch.to_global(next(loader()), mesh)))  # compiled before the clock starts
    out = io.StringIO()
    progress = TrainProgress(n, 0, 4, console=Console(file=out, force_terminal=False, width=200), plain_every_s=0)
    tmp_path.mkdir(parents=True)
    writer = MetricWriter(tmp_path, enabled=True)
    batches = prefetch.DevicePrefetch(Source(), mesh, with_state=True)
    metrics = PendingMetrics(
        writer,
        progress,
        DivergenceGuard(writer, progress, max_bad=0, resume_hint=str),
        log_every=6,
        batch_size=4,
        input_wait=lambda: batches.waited,
    )
    for s in range(1, n + 1):
        batch, _ = next(batches)
        x_next, m = step(x, batch)
        metrics.add(s, m)
    metrics.fetch()
    batches.close()
    writer.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    shares = [r["perf/input_wait_share"] for r in rows if "perf/input_wait_share" in r]
    return shares, out.getvalue()


def test_a_slow_loader_reads_as_input_bound_and_a_slow_step_does_not(tmp_path):
    slow_input, text = run_loop(tmp_path / "slow-loader", loader_sleep=0.05, step_work=1)
    assert len(slow_input) >= 3 and min(slow_input) > 0.5, slow_input
    assert "input-bound" in text, text
    slow_step, text = run_loop(tmp_path / "slow-step", loader_sleep=0.0, step_work=60)
    assert len(slow_step) >= 3 and max(slow_step) < 0.1, slow_step
    assert "input-bound" not in text, text


def test_a_run_logs_its_times_and_writes_a_profile_with_the_exchanges(tmp_path):
    c = tiny_config(total_steps=4, eval_every=2, checkpoint_every=2, profile_steps=(2, 3))
    train.train_and_evaluate(c, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    shares = [r["perf/input_wait_share"] for r in rows if "perf/input_wait_share" in r]
    assert shares and all(0 <= s <= 1 for s in shares), rows
    assert all(r["perf/step_time_s"] > 0 for r in rows if "perf/step_time_s" in r)
    assert [r["step"] for r in rows if "perf/eval_s" in r] == [2, 4]
    assert [r["step"] for r in rows if "perf/checkpoint_s" in r] == [2, 4]
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1, list((tmp_path / "profile").rglob("*"))
    data = traces[0].read_bytes()
    for name in (b"exchange_to_conv3", b"exchange_to_fc6", b"train_step"):
        assert name in data, name


@pytest.mark.parametrize("value", [(3, 2), (0, 1), (1,), "1,2"])
def test_profile_steps_is_checked(value):
    from alexnet_jax.config_check import validate_config
    from alexnet_jax.errors import ConfigError

    c = tiny_config()
    with pytest.raises((ConfigError, TypeError)):
        c.profile_steps = value
        validate_config(c)
