"""`python -m adaptface_jax.main --config configs/<experiment>.py[:ARGS] --workdir DIR [--config.x=y ...]`.

Rerunning the same command on the same workdir resumes from its last checkpoint. `--config.init_from=OTHER_WORKDIR`
starts a new run (step 0, fresh optimizer) from the trainable weights of another run (run_state.init_from_run).
"""

import os

# TensorFlow (input pipeline only) must neither take GPU memory nor flood the log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from adaptface_jax import runtime  # noqa: E402 (light: os, sys, ctypes)

if __name__ == "__main__":  # first, before the heavy imports: re-executes once under tcmalloc
  runtime.use_tcmalloc()

from absl import app, flags
from ml_collections import config_flags

from adaptface_jax import cli, peers, train

_CONFIG = cli.define(config_flags.DEFINE_config_file, "config", None, "Experiment config file.", lock_config=True)
_WORKDIR = cli.define(flags.DEFINE_string, "workdir", None, "Directory for checkpoints, logs and results.")
_PROCESSES = cli.MultihostFlags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Devices split each micro-batch: their count must divide data.batch_size / optim.accumulate_steps.
  _PROCESSES.join(_CONFIG.value.data.batch_size // max(1, _CONFIG.value.optim.get("accumulate_steps", 1)))
  with peers.watching():
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
