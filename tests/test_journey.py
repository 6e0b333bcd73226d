"""A newcomer's first hour, typed as the README and docs type it, in a copy of the repository root.

The README's main job trains ``runs/demo``; then every documented command that reads a checkpoint,
an image or a folder runs byte for byte as its page shows it (the ``verbatim:`` entries of
``test_docs.COMMANDS``), relative paths and all; then ``load_checkpoint`` from another folder and from
a copy with spaces in its path (as Colab users copy a run to Drive); then the notebook from
``notebooks/`` with its own defaults. Each step must end with status 0, no traceback and no leak
warning. Only the program word changes: ``python`` (and ``.venv/bin/python``) is this interpreter.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import _trained
import pytest
import test_docs

ROOT = Path(__file__).resolve().parents[1]
SIZE = ["--config.total_steps=6", "--config.eval_every=3"]  # the one override added to the main job
CHECKPOINTS = ("runs/demo", "runs/paper", "runs/bvlc_alexnet", "runs/torchvision_alexnet")
IMAGES = {
    "cat.jpg": "grace_hopper.jpg",
    "dog.png": "Minduka_Present_Blue_Pack.png",
    "a.jpg": "grace_hopper.jpg",
    "b.png": "Minduka_Present_Blue_Pack.png",
}


def verbatim_commands() -> list[str]:
    """The documented command lines ``test_docs.COMMANDS`` says this test runs as typed."""
    return [c for c, where in test_docs.COMMANDS.items() if where.startswith("verbatim:")]


def as_typed(command: str) -> list[str]:
    """The command's words, optional ``[...]`` parts included with their first ``a|b`` choice."""
    command = re.sub(r"\[([^\]]*)\]", lambda m: m[1].split("|")[0], command)
    command = re.sub(r"=(\w+)\|\w+", r"=\1", command)
    words = shlex.split(command)
    return [sys.executable if w in ("python", ".venv/bin/python") else w for w in words]


def env() -> dict:
    out = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "ALEXNET_JAX_CHECKPOINT")}
    return out


def check(r: subprocess.CompletedProcess, what: str, *, cells_only: bool = False) -> None:
    """Status 0, no traceback, no leak. ``cells_only``: tracebacks are looked for in the cells' output (stdout)
    only: ipykernel may log a 'Task was destroyed' error, traceback and all, on its own stderr as it shuts
    down after the last cell; a cell that raised fails the run (status 1) before that."""
    text = r.stdout + r.stderr
    assert r.returncode == 0, f"{what}: rc {r.returncode}\n{text[-3000:]}"
    assert "Traceback" not in (r.stdout if cells_only else text), f"{what}\n{text[-3000:]}"
    assert not re.search(r"leak", text, re.I), f"{what}\n{text[-3000:]}"


def run(words: list[str], cwd: Path, what: str, timeout: int = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(words, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    check(r, what)
    return r


def fresh_copy(dst: Path) -> Path:
    """The repository root as a clone has it: no venv, no runs, no caches."""
    ignore = shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", "*.egg-info", ".pytest_cache", "figures")
    shutil.copytree(ROOT, dst, ignore=ignore)
    return dst


@pytest.mark.slow
def test_a_newcomers_journey_verbatim(tmp_path):
    repo = fresh_copy(tmp_path / "alexnet_jax")

    # 1. The README's main job, from `.venv/bin/python launch.py` on (the venv is this one), plus SIZE.
    main_job = next(
        c for c in test_docs.COMMANDS if c.startswith("python3 -m venv .venv && .venv/bin/pip install -q -e . &&")
    )
    words = as_typed(main_job.split("&&")[-1])
    assert words[1:] == ["launch.py", "--config=configs/demo.py", "--workdir=runs/demo"], words
    r = run([*words, *SIZE], repo, "main job")
    assert "Done at step 6" in r.stdout
    for name in CHECKPOINTS[1:]:  # the pages' other checkpoint names, here the same run
        shutil.copytree(repo / "runs" / "demo", repo / name)
    for name, sample in IMAGES.items():
        shutil.copy(_trained.photo_paths()[0 if sample.endswith("jpg") else 1], repo / name)

    # 2. Every documented command that reads a checkpoint, an image or a folder, as typed.
    commands = verbatim_commands()
    assert len(commands) >= 8, commands
    outputs = {c: run(as_typed(c), repo, c).stdout for c in commands}
    evaluate = next(c for c in commands if c.startswith("python -m alexnet_jax.evaluate --checkpoint runs/demo"))
    assert re.search(r"centre crop\s+0\.\d{4}", outputs[evaluate])
    assert (repo / "figures" / "conv1_kernels.png").is_file() and (repo / "runs" / "paper" / "val.json").is_file()
    assert (repo / "runs" / "demo_weights" / "checkpoints").is_dir() and (repo / "out.json").is_file()

    # 3. load_checkpoint from another working directory, and from a copy with spaces in its path.
    step = max(int(p.name) for p in (repo / "runs" / "demo" / "checkpoints").iterdir() if p.name.isdigit())
    drive = repo / "drive" / "My Drive" / "alexnet run"
    shutil.copytree(repo / "runs" / "demo" / "checkpoints" / str(step), drive)
    load = "import alexnet_jax; c = alexnet_jax.load_checkpoint({!r}); print('loaded', c.step, c.path)"
    r = run([sys.executable, "-c", load.format("../runs/demo")], repo / "notebooks", "load ../runs/demo")
    assert f"loaded {step} {repo}/runs/demo/checkpoints/{step}" in r.stdout, r.stdout
    r = run([sys.executable, "-c", load.format("drive/My Drive/alexnet run")], repo, "load the Drive copy")
    assert f"loaded {step} {drive}" in r.stdout, r.stdout

    # 4. The notebook, from notebooks/, with its own defaults (CHECKPOINT = "../runs/demo").
    notebook = (
        "import nbformat; from nbclient import NotebookClient\n"
        "nb = nbformat.read('explore.ipynb', as_version=4)\n"
        "NotebookClient(nb, timeout=600, kernel_name='python3', resources={'metadata': {'path': '.'}}).execute()\n"
        "print('\\n'.join(o.get('text', '') + o.get('data', {}).get('text/plain', '') for c in nb.cells\n"
        "                if c.cell_type == 'code' for o in c.get('outputs', [])))\n"
    )
    nb_env = {**env(), "TMPDIR": str(tmp_path)}  # where its "train a few steps" cell puts its run
    r = subprocess.run(
        [sys.executable, "-c", notebook],
        cwd=repo / "notebooks",
        env=nb_env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    check(r, "the notebook", cells_only=True)
    assert f"step {step} from" in r.stdout, r.stdout[-3000:]
    assert (repo / "notebooks" / "figures" / "conv1_kernels.png").is_file()
