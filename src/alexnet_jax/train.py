"""Training as the paper did it: a jitted, sharded ``train_step(state, batch)``, evaluation,
learning-rate drops, Orbax checkpoints and exact resume.

Everything a resumed run needs is in the checkpoint: parameters, optimizer state
(with the learning rate), step, the dropout RNG, the data iterator's position,
the LR-drop history and the config. Dropout keys come from ``(rng, step)``, so
a resumed run draws the same masks it would have drawn.
"""

from __future__ import annotations

import collections
import json
import math
import os
import signal
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from alexnet_jax import data as data_lib
from alexnet_jax import distributed, optim
from alexnet_jax.checkpoint import Checkpointer, CheckpointError, CheckpointWriteError
from alexnet_jax.model import AlexNet, ConfigError, count_params, from_config
from alexnet_jax.parallel import DATA_AXIS, TOWER_AXIS, make_mesh, mesh_forward, use_virtual_cpu_devices


class TrainingError(RuntimeError):
    """The run stopped for a reason the researcher must act on (message says what)."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: steps taken
    params: Any  # {'towers': {...}}: every leaf has a leading tower axis
    opt_state: Any  # optax state, learning rate included
    rng: jax.Array  # uint32 key data of the dropout key


def state_shardings(abstract_state: TrainState, mesh) -> TrainState:
    """Tower-stacked leaves (params, momentum: ndim >= 2) split over 'tower'; scalars and keys replicated."""

    def spec(x):
        return NamedSharding(mesh, P(TOWER_AXIS) if x.ndim >= 2 else P())

    return jax.tree_util.tree_map(spec, abstract_state)


def create_train_state(model: AlexNet, tx: optax.GradientTransformation, seed: int, mesh):
    """Initialise straight onto the mesh. Returns ``(state, shardings)``."""

    def init():
        k_init, k_drop = jax.random.split(jax.random.key(seed))
        x = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
        params = model.init(k_init, x)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.key_data(k_drop))

    shardings = state_shardings(jax.eval_shape(init), mesh)
    return jax.jit(init, out_shardings=shardings)(), shardings


def cross_entropy(logits, labels, mask):
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1)


def make_input_fn(data_cfg, stats):
    """``inputs(batch, train) -> float32 images``.

    With ``data.output='uint8'`` the loader sends raw crops (a quarter of the bytes)
    and the mean image and PCA lighting are applied here, inside the jitted step.
    Evaluation batches of whole ``resize_size`` images (mode 'whole') become the
    ten test views here: ``(B, 10, crop, crop, 3)``.
    """
    if data_cfg.output != "uint8":
        return lambda batch, train: batch["image"]
    from alexnet_jax.data.device import eval_views, normalize

    mean = stats["mean_image"] if (stats is not None and data_cfg.mean_subtraction) else None
    eigval = None if stats is None else stats["eigval"]
    eigvec = None if stats is None else stats["eigvec"]
    lighting = stats is not None and data_cfg.pca_lighting_std > 0

    def inputs(batch, train):
        if not train and batch["image"].shape[-3] != data_cfg.crop_size:
            return eval_views(batch["image"], mean, data_cfg.crop_size)
        return normalize(batch, mean, eigval, eigvec, lighting=lighting and train)

    return inputs


def make_train_step(model: AlexNet, tx, mesh, shardings: TrainState, inputs=None):
    """``train_step(state, batch) -> (state, metrics)``, jitted once, the state donated."""
    forward = mesh_forward(model, mesh, train=True)
    inputs = inputs or (lambda batch, train: batch["image"])

    def train_step(state: TrainState, batch: dict):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        mask = batch["mask"].astype(jnp.float32)

        images = inputs(batch, True)
        nonfinite = jnp.sum(~jnp.isfinite(images))  # a bad batch: reported at the next flush, step skipped

        def loss_fn(params):
            logits = forward({"params": params}, images, key)
            return cross_entropy(logits, batch["label"], mask), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(nonfinite == 0, new, old),
                                         (params, opt_state), (state.params, state.opt_state))
        wrong = (jnp.argmax(logits, -1) != batch["label"]).astype(jnp.float32)
        metrics = {
            "train/loss": loss,
            "train/top1_error": jnp.sum(wrong * mask) / jnp.maximum(jnp.sum(mask), 1),
            "train/lr": state.opt_state.hyperparams["learning_rate"],
            "train/grad_norm": optax.tree.norm(grads),
            "train/nonfinite_inputs": nonfinite,
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng), metrics

    batch_sharding = NamedSharding(mesh, P(DATA_AXIS))
    return jax.jit(train_step, in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=0)


CENTER_VIEW = 4  # the centre crop's place among the ten views (transforms.ten_crop_params)


def make_eval_step(model: AlexNet, mesh, param_shardings, inputs=None):
    """Counts of top-1/top-5 errors on a batch, masked rows left out.

    A batch of single views gives ``n``, ``top1_wrong``, ``top5_wrong``. A
    batch of the ten views gives those for the centre view and, under
    ``ten_crop/``, for the softmax averaged over the ten (the paper's
    protocol): both protocols from one pass over the data.
    """
    forward = mesh_forward(model, mesh, train=False)
    inputs = inputs or (lambda batch, train: batch["image"])
    k = min(5, model.num_classes)

    def eval_step(params, batch):
        images = inputs(batch, False)
        views = images.shape[1] if images.ndim == 5 else 1
        images = images.reshape((-1,) + images.shape[-3:])
        probs = jax.nn.softmax(forward({"params": params}, images, None).astype(jnp.float32))
        probs = probs.reshape(batch["label"].shape[0], views, -1)
        label, mask = batch["label"], batch["mask"]

        def wrong(p):
            _, top = jax.lax.top_k(p, k)
            return (jnp.sum((top[:, 0] != label) & mask), jnp.sum(~jnp.any(top == label[:, None], axis=1) & mask))

        out = {"n": jnp.sum(mask)}
        out["top1_wrong"], out["top5_wrong"] = wrong(probs[:, CENTER_VIEW if views == 10 else 0])
        if views == 10:
            out["ten_crop/top1_wrong"], out["ten_crop/top5_wrong"] = wrong(probs.mean(axis=1))
        return out

    return jax.jit(eval_step, in_shardings=(param_shardings, NamedSharding(mesh, P(DATA_AXIS))))


def to_global(batch: dict, mesh) -> dict:
    """This process's slice of the batch -> global arrays sharded over 'data'."""
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items() if k in _BATCH_KEYS}


