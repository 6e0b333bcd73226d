"""The paper's ablations as one experiment: every variant x seed through the ordinary training command.

    python -m alexnet_jax.ablate --config=configs/demo.py --out runs/ablations [--seeds 3]
        [--variants baseline,no_lrn,pool_2x2,one_tower,no_dropout,no_pca,tanh] [-- --config.data.root=...]

The variants are named once, in ``configs/ablations.py``. Each run is
``launch.py`` in its own workdir ``<out>/<variant>/seed<k>``, with
``--config.seed=k`` (the same data order and initialisation draw for every
variant), the recipe's fixed LR schedule (the plateau rule is switched off, so
every variant drops its LR at the same steps) and the same number of steps.
Overrides after ``--`` apply to every run. Run the same command again to go on:
finished runs are skipped, interrupted ones resume from their checkpoints.
Writes ``results.csv``, ``results.json`` and ``ablations.png`` in ``--out``.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from alexnet_jax import cli, paths
from alexnet_jax.errors import EXIT_DIVERGED, EXIT_INTERRUPTED

_PROG = cli.program("ablate")
ROOT = Path(__file__).resolve().parents[2]  # the repository checkout: launch.py, configs/
FIXED = ["--config.optim.plateau_patience=0"]  # every variant: the recipe's scheduled LR drops only
FIELDS = [
    "variant",
    "seed",
    "top1_error",
    "top5_error",
    "top1_error_ten_crop",
    "top5_error_ten_crop",
    "params",
    "steps",
    "wall_s",
    "diverged",
]


def ablations_config():
    """``configs/ablations.py`` (its ``VARIANTS`` and ``PAPER_DELTAS``)."""
    path = ROOT / "configs" / "ablations.py"
    spec = importlib.util.spec_from_file_location("_ablations", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT))  # it imports configs.demo
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT))
    return module


def overrides(changes: dict) -> list[str]:
    return [f"--config.{path}={value}" for path, value in changes.items()]


def _read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _params(workdir: Path) -> int:
    """Parameters of the run's network, from the config saved with its checkpoint."""
    import jax
    import jax.numpy as jnp
    import ml_collections

    from alexnet_jax.checkpoint import read
    from alexnet_jax.model import count_params, from_config
    from alexnet_jax.paths import find_step_dir

    model = from_config(ml_collections.ConfigDict(read(find_step_dir(workdir)[0], "config")["config"]).model)
    x = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
    return count_params(jax.eval_shape(model.init, jax.random.key(0), x)["params"])


def run_one(config: str, workdir: Path, variant_overrides: list[str], seed: int, extra: list[str]) -> dict:
    """Train (or resume) one variant x seed; its result row, also kept as ``<workdir>/result.json``."""
    done = workdir / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "launch.py",
        f"--config={config}",
        f"--workdir={workdir}",
        f"--config.seed={seed}",
        *variant_overrides,
        *extra,
        *FIXED,
    ]  # FIXED last: no override can give one variant another schedule
    start = time.perf_counter()
    with open(workdir / "ablate.log", "a") as log:
        rc = _run_launch(cmd, log, workdir)
    if rc == EXIT_DIVERGED:  # a result too: these settings do not train (the README says which diverge)
        at = re.findall(r"became \S+ at step (\d+)", (workdir / "ablate.log").read_text())
        result = {
            "seed": seed,
            "top1_error": None,
            "top5_error": None,
            "top1_error_ten_crop": None,
            "top5_error_ten_crop": None,
            "params": None,
            "steps": int(at[-1]) if at else None,
            "wall_s": round(time.perf_counter() - start, 1),
            "diverged": True,
        }
        done.write_text(json.dumps(result) + "\n")
        return result
    if rc != 0:
        raise RuntimeError(
            f"{workdir} stopped with exit status {rc} (its output is in {workdir / 'ablate.log'}); "
            "run the same command again to resume it"
        )
    rows = _read_rows(workdir / "metrics.jsonl")
    last = [r for r in rows if "val/top1_error" in r][-1]
    result = {
        "seed": seed,
        "top1_error": last["val/top1_error"],
        "top5_error": last["val/top5_error"],
        "top1_error_ten_crop": last.get("val/top1_error_ten_crop"),
        "top5_error_ten_crop": last.get("val/top5_error_ten_crop"),
        "params": _params(workdir),
        "steps": last["step"],
        "wall_s": round(time.perf_counter() - start, 1),
        "diverged": False,
    }
    done.write_text(json.dumps(result) + "\n")
    return result


class Interrupted(Exception):
    """Ctrl-C during a run: it saved its checkpoint (launch.py's status 75) or was stopped."""


