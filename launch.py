"""Entry point: ``python launch.py --config=configs/paper.py --config.data.root=DIR --workdir=DIR``.

Every field of the config file is an override, e.g. ``--config.model.towers=1``
(ml_collections syntax); the command line is parsed in ``alexnet_jax/cli.py``.
"""

import sys

from alexnet_jax import cli

if __name__ == "__main__":
    cli.launch(sys.argv)