_BATCH_KEYS = ("image", "label", "mask", "crop_yx", "flip", "alpha")  # the last three: uint8 mode


def device_batches(train_iter, mesh, depth: int = 2):
    """Yields ``(global batch on the devices, iterator state after that batch)``, ``depth`` ahead.

    Batches go to the devices while earlier steps still compute. The iterator
    itself runs ahead, so the state to checkpoint with a step is the one that
    came with the step's batch, not ``train_iter.get_state()``.
    """
    queue: collections.deque = collections.deque()
    while True:
        while len(queue) < depth:
            queue.append((to_global(next(train_iter), mesh), train_iter.get_state()))
        yield queue.popleft()


def evaluate(eval_step, params, batches, mesh) -> dict:
    """Error rates over one pass: ``top1_error``, ``top5_error`` (centre view) and, for ten-view
    batches, ``top1_error_ten_crop``, ``top5_error_ten_crop``; ``n`` examples counted."""
    totals = collections.Counter()
    for batch in batches:
        for name, count in jax.device_get(eval_step(params, to_global(batch, mesh))).items():
            totals[name] += int(count)
    n = max(totals["n"], 1)
    out = {"top1_error": totals["top1_wrong"] / n, "top5_error": totals["top5_wrong"] / n, "n": totals["n"]}
    if "ten_crop/top1_wrong" in totals:
        out["top1_error_ten_crop"] = totals["ten_crop/top1_wrong"] / n
        out["top5_error_ten_crop"] = totals["ten_crop/top5_wrong"] / n
    return out


