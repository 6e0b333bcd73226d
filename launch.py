"""Entry point: ``python launch.py --config=configs/paper.py --config.data.root=DIR --workdir=DIR``.

Every field of the config file is an override, e.g. ``--config.model.towers=1``
(ml_collections syntax); the command line is parsed in ``alexnet_jax/cli.py``.
"""

import signal
import sys

if __name__ == "__main__":
    # A Ctrl-C or SIGTERM during the imports (seconds) waits for cli.launch's handler: no traceback.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    from alexnet_jax import cli

    cli.launch(sys.argv)
