"""`python -m adaptface_jax.main --config configs/<experiment>.py[:ARGS] --workdir DIR [--config.x=y ...]`.

Rerunning the same command on the same workdir resumes from its last checkpoint.
"""

import logging
import os

# TensorFlow (input pipeline only) must neither take GPU memory nor flood the log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from adaptface_jax import runtime  # noqa: E402 (light: os, sys, ctypes)

if __name__ == "__main__":  # first, before the heavy imports: re-executes once under tcmalloc
  runtime.use_tcmalloc()

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from adaptface_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (SLURM / multi-host runs).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _MULTIHOST.value:
    jax.distributed.initialize()
  else:  # on CPU, one device per core; the batch is sharded over them (see runtime.py)
    runtime.use_cpu_devices(_CONFIG.value.data.batch_size)
  # Our progress at INFO; library chatter (orbax, absl) only from WARNING up.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("adaptface_jax").setLevel(logging.INFO)
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