class MetricWriter:
    """``<workdir>/metrics.jsonl`` (one object per line) and TensorBoard event files."""

    def __init__(self, workdir: Path, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        self.jsonl = open(workdir / "metrics.jsonl", "a")
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(workdir / "tensorboard"))
        except ImportError:  # optional: metrics.jsonl has everything
            self.tb = None

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) if not isinstance(v, str) else v for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if not isinstance(v, str):
                    self.tb.add_scalar(k, float(v), int(step))

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()


# Data fields that change only speed, never which pixels a step sees: free to change on resume.
_DATA_SPEED_FIELDS = {"num_workers", "worker_buffer_size", "num_threads", "prefetch_buffer_size",
                      "prepare_workers", "cache_dir"}


def _check_compatible(saved: dict, config: ml_collections.ConfigDict) -> None:
    """A checkpoint can only continue the same network on the same data stream."""
    for section, free in (("model", {"dtype"}), ("data", _DATA_SPEED_FIELDS)):  # dtype: speed only
        now = json.loads(config[section].to_json())
        then = saved.get(section, {})
        diff = sorted(k for k in (set(now) | set(then)) - free if now.get(k) != then.get(k))
        if diff:
            raise TrainingError(
                f"The checkpoint in this workdir was made with a different {section} config "
                f"(fields {diff}). Use a new --workdir, or the checkpoint's own config."
            )


