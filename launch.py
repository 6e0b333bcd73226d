"""Entry point: ``python launch.py --config=configs/paper.py --workdir=DIR``.

Overrides use ml_collections syntax, e.g. ``--config.model.towers=1``.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_BAD = (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError)


def _explain(e: Exception):
    what = f"no such config key: {str(e).strip(chr(34))}" if isinstance(e, (KeyError, AttributeError)) else str(e)
    sys.exit(f"launch.py: bad command line: {what}\n"
             "Config keys are those of the --config file, e.g. --config.model.lrn=False.")


try:  # config_flags reads the command line's overrides as soon as the flag is defined
    _CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Run config (a get_config() file).")
except _BAD as e:
    _explain(e)
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Directory for checkpoints and metrics.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    try:
        config = _CONFIG.value
        config.get("model")  # a config file that failed to load raises only when first touched
    except _BAD as e:  # e.g. a --config file that does not exist
        _explain(e)
    from alexnet_jax import ConfigError, train
    from alexnet_jax.checkpoint import CheckpointError
    from alexnet_jax.data import DatasetError

    try:
        train.run(config, _WORKDIR.value)
    except ConfigError as e:
        sys.exit(f"launch.py: bad config: {e}")
    except (DatasetError, CheckpointError, train.TrainingError) as e:
        sys.exit(f"launch.py: {e}")


def _parse(argv):
    try:
        return flags.FLAGS(argv)
    except _BAD as e:
        _explain(e)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse)
