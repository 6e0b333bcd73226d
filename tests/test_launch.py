"""The front door: launch.py and the config files, run as a user would."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from alexnet_jax import default_config

ROOT = Path(__file__).resolve().parents[1]


def launch(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_paper_config_model_section_is_the_paper_net():
    sys.path.insert(0, str(ROOT))
    from configs import paper

    assert paper.get_config().model.to_dict() == default_config().to_dict()


def test_paper_config_fields_are_all_commented():
    for line in (ROOT / "configs" / "paper.py").read_text().splitlines():
        if line.strip().startswith("c.") and "=" in line and "ConfigDict()" not in line:
            assert "#" in line, f"uncommented config field: {line.strip()}"


def test_demo_main_job_runs_and_layouts_agree():
    r = launch("--config=configs/demo.py")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "1,279,082" in r.stdout  # the demo net's parameter count, in the summary table
    assert "Layouts agree" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--config.model.lrm=False"], "no such config key: 'lrm'"),
    (["--config.model.towers=two"], "invalid literal for int()"),
    (["--config.model.towers=3"], "model.towers must be 1 or 2"),
    (["--config=configs/missing.py"], "configs/missing.py"),
])
def test_bad_command_lines_fail_with_one_clear_message(args, message):
    r = launch(*args)
    assert r.returncode != 0
    assert message in r.stderr
    assert "Traceback" not in r.stderr
