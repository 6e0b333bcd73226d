"""README.md and docs/: every relative link resolves (file and heading), and every documented command
line is either run by a named test (whose file holds the command's flags) or listed as not run, with why."""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


def links(page: Path):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return re.findall(r"\[[^\]]+\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # http(s):, mailto: -- not ours to check
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link to {target!r}: no such file"
        if anchor:
            assert dest.suffix == ".md" and anchor in anchors(dest), f"{page.name}: no heading for {target!r}"


def test_slug_follows_github():
    assert slug("Problems stop the run, and nothing is lost") == "problems-stop-the-run-and-nothing-is-lost"
    assert slug("The demo departs from the paper's initialisation") == "the-demo-departs-from-the-papers-initialisation"


# Run as typed, relative paths and all, in a copy of the repository root (checkpoints named on the pages are
# copies of the demo run there): test_journey runs every entry marked so.
VERBATIM = "verbatim: tests/test_journey.py::test_a_newcomers_journey_verbatim"

# Every command line of README.md and docs/ (comments dropped, continuation lines joined), and the test
# that runs it as a user types it (sizes may be overridden), or why none does.
COMMANDS = {
    # README.md
    "python3 -m venv .venv && .venv/bin/pip install -q -e . && .venv/bin/python launch.py --config=configs/demo.py "
    "--workdir=runs/demo": "tests/test_launch.py::test_demo_main_job_trains_and_reports",
    "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && .venv/bin/python -m pytest -q": ".ci/run",
    "python launch.py --config=configs/demo.py --config.model.lrn=False --workdir=runs/no_lrn": "tests/test_launch.py::test_each_ablation_trains_from_the_command_line",
    "python launch.py --config=configs/demo.py --config.model.pool_window=2 --config.model.pool_stride=2 "
    "--workdir=runs/pool22": "tests/test_launch.py::test_each_ablation_trains_from_the_command_line",
    "python launch.py --config=configs/demo.py --config.model.towers=1 --workdir=runs/one_tower": "tests/test_launch.py::test_each_ablation_trains_from_the_command_line",
    "python launch.py --config=configs/demo.py --config.model.towers=1 --config.mesh.parallelism=hybrid "
    "--workdir=runs/demo_hybrid": "tests/test_launch.py::test_hybrid_layout_from_the_command_line",
    # docs/ablations.md
    "python -m alexnet_jax.ablate --config=configs/demo.py --out runs/ablations --seeds 3": "tests/test_ablate.py::test_two_variants_run_write_results_and_resume_without_retraining",
    "pip install scikit-learn": "not run: installs a package (the test extra has it)",
    "python scripts/write_digits.py --out data/digits": "tests/test_write_digits.py::test_the_folder_holds_every_digit_once_in_the_imagenet_layout",
    "python -m alexnet_jax.ablate --config=configs/demo.py --out runs/ablations_digits --seeds 3 -- "
    "--config.data.name=imagenet --config.data.root=data/digits --config.model.num_classes=10": "not run: 21 training runs (19 minutes); test_ablate runs the runner, test_write_digits trains on the folder",
    # docs/fault-tolerance.md
    "JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 python launch.py "
    "--config=configs/paper.py --config.data.root=/data/imagenet --workdir=/shared/runs/paper": "not run: two hosts and ImageNet; the same variables on one host are the next command",
    "for i in 0 1; do": "not run: the shell loop around the next line",
    "JAX_COORDINATOR_ADDRESS=localhost:12345 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=$i python launch.py "
    "--config=configs/demo.py --config.mesh.cpu_devices=2 --workdir=runs/two_processes &": "tests/test_distributed.py::test_two_processes_end_with_the_parameters_of_one",
    "done; wait": "not run: the shell loop's end",
    "srun python launch.py --config=configs/paper.py --config.data.root=/data/imagenet --workdir=/shared/runs/paper": "not run: needs SLURM; the exit status 75 it acts on is tests/test_preemption.py's",
    'if [ $? -eq 75 ]; then scontrol requeue "$SLURM_JOB_ID"; fi': "not run: needs SLURM",
    # docs/gpu.md
    'pip install -e . "jax[cuda13]"': "not run: a GPU install",
    'pip install -e . "jax[cuda12]"': "not run: a GPU install",
    'python -c "import jax; print(jax.devices())"': "not run: it checks a GPU install",
    "python -m alexnet_jax.data.prepare --src /data/imagenet --dst /data/packed-raw --records raw": "tests/test_launch_imagenet.py::test_the_gpu_commands_on_raw_records",
    "python launch.py --config=configs/paper.py --config.data.packed_dir=/data/packed-raw "
    "--config.model.dtype=bfloat16 --config.data.num_workers=12 --workdir=runs/paper": "tests/test_launch_imagenet.py::test_the_gpu_commands_on_raw_records",
    "python launch.py --config=configs/paper.py --config.data.packed_dir=/data/packed-raw "
    "--config.model.dtype=bfloat16 --config.batch_size=1024 --config.data.num_workers=32 "
    "--config.mesh.parallelism=data --workdir=runs/paper8": "tests/test_launch_imagenet.py::test_the_gpu_commands_on_raw_records",
    "pip install -e '.[gpu-compile]'": "not run: installs a package (the test extra has it)",
    "python -m alexnet_jax.costs --compile_for=h100 --devices=1 --dtype=bfloat16 --batch=128": "tests/test_gpu_compile.py::test_the_command_as_docs_type_it",
    "python benchmarks/bench_gpu.py --json gpu.json": "not run: the full-size benchmark, for a GPU (--quick is tested)",
    "python benchmarks/bench_gpu.py --quick --json q.json": "tests/test_bench_gpu.py::test_bench_gpu_quick",
    "pip install torch==2.13.0": "not run: installs a package (the test extra has torch)",
    "python benchmarks/bench_train.py": "not run: a benchmark of the full-size net, 15 minutes on 2 CPU cores",
    "python benchmarks/bench_train.py --batch 32 --rounds 2 --no-torch-compile": "not run: a benchmark of the full-size net, minutes on 2 CPU cores",
    "python benchmarks/bench_speed_changes.py": "not run: a benchmark of the full-size net, minutes on 2 CPU cores",
    # docs/imagenet.md
    "python launch.py --config=configs/paper.py --config.data.root=/path/to/imagenet --workdir=runs/paper": "tests/test_launch_imagenet.py::test_paper_config_on_a_raw_folder",
    "python -m alexnet_jax.data.prepare --src /path/to/imagenet-1k --dst /path/to/packed": "tests/data/test_data_parquet.py::test_a_subset_of_labels_trains_and_evaluates",
    "pip install tensorflow tensorflow-datasets": "not run: installs TensorFlow (the script's test stands in for it)",
    "python scripts/tfds_to_folder.py --data-dir ~/tensorflow_datasets --out /path/to/imagenet": "tests/data/test_data_tfds_to_folder.py::test_the_folder_it_writes_is_the_original",
    "python -m alexnet_jax.data.prepare --src /path/to/imagenet --stats_only": "tests/data/test_data_stats.py::test_two_processes_at_once_compute_once",
    "python launch.py --config=configs/demo.py --config.data.name=imagenet --config.data.root=/path/to/folder "
    "--config.model.num_classes=N --workdir=runs/mine": "tests/test_launch_imagenet.py::test_demo_recipe_on_a_users_folder_computes_stats_once",
    "python -m alexnet_jax.data.prepare --src /path/to/imagenet --dst /path/to/packed": "tests/test_launch_imagenet.py::test_packed_form_and_stats_path_from_the_command_line",
    "python launch.py --config=configs/paper.py --config.data.packed_dir=/path/to/packed --workdir=runs/paper": "tests/test_launch_imagenet.py::test_packed_form_and_stats_path_from_the_command_line",
    "python -m alexnet_jax.evaluate --checkpoint=runs/paper --json=runs/paper/val.json": VERBATIM,
    "python -m alexnet_jax.evaluate --checkpoint=runs/paper --config.data.root=/other/copy/of/imagenet --views=center": "tests/test_evaluate.py::test_devkit_layout_gives_the_class_folder_result",
    # docs/inference.md
    "python -m alexnet_jax.evaluate --checkpoint runs/demo": VERBATIM,
    "python -m alexnet_jax.predict --checkpoint runs/demo cat.jpg": VERBATIM,
    "python -m alexnet_jax.viz --checkpoint runs/demo --out figures/": VERBATIM,
    "python -m alexnet_jax.export --checkpoint runs/demo --out runs/demo_weights": VERBATIM,
    "python -m alexnet_jax.costs --config=configs/demo.py": VERBATIM,
    "python -m alexnet_jax.viz --checkpoint runs/demo --out figures/ --images a.jpg b.png": VERBATIM,
    # docs/parallelism.md
    "python -m alexnet_jax.costs --config=configs/paper.py --devices=4 --config.mesh.parallelism=hybrid "
    "[--json costs.json]": "tests/test_costs.py::test_command_line_prints_the_table_and_writes_json",
    # docs/pretrained.md
    "python -m alexnet_jax.convert --caffemodel bvlc_alexnet.caffemodel --out runs/bvlc_alexnet": "tests/test_convert.py::test_bad_files_get_one_line_errors",
    "python -m alexnet_jax.evaluate --checkpoint=runs/bvlc_alexnet --data=/path/to/imagenet "
    "[--views=center|ten_crop] [--json=val.json]": "tests/test_convert.py::test_evaluate_command_on_a_converted_checkpoint",
    "python -m alexnet_jax.predict --checkpoint runs/bvlc_alexnet cat.jpg dog.png [--json out.json]": VERBATIM,
    "pip install torch": "not run: installs a package (the test extra has torch)",
    "python -m alexnet_jax.convert --torchvision alexnet-owt-7be5be79.pth --out runs/torchvision_alexnet": "tests/test_convert_torchvision.py::test_bad_state_dicts_get_one_line_errors",
    "python -m alexnet_jax.evaluate --checkpoint=runs/torchvision_alexnet --data=/path/to/imagenet --views=center": "tests/test_convert.py::test_evaluate_command_on_a_converted_checkpoint",
    # docs/testing.md
    ".venv/bin/python -m pytest -q -m slow": ".ci/run",
    ".venv/bin/python -m pytest -q -m heavy": ".ci/run",
    ".venv/bin/ruff format --check src tests benchmarks configs scripts launch.py && .venv/bin/ruff check .": ".ci/run",
    ".venv/bin/python -m pytest -q -n 0 -k lrn": "not run: an example of picking tests",
    # docs/training.md
    "python launch.py --config=configs/demo.py --config.total_steps=100 --workdir=runs/short": "tests/test_train.py::test_resume_after_kill_is_exact",
}


def documented_commands() -> dict[str, list[str]]:
    """Each command line in a ```bash block, with the pages it is on."""
    found: dict[str, list[str]] = {}
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            for line in re.sub(r"\\\n\s*", " ", block).split("\n"):
                line = re.sub(r"\s+#\s.*$", "", line).strip()  # a trailing comment
                if line and not line.startswith("#"):
                    found.setdefault(re.sub(r"\s+", " ", line), []).append(page.name)
    return found


def test_every_documented_command_is_run_by_a_test_or_says_why_not():
    found = documented_commands()
    assert set(found) - set(COMMANDS) == set(), "documented, but no entry here: add the test that runs it"
    assert set(COMMANDS) - set(found) == set(), "an entry here for a command no page has any more"
    for command, where in COMMANDS.items():
        if where.startswith("not run: "):
            continue
        if where == VERBATIM:  # test_journey runs the line itself; it must be one it can run here
            assert not re.search(r"(^|\s|=)/", command), f"an absolute path cannot run verbatim: {command}"
            continue
        if where == ".ci/run":
            assert command.split("&& ")[-1] in (ROOT / ".ci" / "run").read_text(), command
            continue
        path, _, name = where.partition("::")
        text = (ROOT / path).read_text()
        assert re.search(rf"^def {name}\(", text, re.M), f"{where}: no such test"
        # The test file types the command's program and every flag it uses (their values may differ).
        words = shlex.split(command.replace("[", " ").replace("]", " ").replace("|", " "))
        program = next((w for w in words if w.endswith(".py") or w.startswith("alexnet_jax.")), None)
        if program:
            assert program.split("/")[-1].split(".")[-1 if program.startswith("alexnet_jax") else 0] in text, (
                command,
                where,
                program,
            )
        for flag in {w.split("=", 1)[0] for w in words if w.startswith("--") and w != "--"}:
            assert flag in text or flag.lstrip("-") in text, f"{where} never types {flag} ({command})"