def _run_launch(cmd: list[str], log, workdir: Path) -> int:
    """``launch.py`` in a session of its own, so a terminal's Ctrl-C reaches it once, from here: on
    SIGINT it saves at the step in flight and exits 75 (a second Ctrl-C stops it at once)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGINT)
            rc = proc.wait()
        raise Interrupted(
            f"{workdir} saved its checkpoint; run the same command again to go on"
            if rc == 75
            else f"{workdir} stopped (status {rc}); run the same command again to go on"
        ) from None


def summary(results: list[dict], names: list[str], paper: dict) -> str:
    """A markdown table: each variant's error (mean and spread over seeds, in points) and its effect
    against the baseline, beside the paper's effect where it reports one."""
    import numpy as np

    def errs(name, key):
        return np.array([100 * r[key] for r in results if r["variant"] == name and r[key] is not None])

    lines = [
        "| variant | seeds | top-1 error % | top-5 error % | top-1 ten-crop % | variant - baseline, top-1 "
        "(± s.e.) | the paper: variant - its net, top-1 / top-5 |",
        "|---|---|---|---|---|---|---|",
    ]
    base = errs("baseline", "top1_error")
    for name in names:
        t1, t5, tc = (errs(name, k) for k in ("top1_error", "top5_error", "top1_error_ten_crop"))
        fmt = lambda a: f"{a.mean():.1f} ± {a.std(ddof=1) if len(a) > 1 else 0:.1f}" if len(a) else "-"
        # The design choice's effect, as the paper states it: the variant's error minus the baseline's.
        effect = (
            f"{t1.mean() - base.mean():+.1f} ± {np.sqrt(t1.var(ddof=1) / len(t1) + base.var(ddof=1) / len(base)):.1f}"
            if name != "baseline" and len(t1) > 1 and len(base) > 1
            else "-"
        )
        ref = f"+{paper[name][0]} / +{paper[name][1]}" if name in paper else "-"
        diverged = sum(1 for r in results if r["variant"] == name and r.get("diverged"))
        seeds = f"{len(t1)}" + (f" (+{diverged} diverged)" if diverged else "")
        lines.append(f"| {name} | {seeds} | {fmt(t1)} | {fmt(t5)} | {fmt(tc)} | {effect} | {ref} |")
    return "\n".join(lines)


def plot(results: list[dict], out: Path, names: list[str]) -> Path:
    """Top-1 error per variant with a point per seed, and every run's validation curve."""
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    ax, curves = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colours = {n: f"C{i % 10}" for i, n in enumerate(names)}
    for i, name in enumerate(names):
        errs = [r["top1_error"] for r in results if r["variant"] == name and r["top1_error"] is not None]
        ax.scatter(np.full(len(errs), i) + np.linspace(-0.1, 0.1, len(errs)), errs, color=colours[name])
        n_div = sum(1 for r in results if r["variant"] == name and r.get("diverged"))
        if n_div:  # diverged runs: a cross at 100% error
            ax.scatter(
                np.full(n_div, i) + np.linspace(-0.1, 0.1, n_div), np.ones(n_div), color=colours[name], marker="x"
            )
        if errs:
            ax.hlines(np.mean(errs), i - 0.25, i + 0.25, color=colours[name])
        for r in (r for r in results if r["variant"] == name):
            rows = [x for x in _read_rows(out / name / f"seed{r['seed']}" / "metrics.jsonl") if "val/top1_error" in x]
            curves.plot(
                [x["step"] for x in rows],
                [x["val/top1_error"] for x in rows],
                color=colours[name],
                alpha=0.7,
                label=name if r["seed"] == min(q["seed"] for q in results if q["variant"] == name) else None,
            )
    ax.set_xticks(range(len(names)), names, rotation=30)
    ax.set_ylabel("validation top-1 error (centre crop)")
    ax.set_title("final error, one point per seed; line: mean; x: diverged")
    curves.set_xlabel("step")
    curves.set_ylabel("validation top-1 error")
    curves.legend(fontsize=8)
    curves.set_title("validation curves")
    path = out / "ablations.png"
    fig.savefig(path, dpi=100)
    return path


def main(argv: list[str] | None = None) -> None:
    """``python -m alexnet_jax.ablate ARGS [-- OVERRIDES]`` (and ``alexnet-ablate``); ``argv`` defaults to
    ``sys.argv[1:]``."""
    argv = [_PROG, *(sys.argv[1:] if argv is None else argv)]
    cli.run_main(_PROG, lambda: _main(argv))


def _main(argv: list[str]) -> None:
    from absl import flags

    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    fv = flags.FlagValues()
    flags.DEFINE_string("config", "configs/demo.py", "The base recipe (a get_config() file).", flag_values=fv)
    paths.DEFINE_path("out", None, "The folder for the runs and the results.", flag_values=fv)
    flags.DEFINE_integer("seeds", 3, "Seeds 0 .. N-1 for every variant.", lower_bound=1, flag_values=fv)
    flags.DEFINE_list(
        "variants", None, "Comma-separated variant names (default: all, see configs/ablations.py).", flag_values=fv
    )
    if cli.wants_help(argv):
        cli.print_help(
            _PROG,
            __doc__,
            fv,
            "-- OVERRIDES: launch.py flags for every run, e.g. "
            "-- --config.data.root=/path/to/imagenet --config.total_steps=1000.",
        )
    cli.parse_flags(_PROG, fv, own)
    cli.require(_PROG, fv, "out")
    known = ablations_config().VARIANTS
    names = fv.variants or list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        sys.exit(f"{_PROG}: no variant {', '.join(map(repr, unknown))}; the variants are {', '.join(known)}.")
    out = Path(fv.out).absolute()
    results = []
    for name in names:
        for seed in range(fv.seeds):
            workdir = out / name / f"seed{seed}"
            finished = (workdir / "result.json").is_file()
            print(f"{name} seed {seed}: {'done already, skipped' if finished else 'training'}", flush=True)
            try:
                results.append({"variant": name, **run_one(fv.config, workdir, overrides(known[name]), seed, extra)})
            except RuntimeError as e:
                sys.exit(f"{_PROG}: {e}")
            except Interrupted as e:
                print(f"{_PROG}: interrupted (Ctrl-C): {e}", file=sys.stderr)
                sys.exit(EXIT_INTERRUPTED)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(results)
    png = plot(results, out, names)
    table = summary(results, names, ablations_config().PAPER_DELTAS)
    (out / "summary.md").write_text(table + "\n")
    print(table)
    print(f"wrote {out / 'results.csv'}, {out / 'results.json'}, {out / 'summary.md'} and {png}")


if __name__ == "__main__":
    main()
