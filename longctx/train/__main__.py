"""python -m longctx.train --config configs/tiny.py --workdir runs/x [--config.train.steps=200] [--resume]

Trains the model a config describes; see longctx/config.py for every field.
"""

import sys

from absl import app, flags

from longctx import cli
from longctx.train.checkpoint import WorkdirError
from longctx.train.determinism import request_deterministic_gpu_ops
from longctx.train.trainer import fit, prepare

_CONFIG = cli.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run: config, metrics.jsonl, checkpoints.",
                               required=True)
_RESUME = flags.DEFINE_bool("resume", False, "Continue the run in --workdir from its newest checkpoint "
                            "(starts a new run if the workdir holds none).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace the run in --workdir (its config, metrics, "
                               "checkpoints, TensorBoard events and evaluation report) with a new one.")
_STOP_AFTER = flags.DEFINE_integer("stop_after", None, "Stop after this step with a checkpoint, as a time-limited "
                                   "job would; --resume continues it.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.setup_logging()
    try:
        run = prepare(_CONFIG.value, _WORKDIR.value, resume=_RESUME.value, overwrite=_OVERWRITE.value,
                      stop_after=_STOP_AFTER.value)
    except (WorkdirError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    fit(run)


def run():
    request_deterministic_gpu_ops()
    cli.check_config_overrides(sys.argv)
    app.run(main)


if __name__ == "__main__":
    run()
