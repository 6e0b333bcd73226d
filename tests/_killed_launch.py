"""``launch.py`` that SIGKILLs itself (no clean-up at all) once the checkpoint of step N is on disk.

    python tests/_killed_launch.py N --config=configs/demo.py --workdir=W ...

A test hook given to ``train.train_and_evaluate`` from outside; the training loop knows nothing of it.
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/, as launch.py sees it

from alexnet_jax import cli, train  # noqa: E402


def main() -> None:
    kill_at, argv = int(sys.argv[1]), [sys.argv[0], *sys.argv[2:]]
    config, workdir = cli.parse_command_line(argv)

    def kill(step, checkpointer):
        if step == kill_at:
            checkpointer.wait()
            os.kill(os.getpid(), signal.SIGKILL)

    train.train_and_evaluate(config, workdir, after_checkpoint=kill)


if __name__ == "__main__":
    main()
