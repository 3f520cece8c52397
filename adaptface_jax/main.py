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

import jax
from absl import app, flags
from ml_collections import config_flags

from adaptface_jax import cli, train

_CONFIG = cli.define(config_flags.DEFINE_config_file, "config", None, "Experiment config file.", lock_config=True)
_WORKDIR = cli.define(flags.DEFINE_string, "workdir", None, "Directory for checkpoints, logs and results.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Join a multi-process run (jax.distributed.initialize): the three flags below where given, "
    "else JAX_COORDINATOR_ADDRESS and the cluster's environment (SLURM, Open MPI, Kubernetes, Cloud TPU).")
_COORDINATOR_ADDRESS = flags.DEFINE_string("coordinator_address", None,
                                           "--multihost: host:port that process 0 listens on, reachable by all.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "--multihost: how many processes take part.",
                                      lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "--multihost: this process's index, 0 .. num_processes - 1.",
                                   lower_bound=0)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  batch_size = _CONFIG.value.data.batch_size
  if _MULTIHOST.value:
    runtime.use_processes(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value, batch_size)
  elif any(f.value is not None for f in (_COORDINATOR_ADDRESS, _NUM_PROCESSES, _PROCESS_ID)):
    raise app.UsageError("--coordinator_address, --num_processes and --process_id need --multihost")
  else:  # on CPU, one device per core; the batch is sharded over them (see runtime.py)
    runtime.use_cpu_devices(batch_size)
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if _MULTIHOST.value:
    # Leave together (a barrier): process 0 hosts the coordination service, and a peer still tearing down when it
    # exits is aborted. Not on an error: a failing process exits at once and takes the others down with it.
    jax.distributed.shutdown()


if __name__ == "__main__":
  cli.run(main)
