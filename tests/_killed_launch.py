"""``launch.py`` that SIGKILLs itself (no clean-up at all) at checkpoint N.

    python tests/_killed_launch.py N --config=configs/demo.py --workdir=W ...
    python tests/_killed_launch.py N:mid-write --config=configs/demo.py --workdir=W ...

``N``: once the checkpoint of step N is on disk. ``N:mid-write``: the moment the
asynchronous write of step N has started, before it can finish; the process
prints ``killed mid-write: <what the checkpoint folder held>`` to stderr first.
A test hook given to ``train.train_and_evaluate`` from outside; the training loop knows nothing of it.
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/, as launch.py sees it

from alexnet_jax import cli, train


def main() -> None:
    step_arg, argv = sys.argv[1], [sys.argv[0], *sys.argv[2:]]
    kill_at, _, mode = step_arg.partition(":")
    kill_at = int(kill_at)
    config, workdir = cli.parse_command_line(argv)

    def kill(step, checkpointer):
        if step != kill_at:
            return
        if mode == "mid-write":
            held = sorted(p.name for p in Path(checkpointer.directory).iterdir())
            print(f"killed mid-write: {held}", file=sys.stderr, flush=True)
        else:
            checkpointer.wait()
        os.kill(os.getpid(), signal.SIGKILL)

    train.train_and_evaluate(config, workdir, after_checkpoint=kill)


if __name__ == "__main__":
    main()