def _schedule(config, num_train: int) -> tuple[int, int]:
    steps_per_epoch = max(1, num_train // config.batch_size)
    total = config.total_steps if config.total_steps > 0 else int(config.num_epochs * steps_per_epoch)
    return steps_per_epoch, total


def _every(n: int, steps_per_epoch: int) -> int:
    return steps_per_epoch if n <= 0 else n


def _last_good_text(ckpt: Checkpointer) -> str:
    """Where a stopped run can resume from (after letting a running write finish)."""
    try:
        ckpt.wait()
    except CheckpointError:
        pass
    if ckpt.last_good is None:
        return "No checkpoint had been written yet"
    return f"The last good checkpoint, step {ckpt.last_good}, is kept in {ckpt.directory}"


def _mesh_for(model: AlexNet, mesh_cfg) -> tuple[Any, str | None]:
    """The run's mesh, and a line to print when the default layout had to change.

    ``mesh.tower=-1`` asks for one tower per device; with fewer devices than
    towers (one GPU), or a count the towers do not divide, every device runs
    all towers instead (``mesh.tower=1``), which gives the same results.
    """
    tower_axis, note = mesh_cfg.tower, None
    if tower_axis == -1:
        tower_axis = model.towers
        n = jax.device_count()
        if n % model.towers:
            tower_axis = 1
            note = (f"{n} {jax.devices()[0].platform} device(s) for {model.towers} towers: every device runs all "
                    f"towers (--config.mesh.tower=1; same results, no exchanges between devices).")
    if tower_axis not in (1, model.towers):
        raise ConfigError(f"mesh.tower={tower_axis}: use -1 or {model.towers} (one tower per device) "
                          "or 1 (all towers on every device).")
    try:
        return make_mesh(towers=tower_axis, data=None if mesh_cfg.data == -1 else mesh_cfg.data), note
    except ConfigError as e:
        raise ConfigError(f"{e} With fewer devices, --config.mesh.tower=1 runs all towers on every device, "
                          "and --config.mesh.data=N uses N of them.") from None


MANUAL_LR_REASON = "resume with --config.optim.lr"


def manual_lr_to_apply(manual_lr: float | None, drops: list[dict]) -> float | None:
    """The LR to set on resume, or None. An LR asked for at resume is a manual drop, once: the same
    request again (a requeue script that keeps the flag) changes nothing, and no request (a requeue
    without the flag) changes nothing either."""
    if manual_lr is None:
        return None
    asked = [d["to"] for d in drops if d["reason"] == MANUAL_LR_REASON]
    if asked and math.isclose(asked[-1], manual_lr, rel_tol=1e-9):
        return None
    return float(manual_lr)


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, manual_lr: float | None = None) -> dict:
    """Train (or resume) according to ``config``; returns the final metrics.

    ``manual_lr``: on resume, set the LR to this (logged as a manual drop), once per distinct
    value; ``launch.py`` passes it when ``--config.optim.lr`` is on the command line. Without
    it the checkpoint's LR carries on, whatever ``config.optim.lr`` says.
    """
    from rich.console import Console
    from rich.markup import escape

    from alexnet_jax.progress import TrainProgress
    from alexnet_jax.summary import summary_table

    console = Console(soft_wrap=True)  # logs keep whole lines; a terminal wraps them itself
    model = from_config(config.model)
    data_lib.check_config(config.data)  # path and config errors now, before any device or data scan
    if config.data.crop_size != model.image_size:
        raise ConfigError(f"data.crop_size={config.data.crop_size} must equal model.image_size="
                          f"{model.image_size}.")
    use_virtual_cpu_devices(config.mesh.cpu_devices)  # per process
    distributed.initialize(config.get("distributed"))  # several hosts: join them before JAX starts
    mesh, layout_note = _mesh_for(model, config.mesh)
    if layout_note and jax.process_index() == 0:
        console.print(layout_note)
    if config.batch_size % mesh.shape[DATA_AXIS]:
        raise ConfigError(f"batch_size={config.batch_size} does not divide over the mesh's data axis "
                          f"({mesh.shape[DATA_AXIS]}); set --config.batch_size to a multiple of it.")
    workdir = Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainingError(f"Cannot use --workdir={workdir}: {e}. Give a folder that can be created "
                            "or written.") from None
    is_main = jax.process_index() == 0
    console.quiet = not is_main  # one voice: process 0's
    host_shard = distributed.process_batch_shard(mesh)  # (block, blocks) of each global batch this process reads

    data = distributed.main_first(lambda: data_lib.resolve(config.data))  # the embedded set is made once
    if len(data.classes) != model.num_classes:
        raise ConfigError(f"The data has {len(data.classes)} classes but model.num_classes="
                          f"{model.num_classes}; set --config.model.num_classes={len(data.classes)}.")
    num_train = len(data.records["train"])
    steps_per_epoch, total_steps = _schedule(config, num_train)

    tx = optim.make_optimizer(config.optim)
    state, shardings = create_train_state(model, tx, config.seed, mesh)
    ckpt = Checkpointer(workdir, keep=config.keep_checkpoints)
    control = optim.LRControl()
    data_state = None
    restored = ckpt.restore_latest(jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings))
    writer = MetricWriter(workdir, enabled=is_main)

    def log_drop(entry):
        console.print(f"[yellow]LR {entry['from']:.3g} -> {entry['to']:.3g} at step {entry['step']} "
                      f"(epoch {entry['epoch']:.2f}): {entry['reason']}[/yellow]")
        writer.write(entry["step"], {"lr_drop/from": entry["from"], "lr_drop/to": entry["to"],
                                     "lr_drop/reason": entry["reason"]})

    if restored is not None:
        _check_compatible(restored["config"], config)
        state, data_state = restored["state"], restored["data"]
        control = optim.LRControl.from_json(restored["control"])
        console.print(f"Resumed from {ckpt.directory / str(restored['step'])} (step {restored['step']}, "
                      f"lr {optim.get_lr(state.opt_state):.3g}).")
        new_lr = manual_lr_to_apply(manual_lr, control.drops)
        if new_lr is not None:
            old = optim.get_lr(state.opt_state)
            state = state.replace(opt_state=optim.set_lr(state.opt_state, new_lr))
            log_drop(optim.record_drop(control, step=int(state.step), epoch=int(state.step) / steps_per_epoch,
                                       old=old, new=new_lr, reason=MANUAL_LR_REASON))

    train_iter = data_lib.build_train_iter(config.data, batch_size=config.batch_size, seed=config.seed,
                                           image_size=model.image_size, shard_index=host_shard[0],
                                           shard_count=host_shard[1], data=data)
    if data_state is not None:
        train_iter.set_state(data_state)

    inputs = make_input_fn(config.data, data.stats)
    train_step = make_train_step(model, tx, mesh, shardings, inputs)
    eval_step = make_eval_step(model, mesh, shardings.params, inputs)

    # One pass gives both protocols: the ten views hold the centre crop. With uint8 output each image
    # travels once, whole, and the views are cut on the device.
    eval_mode = ("whole" if config.data.output == "uint8" else "ten_crop") if config.eval_ten_crop else "center"
    eval_passes = []  # built at the first evaluation; its worker processes live until the run ends

    def run_eval(params):
        if not eval_passes:
            eval_passes.append(data_lib.EvalPasses(
                config.data, batch_size=config.eval_batch_size, mode=eval_mode, image_size=model.image_size,
                data=data, shard_index=host_shard[0], shard_count=host_shard[1]))
        r = evaluate(eval_step, params, eval_passes[0](), mesh)
        return {f"val/{k}": v for k, v in r.items() if k != "n"}

    if is_main:
        devices = jax.devices()
        console.print(f"[bold]alexnet_jax[/bold]: {len(devices)} x {devices[0].device_kind} "
                      f"({devices[0].platform}), mesh {dict(mesh.shape)}, "
                      f"{count_params(state.params):,} parameters, {num_train:,} training images, "
                      f"{steps_per_epoch} steps/epoch, {total_steps} steps, workdir {workdir}")
        console.print(summary_table(model))
        console.print(f"config:\n{config}")
        (workdir / "config.json").write_text(config.to_json(indent=2))

    step = int(state.step)
    log_every, eval_every = config.log_every, _every(config.eval_every, steps_per_epoch)
    ckpt_every = _every(config.checkpoint_every, steps_per_epoch)
    kill_at = int(os.environ.get("ALEXNET_JAX_KILL_AFTER_CHECKPOINT", "-1"))  # fault injection (tests)
    pending: list[tuple[int, dict]] = []
    val: dict = {}
    progress = TrainProgress(total_steps, step, config.batch_size, enabled=is_main, console=console)
    bad_batches, max_bad = 0, config.get("max_bad_batches", 10)
    ckpt_error: CheckpointWriteError | None = None

    def flush():
        """Fetch pending step metrics (one sync); report skipped bad batches, stop on a non-finite
        loss or too many bad batches, log the rest."""
        nonlocal bad_batches
        rows = jax.device_get(pending)
        pending.clear()
        good = []
        for s, m in rows:
            if int(m["train/nonfinite_inputs"]):
                bad_batches += 1
                progress.note(escape(
                    f"Step {s}: its input batch (batch {s - 1} of the training stream) has "
                    f"{int(m['train/nonfinite_inputs'])} NaN/Inf values; the step was skipped and the parameters "
                    f"left unchanged ({bad_batches} bad batch(es) so far, at most {max_bad})."))
                writer.write(s, {"train/nonfinite_inputs": int(m["train/nonfinite_inputs"])})
                if bad_batches > max_bad:
                    raise TrainingError(
                        f"{bad_batches} input batches had NaN/Inf values, the last at step {s}; stopping. "
                        f"{_last_good_text(ckpt)}. Check the data (and stats.npz), or raise "
                        "--config.max_bad_batches.")
                continue
            if not math.isfinite(float(m["train/loss"])):
                raise TrainingError(
                    f"The training loss became {float(m['train/loss'])} at step {s}; stopping. "
                    f"{_last_good_text(ckpt)}. Lower --config.optim.lr, or check the data for NaN/Inf inputs.")
            good.append((s, m))
        for s, m in good:
            if s % log_every == 0 or s == rows[-1][0]:
                writer.write(s, m)
        if good:
            s, m = good[-1]
            progress.update(s, loss=float(m["train/loss"]), lr=float(m["train/lr"]))

    batches = device_batches(train_iter, mesh)  # two batches ahead, already on the devices
    try:
        while step < total_steps:
            batch, data_position = next(batches)
            state, metrics = train_step(state, batch)
            step += 1
            pending.append((step, metrics))
            epoch_before, epoch = (step - 1) / steps_per_epoch, step / steps_per_epoch
            do_eval = step % eval_every == 0 or step == total_steps
            do_ckpt = step % ckpt_every == 0 or step == total_steps
            if step % log_every == 0 or do_eval or do_ckpt:
                flush()

            new_lr, reason = None, None
            if optim.scheduled_drop(config.optim, epoch_before, epoch):
                new_lr, reason = optim.get_lr(state.opt_state) / 10, "scheduled (optim.drop_epochs)"
            if step % log_every == 0:
                factor = distributed.requested_drop_everywhere(workdir)  # read on process 0, sent to all
                if factor is not None:
                    new_lr, reason = optim.get_lr(state.opt_state) / factor, f"requested ({optim.DROP_FILE})"
            if do_eval:
                val = run_eval(state.params)
                writer.write(step, {**val, "epoch": epoch})
                progress.note(f"step {step} (epoch {epoch:.2f}): val top-1 error {val['val/top1_error']:.4f}, "
                              f"top-5 {val['val/top5_error']:.4f}")
                if optim.plateau_drop(config.optim, control, val["val/top1_error"]) and new_lr is None:
                    new_lr, reason = optim.get_lr(state.opt_state) / 10, "plateau (optim.plateau_*)"
            if new_lr is not None:
                old = optim.get_lr(state.opt_state)
                state = state.replace(opt_state=optim.set_lr(state.opt_state, new_lr))
                log_drop(optim.record_drop(control, step=step, epoch=epoch, old=old, new=new_lr, reason=reason))
            if do_ckpt:
                try:  # a full or read-only disk: say so, keep training, try again next time
                    ckpt.save(step, state, data_state=data_position,
                              config=json.loads(config.to_json()), control=control.to_json(),
                              metrics={"val/top1_error": val["val/top1_error"]} if do_eval else None,
                              dataset={"classes": data.classes, "class_names": data.class_names, "stats": data.stats})
                except CheckpointWriteError as e:
                    ckpt_error = e
                    progress.note(escape(f"{e} Training goes on; the next checkpoint tries again."))
                    writer.write(step, {"checkpoint/error": str(e)})
                if step == kill_at:
                    ckpt.wait()
                    os.kill(os.getpid(), signal.SIGKILL)
        flush()
        try:
            ckpt.wait()  # the final checkpoint is on disk before the run reports success
        except CheckpointWriteError as e:
            ckpt_error = e
        if step > 0 and ckpt.last_good != step:
            raise CheckpointError(f"{ckpt_error or 'The final checkpoint was not written.'} The run reached step "
                                  f"{step} but could not save it; once the disk "
                                  "is fixed, run the same command again: it resumes from the newest good "
                                  "checkpoint.")
        if not val and restored is not None and step == total_steps:
            val = run_eval(state.params)  # resumed at the very end: report where it stands
    finally:
        progress.close()
        ckpt.close()
        writer.close()
        for passes in eval_passes:
            passes.close()
        if hasattr(train_iter, "close"):
            train_iter.close()
    result = {"step": step, **val, "lr": optim.get_lr(state.opt_state), "lr_drops": control.drops}
    if is_main and val:
        console.print(f"[bold]Done at step {step}:[/bold] validation top-1 error {val['val/top1_error']:.4f}, "
                      f"top-5 {val['val/top5_error']:.4f} (chance: top-1 {1 - 1 / model.num_classes:.2f}).")
    return result
