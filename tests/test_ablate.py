"""python -m alexnet_jax.ablate: variants x seeds through launch.py, results written, resumed without retraining."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import TINY

ROOT = Path(__file__).resolve().parents[1]


def ablate(*args):
    return subprocess.run(
        [sys.executable, "-m", "alexnet_jax.ablate", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_two_variants_run_write_results_and_resume_without_retraining(tmp_path):
    out = tmp_path / "ablations"
    args = (
        "--config=configs/demo.py",
        "--out",
        out,
        "--seeds",
        "1",
        "--variants",
        "baseline,one_tower",
        "--",
        *TINY,
        "--config.total_steps=3",
        "--config.eval_ten_crop=True",
        "--config.optim.plateau_patience=3",
    )  # the runner must switch the plateau rule off all the same
    r = ablate(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())
    assert [(x["variant"], x["seed"], x["steps"]) for x in rows] == [("baseline", 0, 3), ("one_tower", 0, 3)]
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["variant"] for t in table] == ["baseline", "one_tower"]
    assert (out / "ablations.png").stat().st_size > 10_000
    table = (out / "summary.md").read_text().splitlines()
    assert table[2].startswith("| baseline | 1 | ") and table[3].startswith("| one_tower | 1 | ")
    assert table[3].endswith("| +1.7 / +1.2 |")  # the paper's effect beside ours
    # The variants are different networks: the one-GPU net's widths (48-128-192-192-256, whole FC layers).
    assert rows[0]["params"] != rows[1]["params"]
    for x in rows:  # errors read from the run's own last evaluation, both protocols
        last = [
            json.loads(line)
            for line in (out / x["variant"] / "seed0" / "metrics.jsonl").read_text().splitlines()
            if "val/top1_error" in line
        ][-1]
        assert (x["top1_error"], x["top1_error_ten_crop"]) == (last["val/top1_error"], last["val/top1_error_ten_crop"])
    # Every run got the same fixed LR schedule (no plateau rule), seed and steps: read from their saved configs.
    from alexnet_jax.checkpoint import read
    from alexnet_jax.paths import find_step_dir

    saved = [read(find_step_dir(out / v / "seed0")[0], "config")["config"] for v in ("baseline", "one_tower")]
    assert [(c["optim"]["plateau_patience"], c["seed"], c["total_steps"]) for c in saved] == [(0, 0, 3)] * 2
    assert [c["model"]["towers"] for c in saved] == [2, 1]

    stamp = (out / "baseline" / "seed0" / "result.json").stat().st_mtime_ns
    again = ablate(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done already, skipped") == 2
    assert (out / "baseline" / "seed0" / "result.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "results.json").read_text()) == rows


def test_unknown_variant_lists_the_valid_ones(tmp_path):
    r = ablate("--out", tmp_path, "--variants", "baseline,no_relu")
    assert r.returncode == 1 and "no variant 'no_relu'; the variants are baseline, no_lrn, pool_2x2" in r.stderr


def test_each_variant_is_a_config_of_its_own():
    sys.path.insert(0, str(ROOT))
    from configs import ablations, demo

    base = demo.get_config()
    for name, changes in ablations.VARIANTS.items():
        c = ablations.get_config(name)
        fields = [path.split(".") for path in changes]
        assert all(c[s][f] == changes[f"{s}.{f}"] for s, f in fields), name
        assert name == "baseline" or any(base[s][f] != c[s][f] for s, f in fields), f"{name} changes nothing"
    with pytest.raises(KeyError, match="the variants are baseline"):
        ablations.get_config("no_relu")


def test_a_variant_as_a_config_file_from_the_command_line(tmp_path):
    """configs/ablations.py's docstring command: python launch.py --config=configs/ablations.py:no_lrn."""
    r = subprocess.run(
        [
            sys.executable,
            "launch.py",
            "--config=configs/ablations.py:no_lrn",
            f"--workdir={tmp_path / 'run'}",
            *TINY,
            "--config.total_steps=2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    from alexnet_jax.checkpoint import read
    from alexnet_jax.paths import find_step_dir

    assert read(find_step_dir(tmp_path / "run")[0], "config")["config"]["model"]["lrn"] is False


@pytest.mark.slow  # a launch.py run through the runner
def test_a_diverging_variant_is_a_result_not_a_crash(tmp_path):
    """A loss that becomes NaN ends that run with launch.py's status 3; the runner records it as
    diverged, goes on with the next run, and counts it in the table."""
    out = tmp_path / "ablations"
    r = ablate(
        "--config=configs/demo.py",
        "--out",
        out,
        "--seeds",
        "1",
        "--variants",
        "no_lrn",
        "--",
        *TINY,
        "--config.total_steps=4",
        "--config.optim.lr=1e6",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = json.loads((out / "results.json").read_text())
    assert row["diverged"] is True and row["top1_error"] is None and 1 <= row["steps"] <= 4
    assert "became nan" in (out / "no_lrn" / "seed0" / "ablate.log").read_text()
    assert (out / "summary.md").read_text().splitlines()[2].startswith("| no_lrn | 0 (+1 diverged) | - |")
